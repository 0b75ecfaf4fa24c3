"""pr1.analyze: pairing two runs' records, accuracy / hand / judged perception labels, the McNemar
report, and the CLI. Tables are counted by hand from the fixtures written here; the judged labels
come from a loopback judge stub whose verdicts are spelled out in each response."""

import json
import os
import random
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pr1.analyze import (
    AnalysisError,
    accuracy_labels,
    load_annotations,
    load_labels,
    load_records,
    mcnemar_from_files,
    pair_records,
    perception_labels,
)
from pr1.analyze.__main__ import main
from pr1.bench.judge import StubJudgeServer, request_key
from pr1.rewards.judge import LexicalJudge, OpenAIJudge

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record(pid, correct=True, *, benchmark="mathvista", response="", annotations=(), model="m", **subsets):
    return {
        "benchmark": benchmark,
        "id": pid,
        "subsets": subsets,
        "question": "q",
        "answer": "B",
        "response": response,
        "correct": correct,
        "visual_annotations": list(annotations),
        "model": model,
    }


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


# A/B correctness of problems 1..10 chosen so the table is a=3, b=2, c=4, d=1:
#   both right: 1, 2, 3   A only: 4, 5   B only: 6, 7, 8, 9   both wrong: 10
ACC_A = {1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 0, 7: 0, 8: 0, 9: 0, 10: 0}
ACC_B = {1: 1, 2: 1, 3: 1, 4: 0, 5: 0, 6: 1, 7: 1, 8: 1, 9: 1, 10: 0}


@pytest.fixture
def accuracy_files(tmp_path):
    a = [record(str(i), bool(v)) for i, v in ACC_A.items()] + [
        record("99", True),
        record("1", False, benchmark="mathverse"),
    ]
    b = [record(str(i), bool(v)) for i, v in reversed(ACC_B.items())] + [
        record("100", False),
        record("1", True, benchmark="mathverse"),
    ]
    a[0]["model"], b[0]["model"] = "base", "rl"
    return write_jsonl(tmp_path / "a.jsonl", a), write_jsonl(tmp_path / "b.jsonl", b)


# ----------------------------------------------------------------------------------------------
# Records and pairing


def test_accuracy_table_counts_and_unpaired_problems(accuracy_files):
    a, b = accuracy_files
    report = mcnemar_from_files(a, b, label="accuracy", benchmark="mathvista")
    t = report.table
    assert (t.a, t.b, t.c, t.d) == (3, 2, 4, 1)
    assert t.p == 0.6875  # 2 * (1 + 6 + 15) / 64
    assert report.only_a == ["mathvista/99"] and report.only_b == ["mathvista/100"]
    assert report.population == 10 and len(report.problems) == 10
    assert report.models_a == ["base", "m"] and report.models_b == ["m", "rl"]
    # Without the benchmark filter the mathverse problem (A wrong, B right) joins as one more c.
    t = mcnemar_from_files(a, b, label="accuracy").table
    assert (t.a, t.b, t.c, t.d) == (3, 2, 5, 1)


def test_records_are_keyed_by_benchmark_and_id_and_numeric_ids_pair_with_strings(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [record(12, True), "", record("7", False, benchmark="wemath")])
    b = write_jsonl(tmp_path / "b.jsonl", [record("12", False), record(7, True, benchmark="mathvista")])
    recs = load_records(a)
    assert [(r.key, r.where) for r in recs] == [(("mathvista", "12"), f"{a}:1"), (("wemath", "7"), f"{a}:3")]
    pairing = pair_records(recs, load_records(b))
    assert [p[0].name for p in pairing.pairs] == ["mathvista/12"]
    assert [r.name for r in pairing.only_a] == ["wemath/7"] and [r.name for r in pairing.only_b] == [
        "mathvista/7"
    ]


