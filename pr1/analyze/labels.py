"""Per-problem correct/wrong labels of one model: answer accuracy, hand perception labels, or
perception judged from the response and the problem's visual annotations.

Where it sits: between `records.py` (the paired problems) and `report.py` (the McNemar table).

Labels files (`--labels`, and what `--save_labels` writes) are CSV (by the `.csv` extension) or
JSONL (`.jsonl` / `.json`), one problem per row:
    benchmark           optional; without it (column absent or empty) the row matches the `id` in
                        any benchmark, which is an error if the paired problems have that id twice
    id                  the problem id as in the evaluation records
    perception_correct  1/0/true/false (JSON booleans and numbers 0/1 too)
Other columns are ignored (saved labels carry verdicts, annotations and the judge for audit).

Judged perception (the paper's notion of "perception correct"): a response's perception is
correct iff the judge says EVERY one of the problem's visual annotations is stated in it (every
verdict 1). A failed judgement is never turned into a label.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import os
from typing import Callable, Mapping, Sequence

from pr1.analyze.records import AnalysisError, Key, Record, problem_name
from pr1.rewards.perception import as_annotations

_TRUE = {"1", "true"}
_FALSE = {"0", "false"}
_SHOW = 5  # problems named in an error message before "and N more"


def _names(keys: Sequence[Key]) -> str:
    shown = ", ".join(problem_name(k) for k in keys[:_SHOW])
    return shown + (f" and {len(keys) - _SHOW} more" if len(keys) > _SHOW else "")


# ----------------------------------------------------------------------------------------------
# Answer accuracy


def accuracy_labels(records: Sequence[Record]) -> dict[Key, bool]:
    """The records' `correct` field; a missing or non-boolean value is an error naming the line."""
    out = {}
    for r in records:
        v = r.data.get("correct")
        if not (isinstance(v, bool) or (isinstance(v, int) and v in (0, 1))):
            raise AnalysisError(
                f"{r.where}: {r.name} has correct={v!r}; --label accuracy needs true/false "
                f"(was the answer checked?)"
            )
        out[r.key] = bool(v)
    return out


# ----------------------------------------------------------------------------------------------
# Labels files


