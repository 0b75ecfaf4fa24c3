"""Stage 1 (`pr1.annotate`) against two loopback chat stubs (pr1.bench.judge.StubJudgeServer) as the
teacher VLM and the extractor LLM: the accuracy filter over several attempts, the extractor reply
parsing, the output parquet read back by the dataset code, token accounting summed by hand, the
image really sent (and only to the teacher), resume after SIGKILL, failing and misconfigured
services, and input errors.
"""

import base64
import gc
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pr1.annotate import prompts
from pr1.annotate.cache import CacheError, RowCache
from pr1.annotate.pipeline import AnnotateOptions, ServiceOptions, annotate
from pr1.bench.judge import StubJudgeServer, message_text
from pr1.chat import ChatConfigError
from pr1.data.config import data_config
from pr1.data.prompts import FORMAT_INSTRUCTION
from pr1.data.rows import DataError, ParquetRows, parse_annotations

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Helpers


def image_array(seed, h=12, w=10):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_input(path, rows, *, with_ids=True, drop=()):
    """rows: list of (problem, answer, [image arrays])."""
    cols = {
        "id": [f"geo-{i}" for i in range(len(rows))],
        "problem": [p for p, _, _ in rows],
        "answer": [a for _, a, _ in rows],
        "images": [[{"bytes": png_bytes(im), "path": None} for im in ims] for _, _, ims in rows],
    }
    if not with_ids:
        del cols["id"]
    for c in drop:
        del cols[c]
    pq.write_table(pa.table(cols), path)


def row_number(text):
    return int(re.search(r"figure (\d+)", text).group(1))


def cot(i, answer):
    return (
        f"<think>In figure {i} the side AB is labelled 5 and the angle at C has a right-angle mark, "
        f"so the answer follows.</think><answer>\\boxed{{{answer}}}</answer>"
    )


def decode_images(messages):
    out = []
    for part in messages[-1]["content"]:
        if part.get("type") == "image_url":
            url = part["image_url"]["url"]
            head, data = url.split(",", 1)
            assert head == "data:image/png;base64"
            out.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")))
    return out


def opts_for(tmp_path, teacher, extractor, **kw):
    # No stub here hangs: only a slow machine would time out.
    service = dict(timeout=60.0, max_tokens=256, retries=1, backoff=0.01, backoff_max=0.02)
    base = dict(
        input=str(tmp_path / "in.parquet"),
        output=str(tmp_path / "out.parquet"),
        teacher=ServiceOptions(teacher.url, "teacher-stub", **service),
        extractor=ServiceOptions(extractor.url, "extractor-stub", **service),
        concurrency=4,
        accuracy_workers=1,
        progress_interval=0.0,
    )
    base.update(kw)
    return AnnotateOptions(**base)


def cache_records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# Prompt-level parsing


def test_parse_extraction_keeps_figure_facts_only():
    reply = (
        "Sure! Here are the facts:\n<facts>\n- FIGURE: AB =  5.\nFIGURE: ab=5\nthis line is chatter\n"
        "DERIVED: x = 3\n1. FIGURE: angle ABC = 90 degrees\nFIGURE:   \n"
        "figure: <info2>CD = 4</info2>\n</facts>"
    )
    e = prompts.parse_extraction(reply)
    assert e.parseable
    assert e.facts == ("AB = 5", "angle ABC = 90 degrees", "CD = 4")
    assert e.derived == ("x = 3",) and e.duplicates == 1 and e.unrecognised == 1
    assert prompts.parse_extraction("<facts>\nNONE\n</facts>") == prompts.Extraction((), (), 0, 0, True)
    assert not prompts.parse_extraction("I cannot see a diagram.").parseable
    assert not prompts.parse_extraction("<facts>\nAB = 5\n</facts>").parseable  # untagged lines only
    # Without the block, tagged lines still count; the last block wins over an echoed template.
    assert prompts.parse_extraction("FIGURE: AB = 5").facts == ("AB = 5",)
    assert prompts.parse_extraction(
        "<facts>FIGURE: ...</facts> then <facts>\nFIGURE: x = 2\n</facts>"
    ).facts == ("x = 2",)
    info = prompts.to_info_string(["AB = 5", "angle Q = (2x+5) degrees"])
    assert info == "<info1>AB = 5</info1><info2>angle Q = (2x+5) degrees</info2>"
    assert parse_annotations(info) == ["AB = 5", "angle Q = (2x+5) degrees"]