def test_duplicates_and_bad_lines_name_the_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [record("1"), record("2"), record("1")])
    with pytest.raises(
        AnalysisError, match=re.escape(f"{path}:3: duplicate record for mathvista/1 (first at line 1)")
    ):
        load_records(path)
    path = write_jsonl(tmp_path / "bad.jsonl", [record("1"), "{not json"])
    with pytest.raises(AnalysisError, match=re.escape(f"{path}:2: not valid JSON")):
        load_records(path)
    path = write_jsonl(tmp_path / "noid.jsonl", [{"benchmark": "mathvista", "correct": True}])
    with pytest.raises(AnalysisError, match=re.escape(f"{path}:1: record has no 'id'")):
        load_records(path)
    with pytest.raises(AnalysisError, match="no such file"):
        load_records(str(tmp_path / "missing.jsonl"))


def test_accuracy_label_must_be_a_boolean(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [record("1", True), record("2", None)])
    with pytest.raises(AnalysisError, match=re.escape(f"{path}:2: mathvista/2 has correct=None")):
        accuracy_labels(load_records(path))


def _subset_files(tmp_path, order_seed):
    rows = [
        record(
            str(i), i % 3 == 0, task="geometry problem solving" if i % 2 == 0 else "figure question answering"
        )
        for i in range(40)
    ]
    rows_b = [dict(r, correct=not r["correct"]) for r in rows]
    random.Random(order_seed).shuffle(rows)
    random.Random(order_seed + 1).shuffle(rows_b)
    d = tmp_path / str(order_seed)
    d.mkdir()
    return load_records(write_jsonl(d / "a.jsonl", rows)), load_records(write_jsonl(d / "b.jsonl", rows_b))


def test_subset_filter_and_sample(tmp_path):
    a, b = _subset_files(tmp_path, 0)
    geo = {"task": "geometry problem solving"}
    full = pair_records(a, b, subsets=geo)
    assert [p[0].id for p in full.pairs] == [str(i) for i in range(0, 40, 2)]  # numeric ids by value
    drawn = pair_records(a, b, subsets=geo, sample=5, seed=3)
    ids = [p[0].id for p in drawn.pairs]
    assert len(set(ids)) == 5 and all(int(i) % 2 == 0 for i in ids)
    assert (drawn.population, drawn.sample, drawn.seed) == (20, 5, 3)
    # The draw depends on the problems and the seed, not on the order of the files' lines.
    a2, b2 = _subset_files(tmp_path, 7)
    assert [p[0].id for p in pair_records(a2, b2, subsets=geo, sample=5, seed=3).pairs] == ids
    others = {
        tuple(p[0].id for p in pair_records(a, b, subsets=geo, sample=5, seed=s).pairs) for s in range(4, 10)
    }
    assert len(others | {tuple(ids)}) > 1
    with pytest.raises(AnalysisError, match="--sample 21, but only 20 paired problems"):
        pair_records(a, b, subsets=geo, sample=21)
    with pytest.raises(AnalysisError, match=r"no record has subset key 'skill'; keys present: \['task'\]"):
        pair_records(a, b, subsets={"skill": "x"})
    with pytest.raises(AnalysisError, match="--benchmark 'mathverse': no record has it"):
        pair_records(a, b, benchmark="mathverse")


def test_subset_disagreement_between_runs_is_an_error(tmp_path):
    a = load_records(write_jsonl(tmp_path / "a.jsonl", [record("1", task="geometry problem solving")]))
    b = load_records(write_jsonl(tmp_path / "b.jsonl", [record("1", task="textbook question answering")]))
    with pytest.raises(AnalysisError, match="mathvista/1: A .* and B .* disagree"):
        pair_records(a, b, subsets={"task": "geometry problem solving"})


# ----------------------------------------------------------------------------------------------
# Hand labels


