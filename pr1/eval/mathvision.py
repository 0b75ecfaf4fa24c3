"""MathVision (MATH-V) test (3,040 problems) from its released files.

Where it sits: `load_benchmark("mathvision", path)` -> `load`. Reads either form of the release:
  - Hugging Face MathLLMs/MathVision `data/test-*.parquet` (columns id, question, options, image,
    decoded_image {bytes, path}, answer, solution, level, subject), or
  - GitHub mathllm/MATH-V `data/test.jsonl` (the same records without decoded_image) with
    `images/<id>.jpg` (the `image` field) beside data/ or beside the JSONL.
testmini (304 problems) has the same layout: pass its file (data/testmini.jsonl or
data/testmini-*.parquet) explicitly.

Question text: `question` with its `<image1>`, `<image2>`, ... placeholders removed. Every test
problem has exactly one image file (checked on the release: 3,040 rows, one `images/<id>.jpg` each);
the numbered placeholders (up to 8 in one question) point at parts of that single picture, so none
can be replaced by a separate image. Multiple-choice problems (non-empty `options`, answer a letter)
get "\\nChoices:\\n(A) ..."; when the options are just their own letters (384 problems: the option
pictures are in the image) the block is "\\nChoices: (A) (B) (C) (D) (E)". One question (id 528) is
only "<image1>"; it gets problems.IMAGE_ONLY_QUESTION.

Answers: as released, except that a JSON "\\f" escape that ate the backslash of "\\frac" (a form
feed, in one answer) is read back as "\\f". A few free-form answers are letters (the options are drawn
in the image); the answer check accepts letter forms for those too.

Subsets: subject, level ("1".."5").
"""

from __future__ import annotations

import re

from pr1.eval.problems import IMAGE_ONLY_QUESTION, LETTERS, EvalProblem, check_limit, format_choices, locate
from pr1.eval.release_files import Row, collect, file_roots

NAME = "mathvision"
PATTERNS = ["data/test-*.parquet", "test-*.parquet", "data/test.jsonl", "test.jsonl"]
EXPECTED = """\
  data/test-*.parquet or test-*.parquet  (Hugging Face MathLLMs/MathVision, images embedded), or
  data/test.jsonl with images/<id>.jpg beside data/ (GitHub mathllm/MATH-V layout) or beside the JSONL"""

_PLACEHOLDER = re.compile(r"<image\d+>")


def load(path: str, *, limit: int | None = None) -> list[EvalProblem]:
    check_limit(limit)
    files = locate(path, PATTERNS, what="MathVision test", expected=EXPECTED)
    return collect(files, _problem, limit=limit, id_field="id")


def clean_question(text: str) -> str:
    """The question without `<imageK>` placeholders; whitespace left by them collapsed."""
    text = _PLACEHOLDER.sub(" ", text)
    lines = [
        re.sub(r" ([.,;:?!])", r"\1", re.sub(r"[ \t]+", " ", line)).strip()
        for line in text.replace("\r\n", "\n").split("\n")
    ]
    return "\n".join(line for line in lines if line)


def _unescape(text: str) -> str:
    # JSON decodes "\frac" written without a doubled backslash as form feed + "rac".
    return text.replace("\x0c", "\\f")


def _problem(row: Row) -> EvalProblem:
    # Before any stripping: the form feed is whitespace and would vanish with the "\\f".
    row.data = {
        k: _unescape(v)
        if isinstance(v, str)
        else [_unescape(x) if isinstance(x, str) else x for x in v]
        if isinstance(v, list)
        else v
        for k, v in row.data.items()
    }
    row.rid = row.text("id")
    question = clean_question(row.text("question")) or IMAGE_ONLY_QUESTION  # id 528 is only "<image1>"
    answer = row.text("answer")
    options = row.texts("options", required=False) or []

    if options:
        if not re.fullmatch(r"[A-Z]", answer) or LETTERS.index(answer) >= len(options):
            raise row.error(
                "answer", f"{answer!r} is not one of the option letters A-{LETTERS[len(options) - 1]}"
            )
        if options == list(LETTERS[: len(options)]):
            question += "\nChoices: " + " ".join(f"({x})" for x in options)
        else:
            question += format_choices(options)
        choices, answer_type = tuple(options), "choice"
    else:
        choices, answer_type = None, "free"

    roots = file_roots(row.path)
    if row.has("decoded_image"):
        image = row.image_cell("decoded_image", row.data["decoded_image"], roots)
    else:
        image = row.image_file("image", row.text("image"), roots)
    subsets = {"subject": row.text("subject"), "level": row.text("level")}
    return EvalProblem(
        benchmark=NAME,
        id=row.rid,
        question=question,
        images=(image,),
        answer=answer,
        choices=choices,
        answer_type=answer_type,
        subsets=subsets,
    )
