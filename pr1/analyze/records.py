"""Per-problem evaluation records: loading them, and pairing two models' records problem by problem.

Where it sits: `pr1.eval` writes one JSON object per problem to `<out>/<benchmark>.jsonl` (fields:
benchmark, id, subsets, response, correct, visual_annotations, model, ...). Here two such files
become the list of paired problems the McNemar table is counted over (`labels.py` labels each side,
`report.py` counts and tests). A problem is identified by (benchmark, id); a problem present in only
one file is reported as unpaired, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Mapping, Sequence

Key = tuple[str, str]  # (benchmark, id)


class AnalysisError(ValueError):
    """Input that cannot be analysed as asked; the message names the file, line, problem or flag."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One evaluation record and where it came from (for error messages)."""

    benchmark: str
    id: str
    data: dict
    path: str
    line: int

    @property
    def key(self) -> Key:
        return (self.benchmark, self.id)

    @property
    def name(self) -> str:
        return problem_name(self.key)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def problem_name(key: Key) -> str:
    return f"{key[0]}/{key[1]}"


def problem_order(key: Key):
    """Sort key: by benchmark, then numeric ids by value (2 before 10), then the other ids."""
    pid = key[1]
    return (key[0], (0, int(pid), "") if pid.isdigit() else (1, 0, pid))


def load_records(path: str) -> list[Record]:
    """The records of one JSONL file, in file order.

    Blank lines are skipped. Unreadable JSON, a record without `benchmark` or `id`, and a second
    record of the same (benchmark, id) are errors naming the file and line(s).
    """
    records: list[Record] = []
    first_line: dict[Key, int] = {}
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise AnalysisError(
            f"{path}: no such file (expected the JSONL records written by pr1.eval)"
        ) from None
    with f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise AnalysisError(
                    f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})"
                ) from None
            if not isinstance(data, dict):
                raise AnalysisError(f"{path}:{line_no}: expected a JSON object, got {type(data).__name__}")
            for field in ("benchmark", "id"):
                if data.get(field) in (None, ""):
                    raise AnalysisError(
                        f"{path}:{line_no}: record has no '{field}' (records are paired by benchmark and id)"
                    )
            # Ids may be written as numbers by some tools; "12" and 12 are the same problem.
            record = Record(str(data["benchmark"]), str(data["id"]), data, path, line_no)
            if record.key in first_line:
                raise AnalysisError(
                    f"{path}:{line_no}: duplicate record for {record.name} (first at line "
                    f"{first_line[record.key]}); one record per problem is expected"
                )
            first_line[record.key] = line_no
            records.append(record)
    return records


@dataclasses.dataclass
class Pairing:
    """Problems evaluated by both models, and those only one file has.

    pairs: (record of A, record of B) in `problem_order` (and sampled, when asked).
    only_a, only_b: records passing the filters whose problem is missing from the other file.
    population: paired problems passing the filters, before sampling.
    sample, seed: the sampling request (None when every paired problem is used).
    """

    pairs: list[tuple[Record, Record]]
    only_a: list[Record]
    only_b: list[Record]
    population: int
    sample: int | None = None
    seed: int | None = None


def parse_subsets(items: Sequence[str]) -> dict[str, str]:
    """`["task=geometry problem solving", ...]` (the --subset flags) as a dict."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise AnalysisError(
                f'--subset {item!r}: expected key=value, e.g. --subset task="geometry problem solving"'
            )
        out[key.strip()] = value.strip()
    return out


def _subsets(record: Record) -> dict:
    subsets = record.data.get("subsets") or {}
    if not isinstance(subsets, dict):
        raise AnalysisError(
            f"{record.where}: 'subsets' of {record.name} is {type(subsets).__name__}, expected an object"
        )
    return subsets


def pair_records(
    a: Sequence[Record],
    b: Sequence[Record],
    *,
    benchmark: str | None = None,
    subsets: Mapping[str, str] | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> Pairing:
    """Pairs A's and B's records by (benchmark, id), keeping problems of `benchmark` (if given)
    whose `subsets` have every key=value of `subsets`; then, with `sample`, draws that many paired
    problems at random.

    The draw depends only on the set of paired problems and the seed, not on the files' order.
    A filter that matches nothing in either file is an error listing what the files do have; so
    is a problem whose filtered subset values differ between A and B.
    """
    subsets = dict(subsets or {})
    everything = [*a, *b]
    if benchmark is not None and not any(r.benchmark == benchmark for r in everything):
        seen = sorted({r.benchmark for r in everything})
        raise AnalysisError(f"--benchmark {benchmark!r}: no record has it; the files have {seen}")
    for key, value in subsets.items():
        values = {str(_subsets(r)[key]) for r in everything if key in _subsets(r)}
        if not values:
            seen = sorted({k for r in everything for k in _subsets(r)})
            raise AnalysisError(
                f"--subset {key}={value!r}: no record has subset key {key!r}; keys present: {seen}"
            )
        if value not in values:
            raise AnalysisError(
                f"--subset {key}={value!r}: no record has that value; values present: {sorted(values)[:20]}"
            )

    def keep(r: Record) -> bool:
        s = _subsets(r)
        return (benchmark is None or r.benchmark == benchmark) and all(
            key in s and str(s[key]) == value for key, value in subsets.items()
        )

    by_key_b = {r.key: r for r in b}
    keys_a = {r.key for r in a}
    pairs = []
    for ra in a:
        rb = by_key_b.get(ra.key)
        if rb is None:
            continue
        if keep(ra) != keep(rb):
            diff = {k: (_subsets(ra).get(k), _subsets(rb).get(k)) for k in subsets}
            raise AnalysisError(
                f"{ra.name}: A ({ra.where}) and B ({rb.where}) disagree on the filtered subsets "
                f"(A, B) = {diff}; were both evaluated on the same benchmark release?"
            )
        if keep(ra):
            pairs.append((ra, rb))
    pairs.sort(key=lambda p: problem_order(p[0].key))
    only_a = sorted((r for r in a if r.key not in by_key_b and keep(r)), key=lambda r: problem_order(r.key))
    only_b = sorted((r for r in b if r.key not in keys_a and keep(r)), key=lambda r: problem_order(r.key))
    population = len(pairs)
    if sample is not None:
        if sample < 1:
            raise AnalysisError(f"--sample must be >= 1, got {sample}")
        if sample > population:
            raise AnalysisError(f"--sample {sample}, but only {population} paired problems pass the filters")
        pairs = sorted(random.Random(seed).sample(pairs, sample), key=lambda p: problem_order(p[0].key))
    return Pairing(pairs, only_a, only_b, population, sample, seed if sample is not None else None)