def test_labels_files_csv_and_jsonl(accuracy_files, tmp_path):
    a, b = accuracy_files
    # Perception labels (independent of the accuracy fields), problems 1..10 of mathvista:
    #   both right: 1, 2   A only: 3   B only: 4, 5, 6, 7, 8   both wrong: 9, 10   -> a=2 b=1 c=5 d=2
    per_a = {1: 1, 2: 1, 3: 1, 4: 0, 5: 0, 6: 0, 7: 0, 8: 0, 9: 0, 10: 0}
    per_b = {1: 1, 2: 1, 3: 0, 4: 1, 5: 1, 6: 1, 7: 1, 8: 1, 9: 0, 10: 0}
    spell = {1: ["1", "true", "TRUE", " 1 "], 0: ["0", "false", "False"]}
    csv_a = tmp_path / "a.csv"  # no benchmark column: ids are unambiguous within --benchmark mathvista
    csv_a.write_text(
        "id,perception_correct,note\n"
        + "".join(f"{i},{spell[v][i % len(spell[v])]},x\n" for i, v in per_a.items())
    )
    jsonl_b = write_jsonl(
        tmp_path / "b.jsonl.labels.jsonl",
        [
            {"benchmark": "mathvista", "id": i, "perception_correct": [bool(v), v, str(v)][i % 3]}
            for i, v in per_b.items()
        ],
    )
    report = mcnemar_from_files(
        a, b, label="perception", benchmark="mathvista", labels_files=[str(csv_a), jsonl_b]
    )
    t = report.table
    assert (t.a, t.b, t.c, t.d) == (2, 1, 5, 2)
    assert t.p == 2 * (1 + 6) / 64  # n = 6, min = 1

    # The same id-only CSV is ambiguous once mathverse/1 is paired too.
    with pytest.raises(
        AnalysisError, match=r"a.csv:2: label for id '1' has no benchmark.*\['mathverse', 'mathvista'\]"
    ):
        mcnemar_from_files(a, b, label="perception", labels_files=[str(csv_a), jsonl_b])


def test_labels_file_errors(accuracy_files, tmp_path):
    a, b = accuracy_files
    short = tmp_path / "short.csv"
    short.write_text(
        "benchmark,id,perception_correct\n" + "".join(f"mathvista,{i},1\n" for i in (1, 2, 3, 4))
    )
    with pytest.raises(
        AnalysisError,
        match=r"short.csv has no perception_correct for 6 of 10 paired problems: "
        r"mathvista/5, mathvista/6, mathvista/7, mathvista/8, mathvista/9 and 1 more",
    ):
        mcnemar_from_files(
            a, b, label="perception", benchmark="mathvista", labels_files=[str(short), str(short)]
        )
    bad = tmp_path / "bad.csv"
    bad.write_text("id,perception_correct\n1,1\n2,maybe\n")
    with pytest.raises(AnalysisError, match=r"bad.csv:3: perception_correct is 'maybe'"):
        load_labels(str(bad))
    dup = write_jsonl(
        tmp_path / "dup.jsonl", [{"id": "1", "perception_correct": 1}, {"id": "1", "perception_correct": 0}]
    )
    with pytest.raises(
        AnalysisError, match=r"dup.jsonl:2: duplicate label for \(any benchmark\)/1 \(first at line 1\)"
    ):
        load_labels(dup)
    header = tmp_path / "header.csv"
    header.write_text("id,label\n1,1\n")
    with pytest.raises(AnalysisError, match=r"lacks \['perception_correct'\]"):
        load_labels(str(header))


# ----------------------------------------------------------------------------------------------
# Judged perception


def spelled_reply(messages):
    """The stub judge's verdicts are the ones written in the response after "facts:"."""
    return "".join(
        f"<info{k}>{v}</info{k}>" for k, v in enumerate(request_key(messages).split("facts:")[1].split(), 1)
    )


def fast_judge(url, **kw):
    kw = dict(
        dict(timeout=60.0, connect_timeout=2.0, retries=2, backoff=0.01, backoff_max=0.05, seed=0), **kw
    )
    return OpenAIJudge(url, "stub", **kw)


TWO = ["AB = 5", "angle C = 90 degrees"]
THREE = TWO + ["x = 3"]
# problem: (annotations, A's verdicts, B's verdicts); perception correct iff every verdict is 1.
JUDGED = {
    "1": (TWO, "1 1", "1 0"),  # A right, B wrong          -> b
    "2": (TWO, "1 0", "1 1"),  # A wrong, B right          -> c
    "3": (TWO, "0 0", "1 1"),  # c
    "4": (THREE, "1 1 1", "1 1 1"),  # both right                -> a
    "5": (TWO, "1 0.9", "1 1"),  # a 0.9 verdict is not a 1  -> c
    "6": (THREE, "1 1", "0 0 0"),  # A's reply is short (malformed, missing = 0) -> d
}


