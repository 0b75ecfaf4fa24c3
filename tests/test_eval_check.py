"""Evaluation checking with an LLM checker (loopback stub), resume of records, and the report's counts."""

import asyncio
import json
import re

import numpy as np
import pytest

from pr1.bench.judge import StubJudgeServer
from pr1.chat import ChatClient
from pr1.eval import report
from pr1.eval import run as run_lib
from pr1.eval.llm_check import LLMChecker, parse_extraction, parse_verdict, verdict_messages
from pr1.eval.problems import EvalProblem
from pr1.models.generation import Completion

FREE = EvalProblem(benchmark="toy", id="f1", question="What is x?", images=(), answer="12")
CHOICE = EvalProblem(
    benchmark="toy",
    id="c1",
    question="Which?\nChoices:\n(A) 3\n(B) 4",
    images=(),
    answer="B",
    choices=("3", "4"),
    answer_type="choice",
)


def test_reply_parsers():
    assert parse_extraction("ANSWER: 12") == (True, "12")
    assert parse_extraction("some text\nAnswer:  \\frac{1}{2} ") == (True, "\\frac{1}{2}")
    assert parse_extraction("ANSWER: NONE") == (True, None)
    assert parse_extraction("the answer is 12") == (False, None)
    assert parse_verdict("VERDICT: CORRECT") is True
    assert parse_verdict("reasoning...\nverdict: incorrect") is False
    assert parse_verdict("**VERDICT: INCORRECT**") is False
    assert parse_verdict("CORRECT") is None
    # The judge sees the gold option's text next to its letter.
    assert "Reference answer: B (4)" in verdict_messages(CHOICE, "4")[-1]["content"]


def _checker(url, **kw):
    kw = dict(
        dict(timeout=60.0, connect_timeout=2.0, retries=2, backoff=0.01, backoff_max=0.02, seed=0), **kw
    )
    return LLMChecker(ChatClient(url, "checker", role="answer checker", **kw))


def _scripted(messages):
    """Extractor: the last number in the solution; judge: CORRECT iff the student answer is 12 or B."""
    user = messages[-1]["content"]
    if "Solution:" in user:
        numbers = re.findall(r"\d+", user.split("Solution:")[1])
        return f"ANSWER: {numbers[-1]}" if numbers else "ANSWER: NONE"
    student = user.rsplit("Student answer:", 1)[1].strip()
    return "VERDICT: CORRECT" if student in ("12", "B") else "VERDICT: INCORRECT"


def _check(problem, response, llm):
    async def go():
        return await run_lib._check_all([(problem, response)], llm)

    return asyncio.run(go())[0]


def test_rules_alone_then_llm_extraction_and_verdict():
    # Rules: a boxed answer in <answer> decides without any LLM.
    r = _check(FREE, "<think>x</think>\n<answer>\\boxed{12}</answer>", None)
    assert (r["correct"], r["checked_by"], r["extracted"]) == (True, "rule", "12")
    r = _check(FREE, "<answer>\\boxed{13}</answer>", None)
    assert (r["correct"], r["checked_by"]) == (False, "rule")
    # Nothing to extract and no LLM: wrong.
    r = _check(FREE, "I think it is twelve", None)
    assert (r["correct"], r["extracted"], r["extracted_by"]) == (False, None, "none")
    with StubJudgeServer(_scripted) as stub:
        llm = _checker(stub.url)
        # The LLM extracts "12" from free text; the rules then decide.
        r = _check(FREE, "so x must be 12 in the end", llm)
        assert (r["extracted"], r["extracted_by"], r["correct"], r["checked_by"]) == (
            "12",
            "llm",
            True,
            "rule",
        )
        r = _check(FREE, "no idea", llm)
        assert (r["extracted"], r["correct"]) == (None, False)
        # mode "all": the verdict comes from the LLM even where rules decided (the paper's protocol).
        llm_all = LLMChecker(llm.client, mode="all")
        r = _check(CHOICE, "<answer>\\boxed{A}</answer>", llm_all)
        assert (r["rule_correct"], r["correct"], r["checked_by"]) == (False, False, "llm")
        assert stub.stats()["requests"] == 3


def test_rule_undecided_goes_to_the_llm(monkeypatch):
    monkeypatch.setattr(run_lib.answers_lib, "check_answer", lambda problem, extracted: None)
    r = _check(FREE, "<answer>\\boxed{12}</answer>", None)
    assert (r["correct"], r["checked_by"]) == (False, "rule_undecided")
    with StubJudgeServer(_scripted) as stub:
        r = _check(FREE, "<answer>\\boxed{12}</answer>", _checker(stub.url))
        assert (r["correct"], r["checked_by"], r["rule_correct"]) == (True, "llm", None)
        assert "VERDICT: CORRECT" in r["judge"]["verdict"]


class ScriptedEngine:
    """A stand-in rollout engine answering from a table; counts the prompts it was asked."""

    def __init__(self, responses):
        self.responses = responses
        self.asked = []

    def generate(self, prompts, sampling, n=1):
        assert sampling.greedy and n == 1
        out = []
        for i, p in enumerate(prompts):
            question = p.text
            self.asked.append(question)
            key = next(k for k in self.responses if k in question)
            text = self.responses[key]
            out.append(
                Completion(
                    prompt_index=i,
                    sample_index=0,
                    token_ids=np.arange(len(text.split()), dtype=np.int32),
                    logprobs=np.zeros(len(text.split()), np.float32),
                    text=text,
                    finish_reason="stop",
                )
            )
        return out