def test_cot_reasoning_and_messages():
    assert prompts.cot_reasoning("<think> AB = 5 </think><answer>\\boxed{5}</answer>") == "AB = 5"
    assert prompts.cot_reasoning("AB = 5, so <answer>\\boxed{5}</answer>") == "AB = 5, so"
    m = prompts.extractor_messages("Find x.", "AB = 5")
    assert m[0]["role"] == "system" and m[-1]["role"] == "user"
    assert all(isinstance(x["content"], str) for x in m)  # text only
    assert f"{prompts.SOLUTION_OPEN}\nAB = 5\n{prompts.SOLUTION_CLOSE}" in m[-1]["content"]
    # Every worked example parses to what its solution shows: the format the prompt asks for is ours to read.
    for _, _, reply in prompts.FEW_SHOT:
        assert prompts.parse_extraction(reply).parseable


def test_row_cache_is_durable_and_tolerates_only_a_torn_last_line(tmp_path, caplog):
    path = str(tmp_path / "c.jsonl")
    cache = RowCache(path)
    cache.append({"kind": "done", "row_id": "a", "status": "kept"})
    with open(path) as f:  # on disk as soon as append returns, not sitting in a buffer
        assert json.loads(f.read()) == {"kind": "done", "row_id": "a", "status": "kept"}
    cache.append({"kind": "cot", "row_id": "b"})
    cache.close()
    with open(path, "a") as f:
        f.write('{"kind":"done","row_id":"b","sta')
    again = RowCache(path)
    assert again.torn_lines == 1 and "line 3 is incomplete" in caplog.text
    assert set(again.done) == {"a"} and set(again.cot) == {"b"}
    again.append({"kind": "done", "row_id": "b", "status": "filtered"})
    again.close()
    assert [r["row_id"] for r in cache_records(path)] == ["a", "b", "b"]  # the torn tail was cut
    with open(path, "a") as f:
        f.write("garbage\n" + json.dumps({"kind": "done", "row_id": "c"}) + "\n")
    with pytest.raises(CacheError, match=r"c\.jsonl: line 4 is not a stage-1 cache record"):
        RowCache(path)


# ----------------------------------------------------------------------------------------------
# The whole stage against stubs


ANSWERS = ["5", "2\\sqrt{3}", "9", "12", "60", "7", "8", "15"]
# What the teacher boxes at attempt 1, 2, 3, ... (the last entry repeats).
TEACHER_PLAN = {
    0: ["5"],
    1: ["7", "2\\sqrt{3}"],
    2: ["1"],
    3: ["12"],
    4: ["60"],
    5: ["7"],
    6: ["8"],
    7: ["15"],
}
JUNK = (
    "Sure! Here are the facts:\n<facts>\n- FIGURE: AB =  5.\nFIGURE: ab=5\nnonsense\nDERIVED: x = 3\n"
    "1. FIGURE: angle ABC = 90 degrees\n</facts>"
)


def good_facts(i):
    return f"<facts>\nFIGURE: AB = 5\nFIGURE: angle C = 90 degrees in figure {i}\nDERIVED: x = {i}\n</facts>"


class Stubs:
    """Scripted teacher and extractor replies, recording what each saw."""

    def __init__(self, fixed_row6=False):
        self.teacher_calls = {}
        self.extractor_calls = {}
        self.images = {}
        self.teacher_texts = {}
        self.extractor_messages = {}
        self.fixed_row6 = fixed_row6

    def teacher(self, messages):
        text = message_text(messages[-1])
        i = row_number(text)
        k = self.teacher_calls[i] = self.teacher_calls.get(i, 0) + 1
        self.images[i] = decode_images(messages)
        self.teacher_texts[i] = text
        plan = TEACHER_PLAN[i]
        return cot(i, plan[min(k, len(plan)) - 1])

    def extractor(self, messages):
        text = messages[-1]["content"]
        i = row_number(text)
        k = self.extractor_calls[i] = self.extractor_calls.get(i, 0) + 1
        self.extractor_messages[i] = messages
        if i == 3:
            return JUNK
        if i == 4:
            return "<facts>NONE</facts>"
        if i == 5 and k == 1:
            return "I would rather not."
        if i == 6 and not self.fixed_row6:
            return "no block here"
        return good_facts(i)


def main_rows():
    rows = []
    for i, answer in enumerate(ANSWERS):
        if i == 7:
            rows.append(
                (
                    f"<image> and <image>: find the area in figure {i}.",
                    answer,
                    [image_array(70), image_array(71, 8, 9)],
                )
            )
        else:
            rows.append((f"<image>Find x in figure {i}.", answer, [image_array(i)]))
    return rows