def _judged_files(tmp_path, annotations=True):
    rows_a, rows_b = [], []
    for pid, (ann, va, vb) in JUDGED.items():
        ann = ann if annotations else ()
        rows_a.append(record(pid, response=f"Reading the figure. facts: {va}", annotations=ann))
        rows_b.append(record(pid, response=f"From the diagram. facts: {vb}", annotations=ann))
    return write_jsonl(tmp_path / "a.jsonl", rows_a), write_jsonl(tmp_path / "b.jsonl", rows_b)


def test_perception_via_judge_uses_the_all_ones_rule_and_saves_auditable_labels(tmp_path):
    a, b = _judged_files(tmp_path)
    out_a, out_b = str(tmp_path / "labels" / "a.jsonl"), str(tmp_path / "labels" / "b.jsonl")
    with StubJudgeServer(spelled_reply) as stub:
        labels = perception_labels(load_records(a), fast_judge(stub.url))
        assert labels.labels == {
            ("mathvista", "1"): True,
            ("mathvista", "2"): False,
            ("mathvista", "3"): False,
            ("mathvista", "4"): True,
            ("mathvista", "5"): False,
            ("mathvista", "6"): False,
        }
        assert labels.malformed == 1 and labels.details["mathvista", "6"]["verdicts"] == [1.0, 1.0, 0.0]
        seen = []
        report = mcnemar_from_files(
            a,
            b,
            label="perception",
            judge=fast_judge(stub.url),
            save_labels=[out_a, out_b],
            progress=lambda *x: seen.append(x),
        )
    t = report.table
    assert (t.a, t.b, t.c, t.d) == (1, 1, 3, 1)
    assert t.p == 2 * (1 + 4) / 16  # n = 4, min = 1
    assert seen == [("A", 6, 6), ("B", 6, 6)]
    assert any("A: 1 malformed" in n for n in report.notes)
    # The saved labels read back as labels files and give the same table without a judge.
    saved = [json.loads(line) for line in open(out_a)]
    assert (
        saved[0]["verdicts"] == [1.0, 1.0] and saved[0]["annotations"] == TWO and "stub" in saved[0]["source"]
    )
    again = mcnemar_from_files(a, b, label="perception", labels_files=[out_a, out_b]).table
    assert again == t


def test_judge_failure_is_an_error_not_a_label(tmp_path):
    a, b = _judged_files(tmp_path)
    with StubJudgeServer(spelled_reply, p_500=1.0) as stub:
        with pytest.raises(
            AnalysisError,
            match=r"judge failed on 6 of 6 responses.*first: mathvista/1 "
            r"\(.*a.jsonl:1\): judge http://127.0.0.1.*HTTP 500.*--skip_failed",
        ):
            mcnemar_from_files(a, b, label="perception", judge=fast_judge(stub.url, retries=0))
        report = mcnemar_from_files(
            a, b, label="perception", judge=fast_judge(stub.url, retries=0), skip_failed=True
        )
    assert report.table.n == 0 and report.table.p == 1.0
    assert len(report.skipped) == 12 and {s["problem"] for s in report.skipped} == {
        f"mathvista/{i}" for i in JUDGED
    }
    assert "skipped pairs: 6" in report.format()


def test_skip_failed_drops_exactly_the_pairs_with_a_failed_judgement(tmp_path):
    a, b = _judged_files(tmp_path)
    with StubJudgeServer(spelled_reply, p_500=0.4, seed=5) as stub:
        report = mcnemar_from_files(
            a, b, label="perception", judge=fast_judge(stub.url, retries=0), skip_failed=True
        )
        ok = stub.stats()["successes"]
    judged_ok = {
        pid
        for pid in JUDGED
        if all(
            ok.get(r["response"])
            for r in (
                record(pid, response=f"Reading the figure. facts: {JUDGED[pid][1]}"),
                record(pid, response=f"From the diagram. facts: {JUDGED[pid][2]}"),
            )
        )
    }
    assert 0 < len(judged_ok) < len(JUDGED)  # the seed gives a mix, so the test can tell
    assert report.problems == [f"mathvista/{pid}" for pid in sorted(judged_ok)]
    assert {s["problem"] for s in report.skipped} == {f"mathvista/{pid}" for pid in JUDGED} - set(
        report.problems
    )
    assert all("HTTP 500" in s["reason"] for s in report.skipped)


