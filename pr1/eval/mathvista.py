"""MathVista testmini (1,000 problems) from its released files.

Where it sits: `load_benchmark("mathvista", path)` -> `load`. Reads either form of the release:
  - Hugging Face AI4Math/MathVista `data/testmini-*.parquet` (columns pid, question, image,
    decoded_image {bytes, path}, choices, unit, precision, answer, question_type, answer_type,
    metadata {category, context, grade, img_height, img_width, language, skills, source, split,
    task}, query), or
  - GitHub lupantech/MathVista `data/testmini.json` (a dict pid -> the same record without
    decoded_image and query) with the images (`image` = "images/<pid>.jpg") beside it.

Question text: `question`, then " (Unit: <unit>)" when there is a unit, then for multiple choice
"\\nChoices:\\n(A) ...". This is the release's own `query` without its "Hint: Please answer the
question ... at the end." line (a format instruction; ours is appended by the runner) and without
the "Solution:" cue; the unit stays because it is part of what is asked.

Answers: multiple-choice answers are released as the option's TEXT; they become the letter of the
first option with that text (three testmini problems repeat an option; the answer check accepts
either letter of a repeated text). `precision` (decimals, float answers) and `unit` are kept.

Subsets: task, category, grade, context, source, language (from metadata), question_type,
answer_type, and skills: a problem has one to four skills, joined with "; " (see
problems.subset_values); like MathVista's own scoring, a problem counts towards each of its skills.
"""

from __future__ import annotations

from pr1.eval.problems import LETTERS, SUBSET_SEP, EvalProblem, check_limit, format_choices, locate
from pr1.eval.release_files import Row, collect, file_roots

NAME = "mathvista"
PATTERNS = ["data/testmini-*.parquet", "testmini-*.parquet", "data/testmini.json", "testmini.json"]
EXPECTED = """\
  data/testmini-*.parquet or testmini-*.parquet  (Hugging Face AI4Math/MathVista, images embedded), or
  testmini.json with images/<pid>.jpg beside it (GitHub lupantech/MathVista data/, images.zip from
  Hugging Face)"""
META_SUBSETS = ("task", "category", "grade", "context", "source", "language")


def load(path: str, *, limit: int | None = None) -> list[EvalProblem]:
    check_limit(limit)
    files = locate(path, PATTERNS, what="MathVista testmini", expected=EXPECTED)
    return collect(files, _problem, limit=limit, id_field="pid")


def _problem(row: Row) -> EvalProblem:
    row.rid = row.text("pid", required=False) or row.text("_key")
    question = row.text("question")
    qtype = row.text("question_type")
    answer = row.text("answer")
    unit = row.text("unit", required=False)
    choices = row.texts("choices", required=False)

    if qtype == "multi_choice":
        if not choices:
            raise row.error("choices", "a multi_choice question needs a non-empty list of choices")
        if answer not in choices:
            raise row.error("answer", f"{answer!r} is not one of the choices {choices}")
        gold, answer_type = LETTERS[choices.index(answer)], "choice"
    elif qtype == "free_form":
        gold, answer_type, choices = answer, "free", None
    else:
        raise row.error("question_type", f"expected multi_choice or free_form, got {qtype!r}")

    text = question + (f" (Unit: {unit})" if unit else "") + (format_choices(choices) if choices else "")
    return EvalProblem(
        benchmark=NAME,
        id=row.rid,
        question=text,
        images=(_image(row),),
        answer=gold,
        choices=tuple(choices) if choices else None,
        answer_type=answer_type,
        unit=unit,
        precision=_precision(row),
        subsets=_subsets(row, qtype),
    )


def _image(row: Row) -> bytes:
    roots = file_roots(row.path)
    if row.has("decoded_image"):
        return row.image_cell("decoded_image", row.data["decoded_image"], roots)
    return row.image_file("image", row.text("image"), roots)


def _precision(row: Row) -> int | None:
    value = row.data.get("precision")
    if value is None or value != value:  # null, or NaN in a pandas-written parquet
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or value != int(value):
        raise row.error("precision", f"expected a whole number of decimals, got {value!r}")
    return int(value)


def _subsets(row: Row, qtype: str) -> dict[str, str]:
    meta = row.record("metadata")
    out = {}
    for key in META_SUBSETS:
        value = meta.get(key)
        if not isinstance(value, str) or not value.strip():
            raise row.error(f"metadata.{key}", f"expected text, got {value!r}")
        out[key] = value.strip()
    skills = meta.get("skills")
    if not isinstance(skills, (list, tuple)) or not skills or not all(isinstance(s, str) for s in skills):
        raise row.error("metadata.skills", f"expected a non-empty list of skills, got {skills!r}")
    out["skills"] = SUBSET_SEP.join(s.strip() for s in skills)
    out["question_type"] = qtype
    out["answer_type"] = row.text("answer_type")
    return out
