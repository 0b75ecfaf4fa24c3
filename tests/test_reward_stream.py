"""Rewards hidden behind generation: responses are scored as they finish (RewardStage.stream, a
server engine's generate(on_complete=...), pr1.train.rollout_ahead), not after the whole batch."""

import dataclasses
import hashlib
import re
import threading
import time

import numpy as np
import pytest

from pr1.bench.judge import StubJudgeServer, message_text, request_key
from pr1.data.processor import Processor
from pr1.models.generation import Completion, Prompt, SamplingParams, default_stop_token_ids
from pr1.models.tiny import write_tiny_checkpoint
from pr1.rewards.combine import RewardStage, rewards_config
from pr1.rollout.vllm import VLLMEngine
from pr1.train.metrics import StepTimer
from pr1.train.rollout_ahead import Rollouts
from tests.vllm_stub import StubBackend, VLLMStub

N = 4


def _verdicts(messages):
    """1 or 0 per annotation from a hash of the response: verdicts differ between responses."""
    m = len(re.findall(r"^\d+\. ", message_text(messages[-1]).split("<<<RESPONSE")[0], re.MULTILINE))
    bit = hashlib.sha256(request_key(messages).encode()).digest()[0] & 1
    return "".join(f"<info{k}>{bit}</info{k}>" for k in range(1, m + 1))


@dataclasses.dataclass
class Example:
    prompt: Prompt
    answer: str
    annotations: list


def _examples(k=3):
    return [
        Example(Prompt(input_ids=np.arange(5, dtype=np.int32), text=f"q{p}"), str(p), [f"AB = {p}", "x = 3"])
        for p in range(k)
    ]


class OneByOneEngine:
    """A server-like engine whose completions finish one at a time; before the last one finishes it
    waits (bounded) until the judge has been asked something, and records what it saw."""

    streams_completions = True

    def __init__(self, judge):
        self.judge = judge
        self.judge_requests_before_last = None

    def generate(self, prompts, sampling, n=1, on_complete=None):
        out = []
        total = len(prompts) * n
        for i in range(total):
            p, s = divmod(i, n)
            c = Completion(
                p,
                s,
                np.array([1, 2], np.int32),
                np.array([-0.1, -0.2], np.float32),
                f"AB = {p} so x = {3 + s} \\boxed{{{p if s % 2 else 9}}}",
                "stop",
            )
            if i == total - 1:
                deadline = time.monotonic() + 60
                while self.judge.requests == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                self.judge_requests_before_last = self.judge.requests
            out.append(c)
            on_complete(c)
        return out

    def sync_weights(self, params, step):
        pass


def test_rewards_are_requested_before_the_last_response_finishes():
    with StubJudgeServer(_verdicts, latency=0.05) as judge:
        cfg = rewards_config()
        cfg.judge.url, cfg.judge.retries, cfg.accuracy.workers = judge.url, 0, 1
        with RewardStage(cfg) as stage:
            engine = OneByOneEngine(judge)
            examples = _examples()
            rollouts = Rollouts(
                engine,
                iter([examples]),
                lambda k: SamplingParams(seed=k),
                n=N,
                off_policy_steps=0,
                total_steps=1,
                synced=0,
                rewards=stage,
            )
            got_examples, completions, future = rollouts.batch(1, None, StepTimer())
            streamed = future.result(timeout=120)
            assert got_examples is examples and len(completions) == len(examples) * N
            # The judge was asked while the batch's last response was still being generated.
            assert engine.judge_requests_before_last >= 1
            # Scoring response by response gives exactly what scoring the finished batch gives.
            batch = stage.submit(
                [c.text for c in completions],
                [examples[c.prompt_index].answer for c in completions],
                [examples[c.prompt_index].annotations for c in completions],
                group_size=N,
            ).result()
    np.testing.assert_array_equal(streamed.totals, batch.totals)
    for name, values in batch.components.items():
        np.testing.assert_array_equal(streamed.components[name], values, err_msg=name)
    assert streamed.metrics == batch.metrics
    # The case is not degenerate: accuracy and perception both vary over the batch.
    assert 0 < batch.components["accuracy"].mean() < 1 and 0 < batch.components["perception"].mean() < 1


def test_stream_refuses_a_missing_or_repeated_response():
    cfg = rewards_config()
    cfg.accuracy.workers = 1
    with RewardStage(cfg) as stage:
        stream = stage.stream(["1", "2"], [[], []], group_size=2)
        stream.add(0, "a")
        with pytest.raises(ValueError, match=r"responses \[1\] were never added"):
            stream.finish().result(timeout=60)
        with pytest.raises(IndexError):
            stream.add(2, "c")


def test_vllm_engine_hands_over_each_completion_as_it_finishes(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "tiny", seed=0)
    processor = Processor.from_dir(ckpt)
    prompts = [Prompt.build(processor, "What is x?"), Prompt.build(processor, "Hi")]
    seen, threads = [], set()
    lock = threading.Lock()

    def on_complete(c):
        with lock:
            seen.append(c)
            threads.add(threading.current_thread().name)

    with VLLMStub(StubBackend(str(ckpt))) as stub:
        engine = VLLMEngine(
            [stub.url],
            stop_token_ids=default_stop_token_ids(processor.tokenizer, processor.config),
            request_timeout_s=120.0,
            concurrency=4,
        )
        out = engine.generate(prompts, SamplingParams(max_new_tokens=4, seed=1), n=3, on_complete=on_complete)
        engine.close()
    assert len(out) == 6 and sorted(id(c) for c in seen) == sorted(id(c) for c in out)
    assert "MainThread" not in threads  # handed over from the request workers, not after the batch