def teacher_usage(messages, text):
    return 100, 10


def extractor_usage(messages, text):
    return 7, 3


def test_annotate_filters_extracts_and_writes_the_training_parquet(tmp_path):
    rows = main_rows()
    write_input(tmp_path / "in.parquet", rows)
    stubs = Stubs()
    with (
        StubJudgeServer(stubs.teacher, usage=teacher_usage) as t,
        StubJudgeServer(stubs.extractor, usage=extractor_usage) as x,
    ):
        opts = opts_for(tmp_path, t, x, attempts=3)
        summary = annotate(opts, progress_stream=io.StringIO())

        # Attempts: 1 for rows right at once, 2 for row 1, all 3 for the always-wrong row 2.
        assert stubs.teacher_calls == {0: 1, 1: 2, 2: 3, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1}
        assert stubs.extractor_calls == {0: 1, 1: 1, 3: 1, 4: 1, 5: 2, 6: 2, 7: 1}  # row 2 never extracted

        # The teacher saw the images (pixel for pixel) and the format instruction; the extractor saw neither.
        for i, (problem, _, ims) in enumerate(rows):
            assert len(stubs.images[i]) == len(ims)
            for sent, original in zip(stubs.images[i], ims):
                np.testing.assert_array_equal(sent, original)
            assert stubs.teacher_texts[i].endswith(" " + FORMAT_INSTRUCTION)
            assert "<image>" not in stubs.teacher_texts[i]
        for i, messages in stubs.extractor_messages.items():
            blob = json.dumps(messages)
            assert "image_url" not in blob and "data:image" not in blob
            assert all(isinstance(m["content"], str) for m in messages)
            assert f"In figure {i} the side AB is labelled 5" in messages[-1]["content"]
            assert "<answer>" not in messages[-1]["content"]  # the reasoning only, not the answer block

        assert summary["rows"] == 8 and summary["kept"] == 5
        assert summary["filtered"] == {"wrong_answer": 1, "no_annotations": 1}
        assert summary["failed"] == 1 and summary["failed_by_stage"]["extractor_unparseable"] == 1
        assert [r["row"] for r in summary["failed_rows"]] == [6]
        assert summary["teacher_attempts"] == 1 + 2 + 3 + 1 + 1 + 1 + 1  # finished rows 0-5 and 7
        assert summary["kept_by_teacher_attempt"] == {"1": 4, "2": 1}
        assert summary["extractor_attempts"] == 1 + 1 + 0 + 1 + 1 + 2 + 1
        assert summary["this_run"]["unparseable_extractor_replies"] == 3  # row 5 once, row 6 twice
        # Finished rows: 10 teacher and 7 extractor requests; this run also paid row 6's 1 + 2.
        assert summary["tokens"] == {
            "teacher": {"prompt_tokens": 1000, "completion_tokens": 100},
            "extractor": {"prompt_tokens": 49, "completion_tokens": 21},
        }
        run = summary["this_run"]
        assert (run["teacher"]["prompt_tokens"], run["teacher"]["completion_tokens"]) == (1100, 110)
        assert (run["extractor"]["prompt_tokens"], run["extractor"]["completion_tokens"]) == (63, 27)
        assert run["teacher"]["requests"] == 11 and run["extractor"]["requests"] == 9
        with open(opts.summary_path) as f:
            assert json.load(f)["kept"] == 5

        # The output: kept rows in input order, read back by the trainer's own parquet reader.
        expected = {
            0: ["AB = 5", "angle C = 90 degrees in figure 0"],
            1: ["AB = 5", "angle C = 90 degrees in figure 1"],
            3: ["AB = 5", "angle ABC = 90 degrees"],
            5: ["AB = 5", "angle C = 90 degrees in figure 5"],
            7: ["AB = 5", "angle C = 90 degrees in figure 7"],
        }
        table = pq.read_table(opts.output)
        assert table.column_names == ["id", "problem", "answer", "images", "visual_key_info", "teacher_cot"]
        assert table.column("id").to_pylist() == [f"geo-{i}" for i in expected]
        assert table.column("teacher_cot").to_pylist() == [cot(i, ANSWERS[i]) for i in expected]
        for value, i in zip(table.column("visual_key_info").to_pylist(), expected):
            assert parse_annotations(value) == expected[i]
        reader = ParquetRows([opts.output], data_config())
        f = reader.files[0]
        assert [f.annotations[r] for _, r in reader.rows] == list(expected.values())
        assert [f.answers[r] for _, r in reader.rows] == [ANSWERS[i] for i in expected]
        for (_, r), i in zip(reader.rows, expected):
            for got, original in zip(reader.images(0, r), rows[i][2]):
                np.testing.assert_array_equal(got, original)

        # Row 6's correct CoT was cached before extraction: a rerun asks only the extractor again.
        records = cache_records(opts.cache_path)
        assert {r["row_id"] for r in records if r["kind"] == "done"} == {
            f"geo-{i}" for i in (0, 1, 2, 3, 4, 5, 7)
        }
        assert [r["row_id"] for r in records if r["kind"] == "cot" and r["row_id"] == "geo-6"] == ["geo-6"]
        stubs.fixed_row6 = True
        before = dict(stubs.teacher_calls)
        again = annotate(opts, progress_stream=io.StringIO())
        assert stubs.teacher_calls == before and stubs.extractor_calls[6] == 3
        assert {k: v for k, v in stubs.extractor_calls.items() if k != 6} == {
            0: 1,
            1: 1,
            3: 1,
            4: 1,
            5: 2,
            7: 1,
        }
    assert (
        again["kept"] == 6 and again["failed"] == 0 and again["kept_by_teacher_attempt"] == {"1": 5, "2": 1}
    )
    assert again["this_run"]["teacher"]["requests"] == 0 and again["this_run"]["extractor"]["requests"] == 1
    # Row 6's teacher tokens come from its cached CoT record, its extractor tokens from this run.
    assert again["tokens"] == {
        "teacher": {"prompt_tokens": 1100, "completion_tokens": 110},
        "extractor": {"prompt_tokens": 56, "completion_tokens": 24},
    }
    assert pq.read_table(opts.output).column("id").to_pylist() == [f"geo-{i}" for i in (0, 1, 3, 5, 6, 7)]

    # A changed input row must not silently reuse the cached result.
    rows[1] = (rows[1][0], "3", rows[1][2])
    write_input(tmp_path / "in.parquet", rows)
    with pytest.raises(CacheError, match=r"row 1 \(id 'geo-1'\).*different content"):
        annotate(opts, progress_stream=io.StringIO())


