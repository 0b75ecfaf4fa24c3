"""rollout.off_policy_steps=1 (pr1.train.rollout_ahead) in the real training loop against the vLLM
loopback stub: step k trains on responses sampled by weight version step-(k-2) (the params one update
behind the learner's), generated while step k-1 trained; the mismatch is logged; a run stopped
mid-way and resumed equals the uninterrupted one. Plus the npz store of in-flight completions."""

import hashlib
import json
import os
import re
import signal

import numpy as np
import pytest

from pr1.bench.judge import StubJudgeServer, message_text, request_key
from pr1.models.generation import Completion
from pr1.models.tiny import write_tiny_checkpoint
from pr1.train import checkpoint as checkpoint_lib
from pr1.train import rollout_ahead
from pr1.train.config import ConfigError, validate_config
from pr1.train.loop import train
from tests.test_train import small_debug
from tests.vllm_stub import StubBackend, VLLMStub

STEPS = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    path = tmp_path_factory.mktemp("ahead_assets")
    c = small_debug(path)
    write_tiny_checkpoint(c.model.path, seed=c.train.seed)
    return path


@pytest.fixture(scope="module")
def stub(assets):
    with VLLMStub(StubBackend(str(assets / "tiny"))) as s:
        yield s


def _verdicts(messages):
    """Verdicts that depend on the response text only (so both runs get the same): rewards vary
    within a group, advantages are not all zero and the params move."""
    m = len(re.findall(r"^\d+\. ", message_text(messages[-1]).split("<<<RESPONSE")[0], re.MULTILINE))
    bit = hashlib.sha256(request_key(messages).encode()).digest()[0] & 1
    return "".join(f"<info{k}>{bit}</info{k}>" for k in range(1, m + 1))


@pytest.fixture(scope="module")
def judge():
    with StubJudgeServer(_verdicts) as j:
        yield j


def _config(assets, url, off_policy, judge_url, **overrides):
    return small_debug(
        assets,
        **{
            "rollout.engine": "vllm",
            "rollout.vllm.urls": [url],
            "rewards.judge.url": judge_url,
            "rollout.off_policy_steps": off_policy,
            "train.steps": STEPS,
            "train.checkpoint_every": 100,
            "train.val_every": 0,
            "train.log_samples_every": 0,
            **overrides,
        },
    )


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_run(assets, stub, judge, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ahead") / "full")
    train(_config(assets, stub.url, 1, judge.url), workdir)
    return workdir


def test_learner_trains_on_the_previous_weight_version(full_run):
    rows = _rows(full_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # Step 1 is sampled by the initial weights; step k >= 2 by step-(k-2), one update behind the
    # step-(k-1) params the learner trains (on-policy would be k-1 and lag 0).
    assert [r["rollout/weight_version"] for r in rows] == [0, 0, 1, 2]
    assert [r["rollout/policy_lag"] for r in rows] == [0, 1, 1, 1]
    # The stale responses show in the logged sampler/learner mismatch: ~0 on-policy at step 1 (same
    # weights, fp32), clearly not at later steps, where the params moved (lr 1e-2).
    assert rows[0]["learner/sampler_trainer/logp_diff_max"] < 1e-3
    assert all(r["learner/sampler_trainer/logp_diff_max"] > 1e-2 for r in rows[1:])
    assert all(r["learner/grad_norm"] > 0 for r in rows)


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(
    assets, stub, judge, full_run, tmp_path, monkeypatch
):
    workdir = str(tmp_path / "stopped")
    real = rollout_ahead.Rollouts.after_update

    def stop_after_step_2(self, params, step):
        real(self, params, step)
        if step == 2:  # as a SIGTERM would: finish this step, save a checkpoint, return
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(rollout_ahead.Rollouts, "after_update", stop_after_step_2)
    train(_config(assets, stub.url, 1, judge.url), workdir)
    assert [r["step"] for r in _rows(workdir)] == [1, 2]
    # Step 3's responses were generated (by step-1 weights) while step 2 trained, and kept for the resume.
    assert os.path.exists(os.path.join(workdir, rollout_ahead.STORE_DIR, "step-3.p0.npz"))
    monkeypatch.setattr(rollout_ahead.Rollouts, "after_update", real)
    train(_config(assets, stub.url, 1, judge.url), workdir)

    a, b = _rows(full_run), _rows(workdir)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for key in (
            "rewards/total/mean",
            "learner/loss",
            "learner/grad_norm",
            "response/length_mean",
            "learner/sampler_trainer/logp_diff_max",
            "rollout/weight_version",
            "data/examples",
        ):
            assert ra[key] == rb[key], (ra["step"], key)
    pa, ha, _ = checkpoint_lib.read_params(checkpoint_lib.checkpoint_directory(full_run), STEPS)
    pb, hb, _ = checkpoint_lib.read_params(checkpoint_lib.checkpoint_directory(workdir), STEPS)
    for x, y in zip(jax_leaves(pa), jax_leaves(pb)):
        np.testing.assert_array_equal(x, y)
    assert ha["data"] == hb["data"]


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_off_policy_needs_a_server_engine(assets):
    c = small_debug(assets, **{"rollout.off_policy_steps": 1})
    with pytest.raises(ConfigError, match="rollout.off_policy_steps"):
        validate_config(c, check_files=False)
    c = small_debug(
        assets,
        **{"rollout.off_policy_steps": 2, "rollout.engine": "vllm", "rollout.vllm.urls": ["http://h:1"]},
    )
    with pytest.raises(ConfigError, match="rollout.off_policy_steps: must be 0 or 1"):
        validate_config(c, check_files=False)


def test_completion_store_round_trip_and_fingerprint(tmp_path):
    cs = [
        Completion(
            0,
            0,
            np.array([5, 6, 7], np.int32),
            np.array([-0.5, -1.0, -2.0], np.float32),
            "a b",
            "stop",
            "step-3",
        ),
        Completion(0, 1, np.zeros(0, np.int32), np.zeros(0, np.float32), "", "length", None),
    ]
    path = str(tmp_path / "x" / "step-4.p0.npz")
    rollout_ahead.save_completions(path, cs, "abc")
    back = rollout_ahead.load_completions(path, "abc")
    assert [(c.prompt_index, c.sample_index, c.text, c.finish_reason, c.weight_version) for c in back] == [
        (0, 0, "a b", "stop", "step-3"),
        (0, 1, "", "length", None),
    ]
    np.testing.assert_array_equal(back[0].token_ids, cs[0].token_ids)
    np.testing.assert_array_equal(back[0].logprobs, cs[0].logprobs)
    assert back[1].token_ids.size == 0
    assert rollout_ahead.load_completions(path, "other prompts") is None
    assert rollout_ahead.load_completions(str(tmp_path / "missing.npz"), "abc") is None
