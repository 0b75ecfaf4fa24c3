"""Evaluation problems from parquet files in our own training layout (`load_benchmark("parquet")`).

Where it sits: the registry (`registry.load_benchmark`) calls `load_parquet_problems` for
"parquet" / "parquet:<name>". Rows are read and checked by the training pipeline's parquet reader,
so a held-out split of the training data is evaluated exactly as it would be trained on; images
are read like the releases' image cells (`release_files.image_from_cell`).
"""

from __future__ import annotations

import collections
import os
import re

import pyarrow.parquet as pq

from pr1.data.config import data_config
from pr1.data.rows import DataError, ParquetRows
from pr1.eval.problems import LETTERS, EvalProblem, check_limit, format_choices, locate, row_error
from pr1.eval.release_files import image_from_cell

PARQUET = "parquet"  # our own layout: "parquet" (named after the file) or "parquet:<name>"

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
