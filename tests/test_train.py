"""The training program end to end: every stage on the debug config, SIGKILL + resume, config errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from pr1 import plot as plot_lib
from pr1.bench.judge import StubJudgeServer
from pr1.train import checkpoint as checkpoint_lib
from pr1.train.config import ConfigError, validate_config
from pr1.train.loop import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import debug as debug_config  # noqa: E402


def small_debug(assets, **overrides):
    c = debug_config.get_config(str(assets))
    c.data.synthetic.train_rows, c.data.synthetic.val_rows = 64, 8
    c.data.prompts_per_step = 4
    c.rollout.n = 4
    c.learner.micro_batches = 1  # 16 rows over the 8 fake devices: one micro-batch of 2 per device
    # The colour task: its lexical-judge rewards are nonzero from the first steps, so the params move
    # and run-to-run comparisons compare something (the debug task's "dots" scores ~1% at first).
    c.data.synthetic.task = "color"
    c.rollout.max_new_tokens = c.rollout.val_max_new_tokens = 4
    c.data.format_instruction = "Put the answer in \\boxed{}."
    c.train.steps = 3
    c.train.checkpoint_every = 2
    c.train.val_every = 3
    c.train.val_prompts = 4
    c.train.log_samples_every = 1
    c.train.tensorboard = False
    c.update_from_flattened_dict(overrides)
    return c


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tmp_path_factory.mktemp("debug_assets")


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_debug_steps_through_every_stage(assets, tmp_path):
    """Rollout, all reward terms (perception from a stub judge server), update, checkpoint, validation."""
    with StubJudgeServer(latency=0.01, p_500=0.2, seed=1) as judge:
        config = small_debug(
            assets,
            **{
                "rewards.judge.url": judge.url,
                "rewards.judge.backoff_s": 0.01,
                "rewards.judge.max_failure_rate": 1.0,
            },
        )
        workdir = str(tmp_path / "run")
        last = train(config, workdir)
        judged = judge.requests
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in (
            "rewards/accuracy/mean",
            "rewards/format/mean",
            "rewards/perception/mean",
            "rewards/repetition/mean",
            "rewards/total/mean",
            "learner/loss",
            "learner/grad_norm",
            "learner/entropy",
            "response/length_mean",
            "time/rollout",
            "time/update",
            "time/judge_wait",
            "perf/tokens_per_s",
            "grpo/frac_reward_zero_std",
        ):
            assert isinstance(r[key], float), key
        assert r["learner/finite"] == 1.0 and r["tokens/step"] > 0
    # The stub says 1 to every annotation: the perception term is really the judge's (retries hid the 500s).
    assert rows[0]["rewards/perception/mean"] == pytest.approx(1.0, abs=1e-5) and judged > 4 * 4
    assert rows[-1]["val/examples"] == 4.0 and "val/accuracy" in rows[-1]
    assert last["rewards/total/mean"] == rows[-1]["rewards/total/mean"]
    steps = checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(workdir)).all_steps()
    assert steps == [2, 3]
    assert json.load(open(os.path.join(workdir, "config.json")))["rollout"]["n"] == 4
    samples = [json.loads(line) for line in open(os.path.join(workdir, "samples.jsonl"))]
    assert {s["step"] for s in samples} == {1, 2, 3} and "response" in samples[0]
    pngs = plot_lib.plot(workdir)
    assert any(p.endswith("rewards.png") for p in pngs) and all(os.path.getsize(p) > 1000 for p in pngs)


def _cli(assets, workdir, steps, extra=()):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    args = [
        sys.executable,
        "-m",
        "pr1.train",
        "--config",
        f"{REPO}/configs/debug.py:{assets}",
        "--workdir",
        workdir,
        f"--config.train.steps={steps}",
        "--config.train.checkpoint_every=2",
        "--config.train.keep_checkpoints=10",
        "--config.train.val_every=0",
        "--config.train.tensorboard=False",
        "--config.data.prompts_per_step=4",
        "--config.rollout.n=4",
        "--config.rollout.max_new_tokens=4",
        "--config.data.synthetic.train_rows=64",
        "--config.data.format_instruction=Put the answer in \\boxed{}.",
        "--config.data.synthetic.task=color",
        *extra,
    ]
    return args, env


def test_sigkill_then_resume_matches_uninterrupted_run(assets, tmp_path):
    steps = 7  # killed after step 5: two steps of margin before the run would end on its own
    full = str(tmp_path / "full")
    args, env = _cli(assets, full, steps)
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = str(tmp_path / "killed")
    args, env = _cli(assets, killed, steps)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(killed, "metrics.jsonl")
    deadline = time.time() + 300
    # Kill once step 5 is logged and step 4's checkpoint is committed (it is saved in the background,
    # so on a loaded machine the commit may land after step 5's metrics): step 5's work is lost and
    # must be redone.
    committed = os.path.join(checkpoint_lib.checkpoint_directory(killed), "4")
    while time.time() < deadline and proc.poll() is None:
        if (
            os.path.isdir(committed)
            and os.path.exists(metrics)
            and any(json.loads(line)["step"] == 5 for line in open(metrics) if line.strip())
        ):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 4 in checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(killed)).all_steps()

    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 4" in resumed.stdout + resumed.stderr

    a, b = _rows(full), _rows(killed)
    assert any(r["learner/grad_norm"] > 0 for r in a)  # the params move, so equality means something
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):
        for key in (
            "rewards/total/mean",
            "rewards/accuracy/mean",
            "learner/loss",
            "learner/grad_norm",
            "response/length_mean",
            "data/examples",
        ):
            assert ra[key] == rb[key], (ra["step"], key)
    pa, ha, _ = checkpoint_lib.read_params(checkpoint_lib.checkpoint_directory(full), steps)
    pb, hb, _ = checkpoint_lib.read_params(checkpoint_lib.checkpoint_directory(killed), steps)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), pa, pb)
    assert ha["data"] == hb["data"]


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("rollout.n", 1, "rollout.n: GRPO needs at least 2"),
        ("learner.temperature", 0.7, "learner.temperature: must equal rollout.temperature"),
        ("train.mini_batches", 3, "train.mini_batches"),
        ("learner.loss_agg", "sum", "learner.loss_agg"),
        ("rewards.judge.failure_policy", "ignore", "rewards.judge.failure_policy"),
        ("data.prompts_per_step", 0, "data.prompts_per_step"),
        ("optim.schedule", "linear", "optim.schedule"),
        ("rollout.engine", "tensorrt", "rollout.engine"),
    ],
)
def test_bad_config_values_name_the_key(assets, key, value, match):
    config = small_debug(assets, **{key: value})
    with pytest.raises(ConfigError, match=match):
        validate_config(config)


def test_release_loss_scope_and_judge_budget_are_checked_up_front(assets):
    config = small_debug(
        assets, **{"learner.loss_agg": "chunk-token-mean", "learner.loss_chunk_responses": 0}
    )
    with pytest.raises(ConfigError, match="learner.loss_chunk_responses"):
        validate_config(config)
    # The judge's concurrency is the service's total: 4 cannot be split over 16 processes.
    config = small_debug(
        assets, **{"rewards.judge.url": "http://127.0.0.1:9/v1", "rewards.judge.max_concurrency": 4}
    )
    validate_config(config, num_processes=4)
    with pytest.raises(ConfigError, match="rewards.judge.max_concurrency=4 is the judge service's total"):
        validate_config(config, num_processes=16)


def test_bad_model_path_and_mesh(assets):
    config = small_debug(assets, **{"model.make_tiny_if_missing": False, "model.path": "/nonexistent/model"})
    with pytest.raises(ConfigError, match="model.path: /nonexistent/model is not a directory"):
        validate_config(config)
    config = small_debug(assets, **{"mesh.data": -1, "mesh.fsdp": -1})
    with pytest.raises(ConfigError, match="at most one axis may be -1"):
        validate_config(config)
    config = small_debug(assets, **{"mesh.fsdp": 3})
    with pytest.raises(ConfigError, match="mesh"):
        validate_config(config, num_devices=8)


def test_cli_rejects_bad_and_misspelled_keys(assets, tmp_path):
    args, env = _cli(assets, str(tmp_path / "w"), 2, ["--config.rollout.n=1"])
    bad = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "rollout.n" in bad.stderr
    args, env = _cli(assets, str(tmp_path / "w"), 2, ["--config.rollout.nn=4"])
    typo = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert typo.returncode != 0 and "nn" in typo.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")
