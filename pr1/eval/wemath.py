"""WeMath testmini (525 problems, 1,740 questions) from its released files.

Where it sits: `load_benchmark("wemath", path)` -> `load`. Reads either form of the release:
  - GitHub We-Math/We-Math `data/testmini.json` (also on Hugging Face We-Math/We-Math): a list of
    records ID, split, "knowledge concept", question, option ("A. 300, 400;B. ..."), answer (a
    letter), image_path ("2steps/image/1-1.png", relative to the JSON's directory, or to the
    directory Hugging Face's testmini.zip was unpacked into: testmini/ or images/ beside it), key,
    "question number", "knowledge concept description"; or
  - Hugging Face `data/testmini-*.parquet` with the same fields and the image embedded as a
    {bytes, path} struct in `image_path` (or in `image` / `decoded_image`; its column names could not
    be checked here, so any of these is accepted).

Structure: each multi-step problem (ID "2steps_17", "3steps_4") is asked as its one-step
sub-questions (key "2steps_1", "2steps_2" / "3steps_1".."3steps_3") and as the whole problem
(key "2steps_multi" / "3steps_multi"); testmini has 360 two-step and 165 three-step problems. ID
is therefore shared by the rows of one problem; `question number` (1..1740) is unique and is the
problem's `id` here.

Question text: `question` + "\\nChoices:\\n(A) ..." from the `option` string. The release separates
options with ";" but has a few typos (a missing ";", a stray ";" inside an option such as
"point ;O.", a fourth option labelled "F."): options are found by their letters in order and
relabelled A, B, ...; when that fails the raw string is shown ("\\nOptions: ...") and `choices` is
None. Answers are letters.

Subsets: knowledge (the knowledge concept), steps ("one-step" for sub-questions, "two-step" /
"three-step" for the whole problems: WeMath's S1/S2/S3), and, to regroup rows for WeMath's
four-dimensional score (IK/IG/CM/RM), key, problem_id (ID) and question_number.
"""

from __future__ import annotations

import re

from pr1.eval.problems import LETTERS, EvalProblem, check_limit, format_choices, locate
from pr1.eval.release_files import Row, collect, file_roots

NAME = "wemath"
PATTERNS = ["data/testmini-*.parquet", "testmini-*.parquet", "testmini.json", "data/testmini.json"]
EXPECTED = """\
  data/testmini-*.parquet or testmini-*.parquet  (Hugging Face We-Math/We-Math, images embedded), or
  testmini.json with the image folders (2steps/, 3steps/) beside it (GitHub We-Math/We-Math data/)
  or in testmini/ or images/ beside it (Hugging Face testmini.zip)"""
STEPS = {"1": "one-step", "2": "two-step", "3": "three-step"}
_KEY = re.compile(r"([123])steps?_(\d+|multi)")
_ANY_MARK = re.compile(r";\s*\(?([A-H])\)?\s*[.．](?!\s*;)\s*")


def load(path: str, *, limit: int | None = None) -> list[EvalProblem]:
    check_limit(limit)
    files = locate(path, PATTERNS, what="WeMath testmini", expected=EXPECTED)
    return collect(files, _problem, limit=limit, id_field="question number")


def split_options(text: str) -> list[str] | None:
    """Option texts of a release `option` string, in order; None unless it starts with "A." and
    has at least two options."""
    marks = []
    pos = 0
    while len(marks) < len(LETTERS):
        letter = LETTERS[len(marks)]
        # A label starts the string or follows ";" / whitespace, and is not itself followed by ";"
        # (the release's stray ";X." inside option texts).
        m = re.compile(rf"(?:^|(?<=[;\s]))\(?{letter}\)?\s*[.．](?!\s*;)\s*").search(text, pos)
        if m is None and marks:
            m = _ANY_MARK.search(text, pos)  # a mislabelled option ("C. No.; F. No correct answer")
        if m is None:
            break
        marks.append(m)
        pos = m.end()
    if len(marks) < 2 or text[: marks[0].start()].strip():
        return None
    ends = [m.start() for m in marks[1:]] + [len(text)]
    options = [_clean_option(text[m.end() : end]) for m, end in zip(marks, ends)]
    return options if all(options) else None


def _clean_option(text: str) -> str:
    text = text.strip().rstrip(";").strip()
    return re.sub(r";(?=[A-Z][.．]\s*$)", "", text)  # "point ;O." -> "point O."


def steps_of(key: str) -> str | None:
    m = _KEY.fullmatch(key)
    if not m:
        return None
    return STEPS["1"] if m.group(2) != "multi" else STEPS[m.group(1)]


def _problem(row: Row) -> EvalProblem:
    row.rid = row.text("question number")
    problem_id = row.text("ID")
    key = row.text("key")
    steps = steps_of(key)
    if steps is None:
        raise row.error("key", f"expected <n>steps_<k> or <n>steps_multi, got {key!r}")
    question = row.text("question")
    answer = row.text("answer").strip("() .")
    if not re.fullmatch(r"[A-Z]", answer):
        raise row.error("answer", f"expected an option letter, got {answer!r}")
    option = row.text("option")
    choices = split_options(option)
    if choices and LETTERS.index(answer) < len(choices):
        question += format_choices(choices)
    else:
        choices = None
        question += "\nOptions: " + option

    subsets = {
        "knowledge": row.text("knowledge concept"),
        "steps": steps,
        "key": key,
        "problem_id": problem_id,
        "question_number": row.rid,
    }
    return EvalProblem(
        benchmark=NAME,
        id=row.rid,
        question=question,
        images=(_image(row),),
        answer=answer,
        choices=tuple(choices) if choices else None,
        answer_type="choice",
        subsets=subsets,
    )


def _image(row: Row) -> bytes:
    roots = file_roots(row.path, "testmini", "images", "data")
    for field in ("image_path", "image", "decoded_image"):
        if row.has(field):
            return row.image_cell(field, row.data[field], roots)
    raise row.error("image_path", "missing (no image_path, image or decoded_image field)")
