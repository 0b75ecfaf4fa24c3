"""MathVerse testmini (788 problems x 5 versions = 3,940 rows) from its released files.

Where it sits: `load_benchmark("mathverse", path)` -> `load`. Reads either form of the release
(Hugging Face AI4Math/MathVerse):
  - `testmini.parquet` (columns sample_index, problem_index, problem_version, question, image
    {bytes, path}, answer, question_type, metadata {split, source, subject, subfield}, query_wo,
    query_cot, question_for_eval), or
  - `testmini.json` (a list of the same records; `image` is a path such as
    "images_version_1-4/image_685.png", relative to the directory images.zip was unpacked into:
    beside the JSON or in images/ beside it).
A directory load reads testmini only. The separate Text Only version (`testmini_text_only.json` /
`.parquet`, no image, `image` == "") is read when that file is given explicitly; its ids are
"text_only-<sample_index>" because its sample indices repeat those of testmini.

Question text: `question` as released. Multiple-choice questions already end with their choices
("...\\nChoices:\\nA:40°\\nB:60°"), so nothing is appended. `query_wo` / `query_cot` are not used:
they are `question` behind MathVerse's own answer-format instruction. Vision Only rows have an empty
`question` (the whole problem is drawn in the image); they get the neutral text
"Answer the question shown in the image." (`VISION_ONLY_QUESTION`).

Choices: parsed from the "Choices:" block of `question` (or of `question_for_eval`, which spells out
the Vision Only question) when every line is "<letter>: text" / "<letter>. text" in order; else None
(the answer check then accepts letters only). Gold answers are letters, except a few released as
"(C)", as an option's text, or as two letters ("C\\nD" -> "C,D"); these are normalized, and the
mojibake "掳" in some answers is read as "°".

Subsets: problem_version, subject, subfield, question_type.
"""

from __future__ import annotations

import re

from pr1.eval.problems import IMAGE_ONLY_QUESTION, LETTERS, EvalProblem, check_limit, locate
from pr1.eval.release_files import Row, collect, file_roots

NAME = "mathverse"
PATTERNS = [
    "testmini.parquet",
    "testmini-*.parquet",
    "data/testmini-*.parquet",
    "testmini.json",
    "data/testmini.json",
]
EXPECTED = """\
  testmini.parquet  (Hugging Face AI4Math/MathVerse, images embedded), or
  testmini.json with the unpacked images.zip beside it or in images/
  (the Text Only version: pass testmini_text_only.json or .parquet itself)"""
TEXT_ONLY = "Text Only"
VISION_ONLY_QUESTION = IMAGE_ONLY_QUESTION

_CHOICES = re.compile(r"(?:^|\n)[ \t]*Choices?[ \t]*[:：][ \t]*\n(.*)\Z", re.DOTALL | re.IGNORECASE)
_OPTION = re.compile(r"\(?([A-Z])\)?[ \t]*[:.．：)][ \t]*(.*)")
_LETTERS_ONLY = re.compile(r"\(?[A-H]\)?(?:[\s,;、]*(?:and\s+)?\(?[A-H]\)?)*[.]?")


def load(path: str, *, limit: int | None = None) -> list[EvalProblem]:
    check_limit(limit)
    files = locate(path, PATTERNS, what="MathVerse testmini", expected=EXPECTED)
    return collect(files, _problem, limit=limit, id_field="sample_index")


def parse_choices(text: str) -> list[str] | None:
    """Option texts of a trailing "Choices:" block, A, B, ... in order; None unless it parses cleanly."""
    m = _CHOICES.search(text or "")
    if not m:
        return None
    lines = [line.strip() for line in m.group(1).split("\n") if line.strip()]
    choices = []
    for line in lines:
        opt = _OPTION.fullmatch(line)
        if not opt or opt.group(1) != LETTERS[len(choices)] or not opt.group(2).strip():
            return None
        choices.append(opt.group(2).strip())
    return choices if len(choices) >= 2 else None


def gold_answer(answer: str, choices: list[str] | None) -> str:
    """The released multiple-choice answer as a letter ("C"), letters ("C,D"), or as released."""
    answer = answer.strip().replace("掳", "°")
    if _LETTERS_ONLY.fullmatch(answer):
        letters = list(dict.fromkeys(re.findall(r"[A-H]", answer)))
        if not choices or all(LETTERS.index(x) < len(choices) for x in letters):
            return ",".join(letters)
    if choices:
        squash = [re.sub(r"\s+", "", c) for c in choices]
        if re.sub(r"\s+", "", answer) in squash:
            return LETTERS[squash.index(re.sub(r"\s+", "", answer))]
    return answer


def _problem(row: Row) -> EvalProblem:
    sid = row.text("sample_index")
    row.rid = sid
    version = row.text("problem_version")
    qtype = row.text("question_type")
    question = row.text("question", required=False) or ""
    answer = row.text("answer")
    meta = row.record("metadata")

    value = row.data.get("image")
    empty = value in (None, "") or (
        isinstance(value, dict) and not value.get("bytes") and not value.get("path")
    )
    if empty and version != TEXT_ONLY:
        raise row.error("image", f"missing; only {TEXT_ONLY} problems come without an image")
    images = () if empty else (row.image_cell("image", value, file_roots(row.path, "images")),)

    if qtype == "multi-choice":
        choices = parse_choices(question) or parse_choices(
            row.text("question_for_eval", required=False) or ""
        )
        gold, answer_type = gold_answer(answer, choices), "choice"
    elif qtype == "free-form":
        choices, gold, answer_type = None, answer.replace("掳", "°"), "free"
    else:
        raise row.error("question_type", f"expected multi-choice or free-form, got {qtype!r}")

    subsets = {"problem_version": version, "question_type": qtype}
    for key in ("subject", "subfield"):
        if not isinstance(meta.get(key), str) or not meta[key].strip():
            raise row.error(f"metadata.{key}", f"expected text, got {meta.get(key)!r}")
        subsets[key] = meta[key].strip()
    return EvalProblem(
        benchmark=NAME,
        id=sid if version != TEXT_ONLY else f"text_only-{sid}",
        question=question or VISION_ONLY_QUESTION,
        images=images,
        answer=gold,
        choices=tuple(choices) if choices else None,
        answer_type=answer_type,
        subsets=subsets,
    )