def _parse_label(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise AnalysisError(f"{where}: perception_correct is {value!r}; expected 1, 0, true or false")


@dataclasses.dataclass
class LabelsFile:
    """Hand (or saved) labels: (benchmark or None, id) -> (label, line)."""

    path: str
    labels: dict[tuple[str | None, str], tuple[bool, int]]

    def for_problems(self, keys: Sequence[Key]) -> dict[Key, bool]:
        """The label of every given problem; missing ones are an error listing the first few."""
        ids_seen: dict[str, set[str]] = {}
        for bench, pid in keys:
            ids_seen.setdefault(pid, set()).add(bench)
        out, missing = {}, []
        for key in keys:
            hit = self.labels.get(key)
            if hit is None and (None, key[1]) in self.labels:
                if len(ids_seen[key[1]]) > 1:
                    line = self.labels[None, key[1]][1]
                    raise AnalysisError(
                        f"{self.path}:{line}: label for id {key[1]!r} has no benchmark, but the paired "
                        f"problems have that id in {sorted(ids_seen[key[1]])}; add a benchmark column"
                    )
                hit = self.labels[None, key[1]]
            if hit is None:
                missing.append(key)
            else:
                out[key] = hit[0]
        if missing:
            raise AnalysisError(
                f"{self.path} has no perception_correct for {len(missing)} of {len(keys)} paired "
                f"problems: {_names(missing)}"
            )
        return out


def load_labels(path: str) -> LabelsFile:
    """A labels file (format in the module docstring); duplicates are errors naming both lines."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".jsonl", ".json"):
        raise AnalysisError(f"{path}: labels file must end in .csv, .jsonl or .json")
    try:
        f = open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise AnalysisError(f"{path}: no such labels file") from None
    rows: list[tuple[int, dict]] = []
    with f:
        if ext == ".csv":
            reader = csv.DictReader(f)
            missing = {"id", "perception_correct"} - set(reader.fieldnames or ())
            if missing:
                raise AnalysisError(f"{path}: CSV header {reader.fieldnames} lacks {sorted(missing)}")
            for row in reader:
                rows.append((reader.line_num, row))
        else:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise AnalysisError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise AnalysisError(f"{path}:{line_no}: expected a JSON object")
                rows.append((line_no, row))
    labels: dict[tuple[str | None, str], tuple[bool, int]] = {}
    for line_no, row in rows:
        where = f"{path}:{line_no}"
        for field in ("id", "perception_correct"):
            if row.get(field) in (None, ""):
                raise AnalysisError(f"{where}: no '{field}'")
        bench = row.get("benchmark")
        key = (str(bench) if bench not in (None, "") else None, str(row["id"]).strip())
        if key in labels:
            raise AnalysisError(
                f"{where}: duplicate label for {key[0] or '(any benchmark)'}/{key[1]} (first at line "
                f"{labels[key][1]})"
            )
        labels[key] = (_parse_label(row["perception_correct"], where), line_no)
    return LabelsFile(path, labels)


# ----------------------------------------------------------------------------------------------
# Perception from a judge


@dataclasses.dataclass
class PerceptionLabels:
    """Judged perception of one model's responses.

    labels: problem -> perception correct (every verdict 1).
    skipped: problem -> why it has no label (only with skip_failed).
    details: problem -> {"verdicts", "annotations", "malformed"} for the saved labels.
    """

    labels: dict[Key, bool]
    skipped: dict[Key, str]
    details: dict[Key, dict]

    @property
    def malformed(self) -> int:
        return sum(d["malformed"] for d in self.details.values())


def record_annotations(record: Record, fallback: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """The record's visual annotations, else `fallback[id]` (from --annotations), else []."""
    found = as_annotations(record.data.get("visual_annotations"))
    if not found and fallback is not None:
        found = as_annotations(fallback.get(record.id))
    return found


def perception_labels(
    records: Sequence[Record],
    judge,
    *,
    annotations: Mapping[str, Sequence[str]] | None = None,
    skip_failed: bool = False,
    progress: Callable[[int, int], None] | None = None,
    chunk: int = 256,
) -> PerceptionLabels:
    """Judges every record's `response` against its visual annotations (a `pr1.rewards.judge.Judge`).

    A record without annotations or response, or a failed judgement, is an error naming the
    problem (and the judge's error); with skip_failed it is left out of `labels` and its reason
    goes to `skipped`. A `JudgeError` (bad URL, key or model) always propagates.
    progress(done, total) is called after each chunk of judgements.
    """
    skipped: dict[Key, str] = {}
    todo: list[tuple[Record, list[str]]] = []
    unannotated = []
    for r in records:
        if not isinstance(r.data.get("response"), str):
            if not skip_failed:
                raise AnalysisError(
                    f"{r.where}: {r.name} has no 'response' text to judge; pass --skip_failed "
                    f"to drop such pairs"
                )
            skipped[r.key] = "no response"
            continue
        found = record_annotations(r, annotations)
        if found:
            todo.append((r, found))
        else:
            unannotated.append(r)
    if unannotated and not skip_failed:
        raise AnalysisError(
            f"{len(unannotated)} records have no visual_annotations to judge perception against, e.g. "
            f"{unannotated[0].where} ({_names([r.key for r in unannotated])}); supply them with "
            f"--annotations FILE.parquet, or pass --skip_failed to drop these pairs"
        )
    for r in unannotated:
        skipped[r.key] = "no visual annotations"

    judgements = asyncio.run(_judge_all(judge, todo, progress, chunk))
    labels, details, failed = {}, {}, []
    for (r, found), j in zip(todo, judgements):
        if j.failed:
            failed.append((r, j))
            skipped[r.key] = f"judge failed: {j.error}"
            continue
        labels[r.key] = bool(j.verdicts) and all(v == 1.0 for v in j.verdicts)
        details[r.key] = {"verdicts": list(j.verdicts), "annotations": found, "malformed": j.malformed}
    if failed and not skip_failed:
        r, j = failed[0]
        names = _names([f[0].key for f in failed])
        raise AnalysisError(
            f"the judge failed on {len(failed)} of {len(todo)} responses ({names}); first: "
            f"{r.name} ({r.where}): {j.error}. Fix the judge and rerun, or pass --skip_failed "
            f"to drop these pairs (they are counted)"
        )
    return PerceptionLabels(labels, skipped, details)


async def _judge_all(judge, todo, progress, chunk):
    # Chunks only so progress can be shown; each chunk still runs `chunk` requests concurrently.
    out = []
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        out += await judge.judge_many([(r.data["response"], found) for r, found in part])
        if progress is not None:
            progress(len(out), len(todo))
    await judge.aclose()
    return out


def load_annotations(
    path: str, *, id_column: str = "id", annotations_column: str = "visual_key_info"
) -> dict[str, list[str]]:
    """id -> visual annotations from a parquet file (the training layout's `visual_key_info`)."""
    import pyarrow.parquet as pq

    if not os.path.exists(path):
        raise AnalysisError(f"--annotations {path}: no such file")
    names = pq.read_schema(path).names
    for col, flag in ((id_column, "--annotations_id_column"), (annotations_column, "--annotations_column")):
        if col not in names:
            raise AnalysisError(f"--annotations {path}: no column {col!r} ({flag}); the file has {names}")
    table = pq.read_table(path, columns=[id_column, annotations_column])
    out: dict[str, list[str]] = {}
    for row, (pid, value) in enumerate(
        zip(table.column(id_column).to_pylist(), table.column(annotations_column).to_pylist())
    ):
        pid = str(pid)
        if pid in out:
            raise AnalysisError(f"--annotations {path}: id {pid!r} appears twice (row {row})")
        out[pid] = as_annotations(value)
    return out


def save_labels(
    path: str,
    records: Sequence[Record],
    labels: Mapping[Key, bool],
    *,
    source: str,
    details: Mapping[Key, dict] | None = None,
) -> None:
    """Writes the labels used (one JSONL row per record), in the labels-file format plus audit fields."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            if r.key not in labels:
                continue
            row = {
                "benchmark": r.benchmark,
                "id": r.id,
                "perception_correct": int(labels[r.key]),
                "source": source,
                "model": r.data.get("model"),
            }
            row.update((details or {}).get(r.key, {}))
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
