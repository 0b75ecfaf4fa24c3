"""Evaluation problems: the `EvalProblem` record, our own parquet layout, and `load_benchmark`.

Where it sits: `load_benchmark(name, path)` turns local copies of a benchmark release (MathVista,
MathVerse, MathVision, WeMath; one module each) or a parquet file in the training layout into a
list of `EvalProblem`s; the runner prompts the model with `question` plus the training format
instruction, and `answers.check_answer` scores each response against `answer`. Nothing here
downloads: docs/eval_data.md says which released files to put where.

Every malformed row is a `DataError` (the training data's error type) naming the file, the row, the
release's id when known, and the field.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import importlib
import os
import re
import string
from typing import Any

import pyarrow.parquet as pq

from pr1.data.dataset import DataError, ParquetRows, data_config

LETTERS = string.ascii_uppercase
# The question of a problem whose whole text is drawn in its image (MathVerse Vision Only, MathVision 528).
IMAGE_ONLY_QUESTION = "Answer the question shown in the image."

# Released benchmarks: name -> module with `EXPECTED` (the files it looks for) and `load(path, limit)`.
BENCHMARKS = {
    "mathvista": "pr1.eval.mathvista",
    "mathverse": "pr1.eval.mathverse",
    "mathvision": "pr1.eval.mathvision",
    "wemath": "pr1.eval.wemath",
}
PARQUET = "parquet"  # our own layout: "parquet" (named after the file) or "parquet:<name>"

# A subset value holding several values (MathVista's skills) joins them with this separator; a problem
# counts towards each of them, as in MathVista's own scoring. `subset_values` splits them again.
MULTI_VALUED_SUBSETS = frozenset({"skills"})
SUBSET_SEP = "; "
# Subset keys that identify problems (to regroup rows, e.g. WeMath's four-dimensional score) rather
# than split a benchmark into parts: a breakdown by them would have one bucket per problem.
IDENTIFIER_SUBSETS = frozenset({"problem_id", "question_number"})


@dataclasses.dataclass(frozen=True)
class EvalProblem:
    """One benchmark problem as the model sees it and as the answer check needs it."""

    benchmark: str  # "mathvista" | "mathverse" | "mathvision" | "wemath" | "parquet:<name>"
    id: str  # unique within the benchmark (the release's own id)
    question: str  # shown to the model, choices included, no format instruction
    images: tuple[bytes, ...]  # encoded image files in order; usually one (none for MathVerse Text Only)
    answer: str  # gold answer; for multiple choice the letter ("B")
    choices: tuple[str, ...] | None = None  # option texts in letter order, multiple choice only
    answer_type: str = "free"  # "choice" | "free"
    unit: str | None = None  # MathVista free-form unit, e.g. "cm"
    precision: int | None = None  # MathVista float answers: decimals to round to
    subsets: dict[str, str] = dataclasses.field(default_factory=dict)
    visual_annotations: tuple[str, ...] = ()  # our own parquet layout, from visual_key_info

    def __post_init__(self):
        if self.answer_type not in ("choice", "free"):
            raise ValueError(
                f"problem {self.benchmark}/{self.id}: answer_type must be 'choice' or 'free', "
                f"got {self.answer_type!r}"
            )


def subset_values(problem: EvalProblem, key: str) -> list[str]:
    """The values `problem` counts towards under breakdown `key` (several for multi-valued keys)."""
    value = problem.subsets.get(key)
    if value is None:
        return []
    if key in MULTI_VALUED_SUBSETS:
        return [v for v in value.split(SUBSET_SEP) if v]
    return [value]


def format_choices(choices) -> str:
    """The choices block appended to a question: "\\nChoices:\\n(A) 3\\n(B) 4" (MathVista's own layout)."""
    return "\nChoices:\n" + "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))


def row_error(path: str, row: int, field: str, detail: str, *, rid: str | None = None) -> DataError:
    """A DataError naming file, row (0-based position in the file), the release id and the field."""
    where = f"row {row}" + (f" (id {rid})" if rid is not None else "")
    return DataError(
        f"{path}: {where}: field '{field}': {detail}", path=path, row=row, field=field, reason="bad_row"
    )


def check_limit(limit: int | None) -> int | None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    return limit


def locate(path: str, patterns: list[str], *, what: str, expected: str) -> list[str]:
    """`path` itself if it is a file, else the files of the first pattern (globs relative to the
    directory) that matches anything; a DataError listing `expected` when nothing does."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such file or directory; {what} expects:\n{expected}", path=path)
    for pattern in patterns:
        found = sorted(f for f in glob.glob(os.path.join(path, pattern)) if os.path.isfile(f))
        if found:
            return found
    raise DataError(f"{path}: no {what} files found; expected one of:\n{expected}", path=path)


def load_benchmark(name: str, path: str, *, limit: int | None = None) -> list[EvalProblem]:
    """Problems of benchmark `name` from local files at `path` (a file or a directory).

    name: "mathvista" (testmini), "mathverse" (testmini), "mathvision" (test), "wemath" (testmini),
    or "parquet" / "parquet:<name>" for our own training layout. JSON vs parquet is told from the
    file names; a directory is searched for the release's files (see docs/eval_data.md).
    limit: the first `limit` problems in file order (None: all).
    """
    check_limit(limit)
    key = name.strip().lower()
    if key == PARQUET or key.startswith(PARQUET + ":"):
        label = name.strip()[len(PARQUET) + 1 :] or None
        return load_parquet_problems(path, label, limit=limit)
    if key not in BENCHMARKS:
        raise ValueError(
            f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}, "
            f"{PARQUET} or {PARQUET}:<name> (our own parquet layout)"
        )
    module = importlib.import_module(BENCHMARKS[key])
    return module.load(path, limit=limit)


# ---- our own layout --------------------------------------------------------------------------

_PARQUET_EXPECTED = (
    "  *.parquet in the training layout (problem, answer, images; optional visual_key_info, choices, id)"
)


def load_parquet_problems(
    path: str,
    name: str | None = None,
    *,
    limit: int | None = None,
    id_key: str = "id",
    choices_key: str = "choices",
) -> list[EvalProblem]:
    """Problems from parquet files in the training layout (see pr1.data.dataset).

    Rows are read and checked by the training pipeline's `ParquetRows` (problem text with `<image>`
    placeholders removed, answer, visual annotations); images are returned encoded. Optional columns:
    `id` (default: the row number, prefixed by the file name when there are several files) and
    `choices` (option texts; the answer may then be a letter or an option's text).
    """
    check_limit(limit)
    files = locate(path, ["*.parquet"], what="parquet", expected=_PARQUET_EXPECTED)
    label = name or os.path.splitext(os.path.basename(files[0]))[0]
    out: list[EvalProblem] = []
    for f in files:
        prefix = "" if len(files) == 1 else os.path.basename(f) + ":"
        out += _parquet_file(
            f, f"{PARQUET}:{label}", prefix, id_key, choices_key, None if limit is None else limit - len(out)
        )
        if limit is not None and len(out) >= limit:
            break
    counts = collections.Counter(p.id for p in out)
    if dup := sorted(i for i, n in counts.items() if n > 1)[:5]:
        raise DataError(
            f"{path}: column '{id_key}' repeats ids {dup}; ids must be unique", path=path, field=id_key
        )
    return out


def _parquet_file(
    path: str, benchmark: str, prefix: str, id_key: str, choices_key: str, limit: int | None
) -> list[EvalProblem]:
    from pr1.eval.benchmarks import image_from_cell  # the release loaders read image cells the same way

    schema = pq.read_schema(path)
    cfg = data_config()
    cfg.images_key = "images" if "images" in schema.names else ""
    cfg.annotations_key = "visual_key_info" if "visual_key_info" in schema.names else ""
    parsed = ParquetRows([path], cfg, skip_bad_rows=False).files[0]
    extra = [c for c in (id_key, choices_key) if c in schema.names]
    side = pq.read_table(path, columns=extra).to_pydict() if extra else {}
    roots = [os.path.dirname(os.path.abspath(path))]
    out = []
    for r in range(len(parsed.questions))[:limit]:
        own_id = side[id_key][r] if id_key in side else None
        rid = prefix + str(r if own_id is None else own_id)
        images = ()
        if parsed.images is not None:
            cell = parsed.images[r].as_py()
            items = [x for x in (cell if isinstance(cell, list) else [cell]) if x is not None]
            images = tuple(
                image_from_cell(path, r, f"images[{k}]", x, roots, rid=rid) for k, x in enumerate(items)
            )
        question, answer, answer_type = parsed.questions[r], parsed.answers[r], "free"
        choices = side[choices_key][r] if choices_key in side else None
        if choices:
            choices = tuple(str(c).strip() for c in choices)
            answer, answer_type = _choice_letter(path, r, rid, answer, choices), "choice"
            question += format_choices(choices)
        out.append(
            EvalProblem(
                benchmark=benchmark,
                id=rid,
                question=question,
                images=images,
                answer=answer,
                choices=choices or None,
                answer_type=answer_type,
                visual_annotations=tuple(parsed.annotations[r]),
            )
        )
    return out


def _choice_letter(path: str, row: int, rid: str, answer: str, choices: tuple[str, ...]) -> str:
    m = re.fullmatch(r"\(?([A-Z])\)?", answer.strip())
    if m and LETTERS.index(m.group(1)) < len(choices):
        return m.group(1)
    if answer.strip() in choices:
        return LETTERS[choices.index(answer.strip())]
    raise row_error(
        path,
        row,
        "answer",
        f"{answer!r} is neither an option letter A-{LETTERS[len(choices) - 1]} "
        f"nor one of the choices {list(choices)}",
        rid=rid,
    )


def as_text(value: Any) -> str | None:
    """A cell as stripped text (numbers as their shortest form); None for null/empty."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        if value != value:  # NaN: pandas-written parquet's null
            return None
        value = int(value) if value.is_integer() else value
    text = str(value).strip()
    return text or None