class TextOnlyProcessor:
    """Enough of pr1.data.processor.Processor for Prompt.build on problems without images."""

    pad_token_id = 0

    def __call__(self, questions, images, system=None):
        return {"input_ids": np.ones((1, 3), np.int32), "pixel_values": None, "image_grid_thw": None}

    def prompt_text(self, question, num_images=1, system=None):
        return question


def test_resume_generates_only_missing_and_rechecks_failed_llm_checks(tmp_path):
    problems = [
        EvalProblem(benchmark="toy", id=str(i), question=f"Q{i}: what is x?", images=(), answer="12")
        for i in range(6)
    ]
    responses = {
        f"Q{i}:": ("<answer>\\boxed{12}</answer>" if i % 2 == 0 else "x is 12, I believe") for i in range(6)
    }
    out = str(tmp_path / "toy.jsonl")
    engine = ScriptedEngine(responses)
    policy = run_lib.Policy(engine, TextOnlyProcessor(), "toy-model")
    # First run: the checker is down; the three responses without tags cannot be checked.
    with StubJudgeServer(_scripted, p_500=1.0) as down:
        recs = run_lib.evaluate(
            problems[:4], policy, out, batch_size=3, llm=_checker(down.url, retries=1), progress=None
        )
    assert [r["correct"] for r in recs] == [True, None, True, None]
    assert all(
        "answer checker" in r["error"] and "HTTP 500" in r["error"] for r in recs if r["correct"] is None
    )
    # The format instruction is appended to every question, as in training.
    assert all("<think> </think>" in q for q in engine.asked) and len(engine.asked) == 4
    # Second run, checker up: only problems 4 and 5 are generated; 1 and 3 are re-checked, not regenerated.
    with StubJudgeServer(_scripted) as up:
        recs = run_lib.evaluate(problems, policy, out, batch_size=3, llm=_checker(up.url), progress=None)
        assert up.stats()["requests"] == 3  # extractions for 1, 3 and 5
    assert len(engine.asked) == 6
    assert [r["id"] for r in recs] == [str(i) for i in range(6)]
    assert [r["correct"] for r in recs] == [True] * 6
    assert [r["extracted_by"] for r in recs] == ["answer_tag" if i % 2 == 0 else "llm" for i in range(6)] or [
        r["extracted_by"] for r in recs
    ] == ["boxed" if i % 2 == 0 else "llm" for i in range(6)]
    # The file holds the re-checked versions last; reading it back gives the final state.
    assert {k: v["correct"] for k, v in run_lib.read_records(out).items()} == {str(i): True for i in range(6)}
    # Another model's records in the same file are refused.
    with pytest.raises(ValueError, match="toy-model"):
        run_lib.evaluate(problems, run_lib.Policy(engine, TextOnlyProcessor(), "other"), out, progress=None)


def test_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"id": "1", "correct": True}) + "\n" + '{"id": "2", "corr')
    assert list(run_lib.read_records(str(path))) == ["1"]
    path.write_text('{"id": "2", "corr\n' + json.dumps({"id": "1", "correct": True}) + "\n")
    with pytest.raises(ValueError, match="r.jsonl:1"):
        run_lib.read_records(str(path))


def test_report_counts_by_hand(tmp_path):
    def rec(i, correct, task, checked_by="rule", extracted="1", finish="stop"):
        return {
            "id": str(i),
            "model": "m",
            "correct": correct,
            "checked_by": checked_by,
            "extracted": extracted,
            "finish_reason": finish,
            "subsets": {
                "task": task,
                "skills": "algebra; geometry" if i < 2 else "logic",
                "question_number": str(i),
            },
        }

    records = {
        "mathvista": [
            rec(0, True, "geo"),
            rec(1, False, "geo", extracted=None),
            rec(2, True, "fqa"),
            rec(3, None, "fqa", checked_by="llm"),
            rec(4, False, "fqa", checked_by="rule_undecided", finish="length"),
        ]
    }
    s = report.write_report(str(tmp_path), records)
    b = s["benchmarks"]["mathvista"]
    assert (b["n"], b["checked"], b["correct"], b["unchecked"]) == (5, 4, 2, 1)
    assert b["accuracy"] == 50.0  # 2 of the 4 checked
    assert (b["rule_undecided"], b["llm_checked"], b["no_answer"], b["truncated"]) == (1, 1, 1, 1)
    assert b["subsets"]["task"]["geo"]["accuracy"] == 50.0 and b["subsets"]["task"]["fqa"]["accuracy"] == 50.0
    assert b["subsets"]["skills"]["algebra"]["n"] == 2 and b["subsets"]["skills"]["logic"]["n"] == 3
    assert "question_number" not in b["subsets"]  # identifies problems; not a breakdown
    md = (tmp_path / "results.md").read_text()
    assert "| mathvista | 50.0 | 2 / 4 | 1 |" in md and "1 problems are unchecked" in md
    assert json.loads((tmp_path / "summary.json").read_text()) == s


def test_plot_eval_compares_runs(tmp_path):
    from pr1 import plot

    for name, acc in (("a", 60.0), ("b", 70.0)):
        d = tmp_path / name
        d.mkdir()
        (d / "summary.json").write_text(
            json.dumps(
                {
                    "model": name,
                    "benchmarks": {"mathvista": {"accuracy": acc}, "wemath": {"accuracy": acc - 5}},
                }
            )
        )
    assert (
        plot.main(
            ["--eval", str(tmp_path / "a"), "--eval", str(tmp_path / "b"), "--out", str(tmp_path / "p")]
        )
        == 0
    )
    assert (tmp_path / "p" / "eval.png").stat().st_size > 1000
    assert plot.main(["--eval", str(tmp_path / "missing"), "--out", str(tmp_path / "p")]) == 2  # one line
