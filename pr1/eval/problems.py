"""Evaluation problems: the `EvalProblem` record and the helpers every benchmark loader shares.

Where it sits: `registry.load_benchmark(name, path)` turns local copies of a benchmark release (MathVista,
MathVerse, MathVision, WeMath; one module each) or a parquet file in the training layout into a
list of `EvalProblem`s; the runner prompts the model with `question` plus the training format
instruction, and `answers.check_answer` scores each response against `answer`. Nothing here
downloads: docs/eval_data.md says which released files to put where.

Every malformed row is a `DataError` (the training data's error type) naming the file, the row, the
release's id when known, and the field.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import string
from typing import Any

from pr1.data.rows import DataError

LETTERS = string.ascii_uppercase
# The question of a problem whose whole text is drawn in its image (MathVerse Vision Only, MathVision 528).
IMAGE_ONLY_QUESTION = "Answer the question shown in the image."

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