def test_failing_teacher_rows_are_reported_not_cached(tmp_path):
    write_input(tmp_path / "in.parquet", main_rows()[:3], with_ids=False)
    with StubJudgeServer(p_500=1.0) as t, StubJudgeServer() as x:
        opts = opts_for(tmp_path, t, x)
        summary = annotate(opts, progress_stream=io.StringIO())
        attempts = t.stats()["attempts"]
        assert x.stats()["requests"] == 0
    assert summary["kept"] == 0 and summary["failed"] == 3 and summary["failed_by_stage"]["teacher"] == 3
    assert summary["unfinished"] == 3
    assert sorted(r["row_id"] for r in summary["failed_rows"]) == ["0", "1", "2"]
    assert all("HTTP 500" in r["error"] and t.url in r["error"] for r in summary["failed_rows"])
    assert sorted(attempts.values()) == [2, 2, 2]  # retries=1: each row's request tried twice
    assert cache_records(opts.cache_path) == []
    assert pq.read_table(opts.output).num_rows == 0


def test_unauthorized_teacher_stops_the_run_and_keeps_the_cache(tmp_path, caplog):
    write_input(tmp_path / "in.parquet", main_rows()[:4])
    stubs = Stubs()
    with StubJudgeServer(stubs.teacher) as t, StubJudgeServer(stubs.extractor) as x:
        annotate(opts_for(tmp_path, t, x, limit=2), progress_stream=io.StringIO())
    opts = opts_for(tmp_path, t, x)
    done = cache_records(opts.cache_path)
    assert [r["row_id"] for r in done if r["kind"] == "done"] == ["geo-0", "geo-1"]
    with StubJudgeServer(stubs.teacher, require_key="sk-secret") as t, StubJudgeServer(stubs.extractor) as x:
        opts = opts_for(tmp_path, t, x)
        with pytest.raises(ChatConfigError) as err:
            annotate(opts, progress_stream=io.StringIO())
        assert t.stats()["requests"] >= 1
    assert "401" in str(err.value) and t.url in str(err.value)
    # Workers that hit the same 401 together all had their exceptions collected (an unretrieved
    # one is logged from whatever code the garbage collector happens to interrupt).
    gc.collect()
    assert "never retrieved" not in caplog.text
    assert cache_records(opts.cache_path) == done


