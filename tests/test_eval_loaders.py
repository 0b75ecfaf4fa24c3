"""Benchmark loaders on tiny files written in each release's own format (JSON + images, parquet).

Every expected value here is written by hand from the fixture rows, not taken from the loaders.
"""

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pr1.data.rows import DataError
from pr1.eval import load_benchmark, subset_values
from pr1.eval.mathverse import VISION_ONLY_QUESTION


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (2, 3), (seed * 40 % 256, 7, 200)).save(buf, format="PNG")
    return buf.getvalue()


def write_file(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_parquet(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


# ---- MathVista -----------------------------------------------------------------------------


def mathvista_records():
    meta = dict(
        split="testmini",
        language="english",
        img_width=2,
        img_height=3,
        source="Geometry3K",
        category="math-targeted-vqa",
        task="geometry problem solving",
        context="geometry diagram",
        grade="high school",
        skills=["geometry reasoning", "algebraic reasoning"],
    )
    return {
        "7": dict(
            pid="7",
            question="Find the length of AC.",
            image="images/7.jpg",
            choices=["3 cm", "4 cm", "5 cm"],
            unit=None,
            precision=None,
            answer="4 cm",
            question_type="multi_choice",
            answer_type="text",
            metadata=meta,
        ),
        "8": dict(
            pid="8",
            question="What is the slope?",
            image="images/8.jpg",
            choices=None,
            unit=None,
            precision=2,
            answer="1.24",
            question_type="free_form",
            answer_type="float",
            metadata=dict(meta, skills=["algebraic reasoning"], task="figure question answering"),
        ),
        "9": dict(
            pid="9",
            question="How old is the tree?",
            image="images/9.jpg",
            choices=None,
            unit="years",
            precision=None,
            answer="12",
            question_type="free_form",
            answer_type="integer",
            metadata=dict(meta, skills=["numeric commonsense"], grade="elementary school"),
        ),
    }


def check_mathvista(problems):
    assert [p.id for p in problems] == ["7", "8", "9"]
    mc, fl, unit = problems
    assert mc.benchmark == "mathvista"
    assert mc.question == "Find the length of AC.\nChoices:\n(A) 3 cm\n(B) 4 cm\n(C) 5 cm"
    assert (mc.answer, mc.choices, mc.answer_type) == ("B", ("3 cm", "4 cm", "5 cm"), "choice")
    assert mc.images == (png(7),)
    assert mc.subsets["task"] == "geometry problem solving" and mc.subsets["grade"] == "high school"
    assert mc.subsets["question_type"] == "multi_choice" and mc.subsets["source"] == "Geometry3K"
    assert subset_values(mc, "skills") == ["geometry reasoning", "algebraic reasoning"]
    assert (fl.question, fl.answer, fl.precision, fl.choices, fl.answer_type) == (
        "What is the slope?",
        "1.24",
        2,
        None,
        "free",
    )
    assert fl.subsets["answer_type"] == "float" and subset_values(fl, "skills") == ["algebraic reasoning"]
    assert (unit.question, unit.unit, unit.answer, unit.precision) == (
        "How old is the tree? (Unit: years)",
        "years",
        "12",
        None,
    )
    assert unit.images == (png(9),)
    for p in problems:
        assert "Hint" not in p.question


def test_mathvista_github_json(tmp_path):
    root = tmp_path / "data"
    write_file(str(root / "testmini.json"), json.dumps(mathvista_records()).encode())
    for pid in (7, 8, 9):
        write_file(str(root / "images" / f"{pid}.jpg"), png(pid))
    check_mathvista(load_benchmark("mathvista", str(tmp_path)))  # found under data/
    check_mathvista(load_benchmark("mathvista", str(root / "testmini.json")))
    assert [p.id for p in load_benchmark("mathvista", str(root), limit=2)] == ["7", "8"]


def test_mathvista_hf_parquet(tmp_path):
    rows = []
    for pid, r in mathvista_records().items():
        rows.append(
            dict(
                r,
                precision=None if r["precision"] is None else float(r["precision"]),
                decoded_image={"bytes": png(int(pid)), "path": f"{pid}.jpg"},
                query="Hint: Please answer the question and provide the final value at the end.\n"
                f"Question: {r['question']}",
            )
        )
    write_parquet(str(tmp_path / "data" / "testmini-00000-of-00001.parquet"), rows)
    check_mathvista(load_benchmark("MathVista", str(tmp_path)))


def test_mathvista_errors_name_file_row_and_field(tmp_path):
    records = mathvista_records()
    path = tmp_path / "testmini.json"
    write_file(str(path), json.dumps(records).encode())
    write_file(str(tmp_path / "images" / "7.jpg"), png(7))
    with pytest.raises(DataError) as e:  # 8.jpg was never written
        load_benchmark("mathvista", str(tmp_path))
    msg = str(e.value)
    assert (
        str(path) in msg and "row 1" in msg and "id 8" in msg and "'image'" in msg and "images/8.jpg" in msg
    )

    del records["8"]["answer"]
    write_file(str(path), json.dumps(records).encode())
    with pytest.raises(DataError, match=r"testmini\.json: row 1 \(id 8\): field 'answer'"):
        load_benchmark("mathvista", str(path))

    records = mathvista_records()
    records["7"]["answer"] = "6 cm"
    write_file(str(path), json.dumps(records).encode())
    with pytest.raises(DataError, match=r"row 0 \(id 7\): field 'answer': '6 cm' is not one of the choices"):
        load_benchmark("mathvista", str(path))


def test_unknown_benchmark_and_empty_directory(tmp_path):
    with pytest.raises(
        ValueError, match="unknown benchmark 'mathvista2'.*mathvista, mathverse, mathvision, wemath"
    ):
        load_benchmark("mathvista2", str(tmp_path))
    with pytest.raises(
        DataError, match=r"no MathVision test files found; expected one of:\n.*test-\*\.parquet"
    ):
        load_benchmark("mathvision", str(tmp_path))
    with pytest.raises(ValueError, match="limit"):
        load_benchmark("mathvista", str(tmp_path), limit=0)


# ---- MathVerse -----------------------------------------------------------------------------


def mathverse_records():
    meta = dict(split="testmini", source="GeoQA", subject="Plane Geometry", subfield="Angle")
    return [
        dict(
            sample_index="1",
            problem_index="1",
            problem_version="Text Dominant",
            question="As shown in the figure, angle A = 80.0, then angle CED is ()\n"
            "Choices:\nA:40°\nB:60°\nC:120°\nD:140°",
            image="images_version_1-4/image_1.png",
            answer="B",
            question_type="multi-choice",
            metadata=meta,
            query_wo="Please directly answer the question and provide the correct option letter, "
            "e.g., A, B, C, D.\n"
            "Question: ...",
            query_cot="...",
            question_for_eval="...",
        ),
        dict(
            sample_index="5",
            problem_index="1",
            problem_version="Vision Only",
            question="",
            image="images_version_6/image_1.png",
            answer="(C)",
            question_type="multi-choice",
            metadata=dict(meta, subject="Solid Geometry", subfield="Length"),
            query_wo="According to the question shown in the image, please directly answer the question.",
            query_cot="...",
            question_for_eval="Find angle CED.\nChoices:\nA:40°\nB:60°\nC:120°\nD:140°",
        ),
        dict(
            sample_index="9",
            problem_index="2",
            problem_version="Vision Intensive",
            question="Find the length of the straw.",
            image="images_version_1-4/image_2.png",
            answer="14",
            question_type="free-form",
            metadata=dict(meta, subfield="Length"),
            query_wo="...",
            query_cot="...",
            question_for_eval="Find the length of the straw.",
        ),
    ]


def check_mathverse(problems):
    assert [p.id for p in problems] == ["1", "5", "9"]
    td, vo, free = problems
    assert td.question == (
        "As shown in the figure, angle A = 80.0, then angle CED is ()\nChoices:\nA:40°\nB:60°\nC:120°\nD:140°"
    )
    assert (td.answer, td.choices, td.answer_type) == ("B", ("40°", "60°", "120°", "140°"), "choice")
    assert td.subsets == {
        "problem_version": "Text Dominant",
        "subject": "Plane Geometry",
        "subfield": "Angle",
        "question_type": "multi-choice",
    }
    assert td.images == (png(1),)
    assert vo.question == VISION_ONLY_QUESTION == "Answer the question shown in the image."
    # released as "(C)"; the choices come from question_for_eval
    assert (vo.answer, vo.choices) == ("C", ("40°", "60°", "120°", "140°"))
    assert vo.subsets["problem_version"] == "Vision Only" and vo.subsets["subject"] == "Solid Geometry"
    assert vo.images == (png(6),)
    assert (free.question, free.answer, free.answer_type, free.choices) == (
        "Find the length of the straw.",
        "14",
        "free",
        None,
    )
    assert free.images == (png(2),)


def test_mathverse_json_and_text_only(tmp_path):
    write_file(str(tmp_path / "testmini.json"), json.dumps(mathverse_records()).encode())
    write_file(str(tmp_path / "images" / "images_version_1-4" / "image_1.png"), png(1))
    write_file(str(tmp_path / "images" / "images_version_6" / "image_1.png"), png(6))
    write_file(str(tmp_path / "images" / "images_version_1-4" / "image_2.png"), png(2))
    text_only = [dict(mathverse_records()[0], problem_version="Text Only", image="")]
    write_file(str(tmp_path / "testmini_text_only.json"), json.dumps(text_only).encode())

    check_mathverse(load_benchmark("mathverse", str(tmp_path)))  # a directory reads testmini only
    (t,) = load_benchmark("mathverse", str(tmp_path / "testmini_text_only.json"))
    assert (t.id, t.images, t.answer, t.subsets["problem_version"]) == ("text_only-1", (), "B", "Text Only")

    records = mathverse_records()
    records[2]["image"] = ""
    write_file(str(tmp_path / "testmini.json"), json.dumps(records).encode())
    with pytest.raises(DataError, match=r"row 2 \(id 9\): field 'image': missing; only Text Only"):
        load_benchmark("mathverse", str(tmp_path))


def test_mathverse_hf_parquet(tmp_path):
    rows = []
    for r, seed in zip(mathverse_records(), (1, 6, 2)):
        rows.append(dict(r, image={"bytes": png(seed), "path": r["image"]}))
    write_parquet(str(tmp_path / "testmini.parquet"), rows)
    check_mathverse(load_benchmark("mathverse", str(tmp_path)))


# ---- MathVision ----------------------------------------------------------------------------

# As in the release: MC answers are letters; options may be the bare letters (pictures in the image);
# a JSON "\f" ate the backslash of "\frac" in one answer.
MATHVISION_LINES = [
    r'{"id": "1", "question": "Which number should be written in place of the question mark?\n<image1>", '
    r'"options": [], "answer": "60", "solution": null, "level": 2, "subject": "arithmetic", '
    r'"image": "images/1.jpg"}',
    r'{"id": "15", "question": "Emily celebrated her birthday on Thursday. <image1> '
    r'Which weekday was that?", '
    r'"options": ["Wednesday", "Thursday", "Friday"], "answer": "A", "solution": null, "level": 2, '
    r'"subject": "arithmetic", "image": "images/15.jpg"}',
    r'{"id": "21", "question": "Which figure cannot be cut out?\n<image1>\n<image2>", '
    r'"options": ["A", "B", "C", "D", "E"], "answer": "E", "solution": null, "level": 1, '
    r'"subject": "combinatorial geometry", "image": "images/21.jpg"}',
    r'{"id": "2830", "question": "Find the ratio. <image1>", "options": [], "answer": "\frac{36}{13}", '
    r'"solution": null, "level": 5, "subject": "algebra", "image": "images/2830.jpg"}',
]


def check_mathvision(problems):
    assert [p.id for p in problems] == ["1", "15", "21", "2830"]
    free, mc, letters, frac = problems
    assert free.question == "Which number should be written in place of the question mark?"
    assert (free.answer, free.answer_type, free.choices) == ("60", "free", None)
    assert free.subsets == {"subject": "arithmetic", "level": "2"}
    assert free.images == (png(1),)
    assert mc.question == (
        "Emily celebrated her birthday on Thursday. Which weekday was that?\nChoices:\n"
        "(A) Wednesday\n(B) Thursday\n(C) Friday"
    )
    assert (mc.answer, mc.choices, mc.answer_type) == ("A", ("Wednesday", "Thursday", "Friday"), "choice")
    assert letters.question == "Which figure cannot be cut out?\nChoices: (A) (B) (C) (D) (E)"
    assert (letters.answer, letters.subsets["level"]) == ("E", "1")
    assert frac.answer == "\\frac{36}{13}" and frac.question == "Find the ratio."
    assert frac.images == (png(2830),)


def test_mathvision_github_jsonl(tmp_path):
    write_file(str(tmp_path / "data" / "test.jsonl"), "\n".join(MATHVISION_LINES).encode() + b"\n")
    for i in (1, 15, 21, 2830):
        write_file(str(tmp_path / "images" / f"{i}.jpg"), png(i))
    check_mathvision(load_benchmark("mathvision", str(tmp_path)))


def test_mathvision_hf_parquet(tmp_path):
    rows = []
    for line in MATHVISION_LINES:
        r = json.loads(line)
        i = int(r["id"])
        rows.append(dict(r, decoded_image={"bytes": png(i), "path": None}))
    write_parquet(str(tmp_path / "data" / "test-00000-of-00001.parquet"), rows)
    check_mathvision(load_benchmark("mathvision", str(tmp_path)))


# ---- WeMath --------------------------------------------------------------------------------


def wemath_records():
    base = {
        "split": "testmini",
        "knowledge concept": "Left-Right Position",
        "knowledge concept description": "Left-right position refers to ...",
    }
    return [
        dict(
            base,
            ID="2steps_1",
            question="According to the diagram: OA = ( ) m, AB = ( ) m",
            option="A. 300, 400;B. 400, 300;C. 3000, 4000; D. No correct answer",
            answer="C",
            image_path="2steps/image/1-1.png",
            key="2steps_1",
            **{"question number": 1},
        ),
        dict(
            base,
            ID="2steps_1",
            question="The correct route from O to B is:",
            option="A. Rotate around point ;O.;B. Walk north;C. No.; F. No correct answer",
            answer="B",
            image_path="2steps/image/1-multi.png",
            key="2steps_multi",
            **{"question number": 721},
        ),
        dict(
            base,
            ID="3steps_4",
            **{"knowledge concept": "Circumference of Circles"},
            question="The radius is ( ) cm.",
            option="A. 1 cm B. 1.5 cm ;C. 3.14 cm; D. No correct answer",
            answer="A",
            image_path="3steps/image/4-multi.png",
            key="3steps_multi",
            **{"question number": 1200},
        ),
    ]


def check_wemath(problems):
    assert [p.id for p in problems] == ["1", "721", "1200"]
    one, two, three = problems
    assert one.question == (
        "According to the diagram: OA = ( ) m, AB = ( ) m\nChoices:\n(A) 300, 400\n"
        "(B) 400, 300\n(C) 3000, 4000\n(D) No correct answer"
    )
    assert (one.answer, one.answer_type) == ("C", "choice")
    assert one.subsets == {
        "knowledge": "Left-Right Position",
        "steps": "one-step",
        "key": "2steps_1",
        "problem_id": "2steps_1",
        "question_number": "1",
    }
    assert one.images == (png(11),)
    # The release's typos: a stray ";" inside option A, option D labelled "F."
    assert two.choices == ("Rotate around point O.", "Walk north", "No.", "No correct answer")
    assert (two.subsets["steps"], two.subsets["key"], two.subsets["problem_id"]) == (
        "two-step",
        "2steps_multi",
        "2steps_1",
    )
    assert three.choices == ("1 cm", "1.5 cm", "3.14 cm", "No correct answer")  # a missing ";"
    assert (three.subsets["steps"], three.subsets["knowledge"]) == ("three-step", "Circumference of Circles")
    assert three.images == (png(34),)


def test_wemath_github_json(tmp_path):
    write_file(str(tmp_path / "data" / "testmini.json"), json.dumps(wemath_records()).encode())
    for rel, seed in (
        ("2steps/image/1-1.png", 11),
        ("2steps/image/1-multi.png", 12),
        ("3steps/image/4-multi.png", 34),
    ):
        write_file(str(tmp_path / "data" / rel), png(seed))
    check_wemath(load_benchmark("wemath", str(tmp_path)))

    records = wemath_records()
    records[1]["key"] = "2step-multi"
    write_file(str(tmp_path / "data" / "testmini.json"), json.dumps(records).encode())
    with pytest.raises(DataError, match=r"row 1 \(id 721\): field 'key'"):
        load_benchmark("wemath", str(tmp_path))


def test_wemath_hf_parquet(tmp_path):
    rows = []
    for r, seed in zip(wemath_records(), (11, 12, 34)):
        rows.append(dict(r, image_path={"bytes": png(seed), "path": r["image_path"]}))
    write_parquet(str(tmp_path / "data" / "testmini-00000-of-00001.parquet"), rows)
    check_wemath(load_benchmark("wemath", str(tmp_path)))


# ---- our own parquet layout ----------------------------------------------------------------


def test_own_parquet_layout(tmp_path):
    path = str(tmp_path / "geo_val.parquet")
    write_parquet(
        path,
        [
            {
                "problem": "<image>Find x.",
                "answer": "5",
                "images": [{"bytes": png(1), "path": None}],
                "visual_key_info": "<info1>AB = 5</info1><info2>angle C = 90 degrees</info2>",
                "id": "g1",
                "choices": None,
            },
            {
                "problem": "<image>Which is longer?",
                "answer": "4 cm",
                "images": [{"bytes": png(2), "path": None}],
                "visual_key_info": None,
                "id": "g2",
                "choices": ["3 cm", "4 cm"],
            },
        ],
    )
    a, b = load_benchmark("parquet", path)
    assert (a.benchmark, a.id, a.question, a.answer, a.answer_type) == (
        "parquet:geo_val",
        "g1",
        "Find x.",
        "5",
        "free",
    )
    assert a.visual_annotations == ("AB = 5", "angle C = 90 degrees") and a.images == (png(1),)
    assert (b.question, b.answer, b.choices, b.answer_type) == (
        "Which is longer?\nChoices:\n(A) 3 cm\n(B) 4 cm",
        "B",
        ("3 cm", "4 cm"),
        "choice",
    )
    assert b.visual_annotations == () and b.images == (png(2),)
    (c,) = load_benchmark("parquet:heldout", str(tmp_path), limit=1)
    assert (c.benchmark, c.id) == ("parquet:heldout", "g1")

    # An image given by a path that is not there: the training pipeline's error, naming file and row.
    write_parquet(path, [{"problem": "<image>Find x.", "answer": "5", "images": ["missing.png"]}])
    with pytest.raises(DataError) as e:
        load_benchmark("parquet", path)
    assert path in str(e.value) and "row 0" in str(e.value) and "missing.png" in str(e.value)


def test_own_parquet_layout_several_files_and_bad_rows(tmp_path):
    row = {"problem": "<image>Find x.", "answer": "5", "images": [{"bytes": png(1), "path": None}]}
    write_parquet(str(tmp_path / "a.parquet"), [row, row])
    write_parquet(str(tmp_path / "b.parquet"), [dict(row, answer="6")])
    problems = load_benchmark("parquet:both", str(tmp_path))
    assert [(p.id, p.answer) for p in problems] == [
        ("a.parquet:0", "5"),
        ("a.parquet:1", "5"),
        ("b.parquet:0", "6"),
    ]

    write_parquet(str(tmp_path / "a.parquet"), [dict(row, id="x"), dict(row, id="x")])
    with pytest.raises(DataError, match=r"column 'id' repeats ids \['x'\]"):
        load_benchmark("parquet", str(tmp_path / "a.parquet"))
    write_parquet(str(tmp_path / "a.parquet"), [dict(row, choices=["3", "4"])])
    with pytest.raises(
        DataError, match=r"a\.parquet: row 0 \(id 0\): field 'answer': '5' is neither an option letter"
    ):
        load_benchmark("parquet", str(tmp_path / "a.parquet"))
    write_parquet(str(tmp_path / "a.parquet"), [dict(row, answer=None)])
    with pytest.raises(DataError, match=r"a\.parquet: row 0: field 'answer'"):  # the training reader's check
        load_benchmark("parquet", str(tmp_path / "a.parquet"))