def test_missing_annotations_error_skip_or_come_from_parquet(tmp_path):
    a, b = _judged_files(tmp_path, annotations=False)
    judge = LexicalJudge()
    with pytest.raises(
        AnalysisError, match=r"6 records have no visual_annotations .*a.jsonl:1 .*--annotations"
    ):
        mcnemar_from_files(a, b, label="perception", judge=judge)
    report = mcnemar_from_files(a, b, label="perception", judge=judge, skip_failed=True)
    assert report.table.n == 0 and {s["reason"] for s in report.skipped} == {"no visual annotations"}
    # Annotations by id from a parquet: the lexical judge finds "AB = 5" only in responses that state it.
    parquet = str(tmp_path / "ann.parquet")
    pq.write_table(
        pa.table({"id": [1, 2], "visual_key_info": ["<info1>AB = 5</info1>", "<info1>x = 3</info1>"]}),
        parquet,
    )
    rows_a = [record("1", response="so AB = 5 here"), record("2", response="nothing")]
    rows_b = [record("1", response="no length"), record("2", response="we have x = 3")]
    report = mcnemar_from_files(
        write_jsonl(tmp_path / "pa.jsonl", rows_a),
        write_jsonl(tmp_path / "pb.jsonl", rows_b),
        label="perception",
        judge=judge,
        annotations=load_annotations(parquet),
    )
    assert (report.table.b, report.table.c) == (1, 1)


def test_annotations_must_agree_between_runs(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [record("1", response="AB = 5", annotations=["AB = 5"])])
    b = write_jsonl(tmp_path / "b.jsonl", [record("1", response="AB = 5", annotations=["AB = 6"])])
    with pytest.raises(AnalysisError, match="mathvista/1: visual_annotations differ between A"):
        mcnemar_from_files(a, b, label="perception", judge=LexicalJudge())


def test_label_source_must_be_unambiguous(accuracy_files):
    a, b = accuracy_files
    with pytest.raises(AnalysisError, match="exactly one of --labels"):
        mcnemar_from_files(a, b, label="perception")
    assert main(["mcnemar", a, b, "--label", "perception", "--judge_url", "http://127.0.0.1:1/v1"]) == 2


# ----------------------------------------------------------------------------------------------
# The CLI


def test_cli_prints_table_b_c_and_p(accuracy_files, tmp_path):
    a, b = accuracy_files
    env = dict(os.environ, PYTHONPATH=REPO)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pr1.analyze",
            "mcnemar",
            a,
            b,
            "--label",
            "accuracy",
            "--benchmark",
            "mathvista",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "b = 2 (A correct, B wrong)" in out and "c = 4 (A wrong, B correct)" in out
    assert re.search(r"^p = 0\.6875 ", out, re.MULTILINE)
    assert re.search(r"A correct\s+3\s+2\n\s+A wrong\s+4\s+1", out)
    assert (
        "paired problems: 10" in out
        and "1 only in A (mathvista/99)" in out
        and "1 only in B (mathvista/100)" in out
    )
    dup = write_jsonl(tmp_path / "dup.jsonl", [record("1"), record("1")])
    run = subprocess.run(
        [sys.executable, "-m", "pr1.analyze", "mcnemar", dup, b, "--label", "accuracy", "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert run.returncode == 2 and f"{dup}:2: duplicate record for mathvista/1" in run.stderr


def test_cli_json(accuracy_files, capsys):
    a, b = accuracy_files
    assert (
        main(
            [
                "mcnemar",
                a,
                b,
                "--label",
                "accuracy",
                "--json",
                "--subset",
                "task=",
                "--benchmark",
                "mathvista",
            ]
        )
        == 2
    )
    assert "no record has subset key 'task'" in capsys.readouterr().err
    assert main(["mcnemar", a, b, "--label", "accuracy", "--json", "--sample", "4", "--seed", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 4 and result["a"] + result["b"] + result["c"] + result["d"] == 4
    assert (result["sample"], result["seed"], result["population"]) == (4, 1, 11)
    assert result["unpaired"] == {"only_a": ["mathvista/99"], "only_b": ["mathvista/100"]}
    assert len(result["problems"]) == 4