def test_input_missing_a_column_names_file_and_column(tmp_path):
    write_input(tmp_path / "in.parquet", main_rows()[:2], drop=("answer",))
    with StubJudgeServer() as t, StubJudgeServer() as x:
        with pytest.raises(DataError, match=r"in\.parquet: no column 'answer'"):
            annotate(opts_for(tmp_path, t, x), progress_stream=io.StringIO())
        assert t.stats()["requests"] == 0


# ----------------------------------------------------------------------------------------------
# The CLI: resume after SIGKILL, usage and configuration errors


def cli(tmp_path, t, x, *extra):
    return [
        sys.executable,
        "-m",
        "pr1.annotate",
        f"--input={tmp_path / 'in.parquet'}",
        f"--output={tmp_path / 'out.parquet'}",
        f"--teacher_url={t.url}",
        "--teacher_model=t",
        f"--extractor_url={x.url}",
        "--extractor_model=x",
        "--concurrency=2",
        "--teacher_retries=1",
        "--extractor_retries=1",
        "--teacher_backoff_s=0.01",
        "--extractor_backoff_s=0.01",
        "--accuracy_workers=1",
        "--progress_interval=0",
        *extra,
    ]


def test_cli_resumes_after_sigkill_without_repeating_finished_rows(tmp_path):
    n = 20
    answers = [str(10 + i) for i in range(n)]
    write_input(
        tmp_path / "in.parquet",
        [(f"<image>Find x in figure {i}.", answers[i], [image_array(i)]) for i in range(n)],
        with_ids=False,
    )
    cache = tmp_path / "out.parquet.cache.jsonl"

    def teacher(messages):
        i = row_number(message_text(messages[-1]))
        return cot(i, answers[i])

    def extractor(messages):
        return good_facts(row_number(messages[-1]["content"]))

    env = dict(os.environ, PYTHONPATH=REPO)
    with StubJudgeServer(teacher, latency=0.25) as t, StubJudgeServer(extractor, latency=0.02) as x:
        proc = subprocess.Popen(
            cli(tmp_path, t, x), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if cache.exists() and cache.read_text().count('"kind":"done"') >= n // 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()

        finished = {r["row_id"] for r in cache_records(cache) if r["kind"] == "done"}
        with_cot = {r["row_id"] for r in cache_records(cache) if r["kind"] == "cot"}
        assert n // 2 <= len(finished) < n
        with open(cache, "a") as f:  # what a kill in the middle of a write leaves behind
            f.write('{"kind":"done","row_id":"19","row":19,"ha')
        t.reset_stats()
        x.reset_stats()
        done = subprocess.run(
            cli(tmp_path, t, x), cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "incomplete" in done.stderr
        teacher_keys = {row_number(k) for k in t.stats()["attempts"]}
        extractor_keys = {row_number(k) for k in x.stats()["attempts"]}
    # Rows finished before the kill were never asked again; CoTs cached before it went to the extractor only.
    assert teacher_keys == set(range(n)) - {int(r) for r in finished | with_cot}
    assert extractor_keys == set(range(n)) - {int(r) for r in finished}
    assert re.search(r"annotate: 20/20 rows \(\d+ cached\) \| kept 20", done.stderr)
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("problem").to_pylist() == [f"<image>Find x in figure {i}." for i in range(n)]
    assert [parse_annotations(v) for v in table.column("visual_key_info").to_pylist()] == [
        ["AB = 5", f"angle C = 90 degrees in figure {i}"] for i in range(n)
    ]
    summary = json.loads((tmp_path / "out.parquet.summary.json").read_text())
    assert summary["kept"] == n and summary["teacher_attempts"] == n


def test_cli_usage_and_configuration_errors(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run(
        [sys.executable, "-m", "pr1.annotate", "--input=x.parquet"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "--output" in r.stderr and "--teacher_url" in r.stderr
    write_input(tmp_path / "in.parquet", main_rows()[:2])
    with StubJudgeServer(require_key="sk-secret") as t, StubJudgeServer() as x:
        r = subprocess.run(
            cli(tmp_path, t, x, "--teacher_api_key_env=PR1_TEST_TEACHER_KEY"),
            cwd=REPO,
            env=dict(env, PR1_TEST_TEACHER_KEY="sk-wrong"),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 2
    assert "401" in r.stderr and t.url in r.stderr and "PR1_TEST_TEACHER_KEY" in r.stderr
    assert "sk-wrong" not in r.stderr + r.stdout
