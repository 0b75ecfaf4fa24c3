"""The fault suite: a debug run killed with SIGKILL at random points and resumed, a judge and a rollout
server that fail under it, bad dataset rows and files, bad config values.

Every run here is a real `python -m pr1.train` process on one CPU device (or `pr1.train.loop.train`
in a process of its own where the command line cannot express the config), sharing one persistent
XLA compilation cache so that only the first compiles. The reference run and the faulted runs use
the same shapes, so they share compiled programs too. Findings that pr1 does not handle yet are
`xfail(strict=True)` with the bug in the reason: fix the bug and the test turns into a pass.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer

import jax
import numpy as np
import pytest

from pr1.bench.judge import StubJudgeServer
from pr1.data import config as data_config_lib
from pr1.data import dataset as D
from pr1.data import rows as data_rows
from pr1.data.processor import Processor
from pr1.models.tiny import write_tiny_checkpoint
from pr1.train import checkpoint as checkpoint_lib
from pr1.train.config import ConfigError, validate_config
from tests import faults_corpus as corpus
from tests.sglang_stub import SGLangStub, StubBackend

REPO = corpus.REPO
sys.path.insert(0, os.path.join(REPO, "configs"))
import debug as debug_config  # noqa: E402

STEPS = 6
PROMPTS, N = 2, 4  # 8 responses a step: every one logged to samples.jsonl
TRAIN_ROWS = 64  # no row comes back within the 12 prompts of a run: no judge cache hits
# Keys that are a deterministic function of the config and the data: equal in every run of it.
DETERMINISTIC = (
    "rewards/total/mean",
    "rewards/accuracy/mean",
    "rewards/perception/mean",
    "learner/loss",
    "learner/grad_norm",
    "learner/entropy",
    "response/length_mean",
    "tokens/step",
    "data/examples",
)


# ---- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of the training processes: one CPU device, a shared persistent compilation cache."""
    cache = tmp_path_factory.mktemp("xla_cache")
    return dict(
        os.environ,
        PYTHONPATH=REPO,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """configs/debug.py's assets dir, written before any run: the tiny checkpoint it would write
    (seed = train.seed = 0) and our own train file under the name the debug run looks for, which it
    then uses instead of writing synthetic data."""
    root = tmp_path_factory.mktemp("fault_assets")
    write_tiny_checkpoint(root / "tiny", seed=0)
    corpus.write_rows(root / "synthetic_train.parquet", [corpus.good_row(i) for i in range(TRAIN_ROWS)])
    corpus.write_rows(
        root / "synthetic_val.parquet", [corpus.good_row(i) for i in range(TRAIN_ROWS, TRAIN_ROWS + 4)]
    )
    return root


def linked_assets(assets, root, train_rows=None):
    """Another assets dir sharing the tiny checkpoint, with its own train file (or none)."""
    os.makedirs(root, exist_ok=True)
    os.symlink(assets / "tiny", os.path.join(root, "tiny"))
    shutil.copy(assets / "synthetic_val.parquet", os.path.join(root, "synthetic_val.parquet"))
    if train_rows is not None:
        corpus.write_rows(os.path.join(root, "synthetic_train.parquet"), train_rows)
    return root


@pytest.fixture(scope="module")
def judge():
    """A judge whose verdicts differ between responses, so GRPO advantages are not all zero and every
    step moves the params (with the debug run's offline judge and 4-token answers every reward is
    0 and a resumed run would match an uninterrupted one whatever it did)."""
    with StubJudgeServer(corpus.hashed_reply) as stub:
        yield stub


def cli_args(root, workdir, *extra):
    return [
        sys.executable,
        "-m",
        "pr1.train",
        "--config",
        f"{REPO}/configs/debug.py:{root}",
        "--workdir",
        str(workdir),
        f"--config.train.steps={STEPS}",
        "--config.train.checkpoint_every=1",
        "--config.train.keep_checkpoints=100",
        "--config.train.val_every=0",
        "--config.train.tensorboard=False",
        f"--config.data.prompts_per_step={PROMPTS}",
        f"--config.rollout.n={N}",
        "--config.train.log_samples_every=1",
        f"--config.train.samples_logged={PROMPTS * N}",
        *extra,
    ]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Run:
    """One training process in a session of its own (so SIGKILL takes its math-verify workers with
    it, as a lost machine would), its output in files, and when each of its step metrics lines and
    checkpoint directories (complete or in flight) first appeared."""

    started: list["Run"] = []

    def __init__(self, argv, env, workdir, log):
        self.workdir, self.log = str(workdir), str(log)
        self._files = [open(f"{log}.out", "w"), open(f"{log}.err", "w")]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            argv, env=env, cwd=REPO, stdout=self._files[0], stderr=self._files[1], start_new_session=True
        )
        Run.started.append(self)
        self.metrics_at: list[float] = []  # k-th metrics line (this process's) seen at
        self.saved_at: dict[int, float] = {}  # step -> complete checkpoint dir seen at
        self.saving_at: dict[int, float] = {}  # step -> its orbax tmp dir seen at
        self._metrics_size = -1

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def poll(self) -> bool:
        """Records what is on disk now; True while the process runs."""
        t = self.elapsed()
        metrics = os.path.join(self.workdir, "metrics.jsonl")
        if os.path.exists(metrics) and os.path.getsize(metrics) != self._metrics_size:
            self._metrics_size = os.path.getsize(metrics)
            with open(metrics) as f:
                lines = sum(1 for line in f if line.endswith("\n"))
            self.metrics_at.extend([t] * (lines - len(self.metrics_at)))
        directory = checkpoint_lib.checkpoint_directory(self.workdir)
        for name in os.listdir(directory) if os.path.isdir(directory) else ():
            head = name.split(".")[0]
            if head.isdigit():
                (self.saved_at if name == head else self.saving_at).setdefault(int(head), t)
        return self.proc.poll() is None

    def watch(self, until=lambda run: False, timeout=400.0, every=0.004) -> bool:
        """Polls until the process ends (False) or `until(self)` holds while it runs (True)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = self.poll()
            if not alive:
                return False
            if until(self):
                return True
            time.sleep(every)
        self.kill()
        raise TimeoutError(f"{self.log}: still running after {timeout} s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.finish()

    def finish(self, timeout=400.0) -> int:
        rc = self.proc.wait(timeout)
        for f in self._files:
            f.close()
        return rc

    def output(self) -> str:
        return "".join(open(f"{self.log}.{s}").read() for s in ("out", "err"))


@pytest.fixture(scope="module", autouse=True)
def _no_run_outlives_the_module():
    """A failed assertion must not leave a training process (and its workers) running."""
    yield
    for run in Run.started:
        if run.proc.poll() is None:
            run.kill()
    Run.started.clear()


def complete_steps(workdir) -> list[int]:
    directory = checkpoint_lib.checkpoint_directory(workdir)
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def tmp_dirs(workdir) -> list[str]:
    directory = checkpoint_lib.checkpoint_directory(workdir)
    return [n for n in os.listdir(directory) if not n.isdigit()] if os.path.isdir(directory) else []


def final_state(workdir, step=STEPS):
    params, host, _ = checkpoint_lib.read_params(checkpoint_lib.checkpoint_directory(workdir), step)
    return params, host


def assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def judge_fault_run(assets, env, tmp_path_factory):
    """A run against a judge that fails 30% of requests (HTTP 500, a hang past the client's 3 s
    timeout, a body cut short: 10% each) with no retries, so every fault is a failed judgement (the
    timeout is generous: a slow machine's late answer must not look like an injected hang).
    The module's first run: it also fills the compilation cache for the others."""
    base = tmp_path_factory.mktemp("judge_faults")
    with StubJudgeServer(p_500=0.1, p_hang=0.1, p_truncate=0.1, seed=3, hang_max=10.0) as stub:
        run = Run(
            cli_args(
                assets,
                base / "run",
                f"--config.rewards.judge.url={stub.url}",
                "--config.rewards.judge.retries=0",
                "--config.rewards.judge.timeout_s=3",
                "--config.rewards.judge.max_failure_rate=1.0",
            ),
            env,
            base / "run",
            base / "run",
        )
        run.watch(timeout=600)
        rc = run.finish()
        stats = stub.stats()
    return dict(rc=rc, run=run, stats=stats, workdir=run.workdir)


@pytest.fixture(scope="module")
def reference(assets, env, judge, judge_fault_run, tmp_path_factory):
    """The uninterrupted run every trial must reproduce, and its timeline (compiled programs come
    from the cache judge_fault_run filled, as they do for the trials)."""
    base = tmp_path_factory.mktemp("reference")
    judge_flag = f"--config.rewards.judge.url={judge.url}"
    run = Run(cli_args(assets, base / "run", judge_flag), env, base / "run", base / "run")
    run.watch()
    assert run.finish() == 0, run.output()[-3000:]
    params, host = final_state(run.workdir)
    return dict(
        workdir=run.workdir,
        run=run,
        rows=read_jsonl(os.path.join(run.workdir, "metrics.jsonl")),
        params=params,
        host=host,
        judge_flag=judge_flag,
    )


def test_reference_run_moves_the_params(reference):
    """Without this a bit-identical resume would prove nothing: params that never change match."""
    rows = reference["rows"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["learner/grad_norm"] > 0 for r in rows)
    first, _ = final_state(reference["workdir"], 1)
    assert any(
        not np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(reference["params"]))
    )


# ---- 1. SIGKILL at random points, resume ---------------------------------------------------------


def _kill_point(trial: str, ref_run: Run, rng: random.Random):
    """(until(run) -> bool, description): when to kill a fresh launch, drawn from the seeded rng over
    the reference run's timeline; each also fires on a later event so the kill always lands before
    the run could end on its own."""
    if trial == "startup":
        # Imports, config, model load, compilation of step 1: before the first checkpoint is begun.
        t = rng.uniform(0.2, min(ref_run.saving_at.get(1, 1e9), ref_run.saved_at[1]))
        return (lambda r: r.elapsed() >= t or 1 in r.saving_at or 1 in r.saved_at), f"at {t:.2f} s (startup)"
    if trial == "checkpoint_save":
        step = rng.randint(2, STEPS - 2)
        # While orbax writes the step under its tmp name (the save is async: the step runs on).
        return (
            lambda r: (
                any(s >= step for s in r.saving_at if s not in r.saved_at) or len(r.metrics_at) >= STEPS - 1
            )
        ), f"during the save of step {step}"
    # Anywhere in the training steps: rollout, judge wait, update, weight sync, metrics writes.
    # Timed from this launch's step 1, whose start-up may take longer or shorter than the reference's.
    t = rng.uniform(0.0, ref_run.metrics_at[STEPS - 2] - ref_run.metrics_at[0])
    return (
        lambda r: (r.metrics_at and r.elapsed() >= r.metrics_at[0] + t) or len(r.metrics_at) >= STEPS - 1,
        f"{t:.2f} s after step 1 was logged",
    )


@pytest.mark.parametrize("trial", ["startup", "checkpoint_save", "steps"])
def test_sigkill_at_a_random_point_then_resume_matches_uninterrupted_run(
    trial, reference, assets, env, tmp_path
):
    rng = random.Random(f"pr1-faults-{trial}")
    until, where = _kill_point(trial, reference["run"], rng)
    args = cli_args(assets, tmp_path / "run", reference["judge_flag"])
    victim = Run(args, env, tmp_path / "run", tmp_path / "killed")
    while True:
        assert victim.watch(until=until), f"the run ended before the kill {where}: {victim.output()[-2000:]}"
        if trial != "checkpoint_save":
            break
        # Frozen, the save cannot commit between our look at the disk and the kill.
        os.killpg(victim.proc.pid, signal.SIGSTOP)
        if any("orbax-checkpoint-tmp" in n for n in tmp_dirs(tmp_path / "run")):
            break
        os.killpg(victim.proc.pid, signal.SIGCONT)  # it committed meanwhile: wait for the next save
    victim.kill()
    saved = complete_steps(tmp_path / "run")
    if trial == "startup":
        assert not saved, f"killed {where} but steps {saved} were already saved"

    resumed = Run(args, env, tmp_path / "run", tmp_path / "resumed")
    resumed.watch()
    assert resumed.finish() == 0, resumed.output()[-3000:]
    out = resumed.output()
    if saved:
        assert f"resumed from step {saved[-1]} " in out, (saved, out[-2000:])
    else:
        assert "resumed from step" not in out
    assert not tmp_dirs(tmp_path / "run"), "the interrupted save was not cleaned up"

    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for want, got in zip(reference["rows"], rows):
        for key in DETERMINISTIC:
            assert got[key] == want[key], (trial, where, got["step"], key)
    params, host = final_state(tmp_path / "run")
    assert_trees_equal(params, reference["params"])
    assert host["data"] == reference["host"]["data"]


# ---- 1b. SIGTERM in the judge stage, a NaN loss, a checkpoint disk that fills ----------------------


def assert_resume_matches_reference(reference, assets, env, tmp_path, workdir, saved, *extra, run_env=None):
    """Resumes `workdir` (whose newest complete checkpoint is `saved`) to the end: every step logged
    once, and the same metrics and final params as the uninterrupted reference run."""
    assert complete_steps(workdir)[-1] == saved
    resumed = Run(
        cli_args(assets, workdir, reference["judge_flag"], *extra),
        run_env or env,
        workdir,
        tmp_path / "resumed",
    )
    resumed.watch()
    assert resumed.finish() == 0, resumed.output()[-3000:]
    assert f"resumed from step {saved} " in resumed.output()
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # no step repeated or lost
    for want, got in zip(reference["rows"], rows):
        for key in DETERMINISTIC:
            assert got[key] == want[key], (got["step"], key)
    params, host = final_state(workdir)
    assert_trees_equal(params, reference["params"])  # an optimizer step repeated would show here
    assert host["data"] == reference["host"]["data"]
    return resumed


SECRET = "sk-pr1-test-9d1f0c7e5b2a4c68"


def test_sigterm_in_the_judge_stage_then_resume_leaks_no_key(reference, assets, env, tmp_path):
    """SIGTERM while the judge holds step 2's requests: the step finishes, is saved, and the run exits
    0; the resume repeats no optimizer step (metrics and params equal the uninterrupted run's). The
    judge wants an API key from the environment; nothing the runs write (metrics, samples, logs,
    TensorBoard events, checkpoints, an export of the result) contains it."""
    workdir = tmp_path / "run"
    arrived, release = threading.Event(), threading.Event()
    metrics = os.path.join(workdir, "metrics.jsonl")

    def gated(messages):  # the stub's verdicts, after holding the first request of step 2
        if not arrived.is_set() and os.path.exists(metrics) and os.path.getsize(metrics) > 0:
            arrived.set()
            release.wait(300)
        return corpus.hashed_reply(messages)

    run_env = dict(env, PR1_JUDGE_API_KEY=SECRET)
    extra = ("--config.train.tensorboard=True",)
    with StubJudgeServer(gated, require_key=SECRET) as stub:
        flag = f"--config.rewards.judge.url={stub.url}"
        victim = Run(cli_args(assets, workdir, flag, *extra), run_env, workdir, tmp_path / "victim")
        assert victim.watch(until=lambda r: arrived.is_set()), victim.output()[-3000:]
        os.kill(victim.proc.pid, signal.SIGTERM)
        release.set()
        assert victim.finish() == 0, victim.output()[-3000:]
        out = victim.output()
        assert "got signal 15" in out and "stopped after step 2;" in out, out[-2000:]
        assert (
            "pr1.train: process 0: judge http://127.0.0.1:" in out
            and "this process's share of the service "
            "budget: 256 requests in flight (rewards.judge.max_concurrency=256 in total)"
            in out
        ), out[-2000:]
        assert [r["step"] for r in read_jsonl(metrics)] == [1, 2]
        resumed = assert_resume_matches_reference(
            dict(reference, judge_flag=flag), assets, env, tmp_path, workdir, 2, *extra, run_env=run_env
        )
    assert os.listdir(workdir / "tensorboard")

    from pr1.export import export

    export(str(workdir), str(tmp_path / "exported"))
    key = SECRET.encode()
    looked = 0
    for root in (workdir, tmp_path / "exported"):
        for dirpath, _, files in os.walk(root):
            for name in files:
                with open(os.path.join(dirpath, name), "rb") as f:
                    assert key not in f.read(), os.path.join(dirpath, name)
                looked += 1
    for run in (victim, resumed):
        assert SECRET not in run.output()
    assert looked > 20  # metrics, samples, config.json, events, checkpoint arrays and metadata, export


def fault_run(kind, step, assets, env, reference, tmp_path):
    workdir = tmp_path / "run"
    args = cli_args(assets, workdir, reference["judge_flag"])
    victim = Run(
        [sys.executable, "-m", "tests.fault_inject", *args[3:]],
        dict(env, PR1_TEST_FAULT=f"{kind}@{step}"),
        workdir,
        tmp_path / "victim",
    )
    victim.watch()
    rc = victim.finish()
    # pr1's one line; other lines may follow it (orbax's abandoned writes of a failed save report
    # into its closed event loop at exit).
    stopped = [
        line for line in open(f"{victim.log}.err").read().splitlines() if line.startswith("pr1.train: ")
    ]
    assert len(stopped) == 1, victim.output()[-3000:]
    return workdir, rc, stopped[0], victim


def test_nan_loss_stops_the_run_naming_the_step_and_the_last_checkpoint_resumes(
    reference, assets, env, tmp_path
):
    workdir, rc, last, victim = fault_run("nan", 3, assets, env, reference, tmp_path)
    assert rc == 1, victim.output()[-3000:]
    assert last.startswith("pr1.train: stopped: step 3: loss=nan"), last
    assert "Traceback" not in victim.output()
    assert complete_steps(workdir) == [1, 2]
    assert [r["step"] for r in read_jsonl(workdir / "metrics.jsonl")] == [1, 2]
    assert_resume_matches_reference(reference, assets, env, tmp_path, workdir, 2)


def test_checkpoint_disk_full_stops_the_run_naming_the_path_and_the_last_checkpoint_resumes(
    reference, assets, env, tmp_path
):
    workdir, rc, last, victim = fault_run("enospc", 3, assets, env, reference, tmp_path)
    directory = checkpoint_lib.checkpoint_directory(str(workdir))
    assert rc == 1, victim.output()[-3000:]
    # Found when the next save joins step 3's background write (or at exit): either way named.
    assert last.startswith(
        f"pr1.train: stopped: checkpoint save of step 3 to {directory}/3 failed: OSError: "
        "[Errno 28] No space left on device"
    ), last
    assert f"newest complete checkpoint in {directory} is step 2" in last
    assert complete_steps(workdir) == [1, 2]
    assert_resume_matches_reference(reference, assets, env, tmp_path, workdir, 2)
    assert not tmp_dirs(workdir)


# ---- 2. a judge that fails 30% of requests ---------------------------------------------------------


def test_judge_faults_become_counted_failures_with_zero_perception(judge_fault_run):
    """Under failure_policy "zero" a failed judgement gives r_v = 0 and is counted; the stub's
    default reply says 1 to every annotation, so r_v is 1 exactly when the judgement succeeded."""
    run = judge_fault_run
    assert run["rc"] == 0, run["run"].output()[-3000:]
    rows = read_jsonl(os.path.join(run["workdir"], "metrics.jsonl"))
    samples = read_jsonl(os.path.join(run["workdir"], "samples.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    failed = []
    for r in rows:
        step = [x for x in samples if x["step"] == r["step"]]
        assert len(step) == PROMPTS * N
        bad = [x for x in step if x["perception"] == 0.0]
        # r_v = sum(verdicts) / (m + 1e-6), as released: 1 - 5e-7 for two annotations judged 1.
        assert all(x["perception"] == pytest.approx(1.0, abs=1e-5) for x in step if x not in bad)
        assert r["judge/failures"] == len(bad), r["step"]
        assert r["judge/failure_rate"] == pytest.approx(len(bad) / len(step))
        assert r["rewards/perception/mean"] == pytest.approx(1 - len(bad) / len(step), abs=1e-5)
        failed += bad
    assert failed, "30% faults with no retries and not one failed judgement"

    # Against the stub's own books: with no retries and no row seen twice, each distinct (step, item,
    # response) is one request (identical responses to one item share it), and each failed one is
    # one injected fault.
    stats = run["stats"]
    assert sorted(stats["faults"]) == ["500", "hang", "truncate"], stats["faults"]
    assert stats["requests"] == len({(x["step"], x["prompt"], x["response"]) for x in samples})
    assert sum(stats["faults"].values()) == len({(x["step"], x["prompt"], x["response"]) for x in failed})


# ---- 3. a rollout server restarted mid-run --------------------------------------------------------


def _restart_on_same_port(stub: SGLangStub, backend: StubBackend, checkpoint_dir: str, down_s: float = 0.3):
    """What a crashed and relaunched SGLang server looks like to the trainer: connections refused or
    reset for a moment, then the same URL serving the checkpoint it was launched with (weight_version
    "default"), not the weights the trainer pushed last. SGLangStub binds a random port and has no
    restart, so this swaps its HTTP server for one on the same port."""
    old = stub._server
    old.shutdown()
    old.server_close()
    backend.load(checkpoint_dir, "default")
    time.sleep(down_s)
    fresh = ThreadingHTTPServer(("127.0.0.1", stub.port), old.RequestHandlerClass)
    fresh.daemon_threads = True
    stub._server = fresh
    stub._thread = threading.Thread(target=fresh.serve_forever, daemon=True)
    stub._thread.start()


@pytest.fixture(scope="module")
def sglang_restart_run(assets, env, judge, reference, tmp_path_factory):
    base = tmp_path_factory.mktemp("sglang_restart")
    backend = StubBackend(str(assets / "tiny"))
    stub = SGLangStub(backend)
    overrides = {
        "train.steps": STEPS,
        "train.checkpoint_every": 1,
        "train.keep_checkpoints": 100,
        "train.val_every": 0,
        "train.tensorboard": False,
        "data.prompts_per_step": PROMPTS,
        "rollout.n": N,
        "train.log_samples_every": 1,
        "train.samples_logged": PROMPTS * N,
        "rewards.judge.url": judge.url,
        "rollout.engine": "sglang",
        "rollout.sglang.urls": [stub.url],
        "rollout.sglang.max_attempts": 10,
        "rollout.sglang.backoff_base_s": 0.2,
        "rollout.sglang.backoff_cap_s": 2.0,
    }
    run = Run(corpus.train_command(assets, base / "run", overrides), env, base / "run", base / "run")
    restarts = []
    try:

        def syncs():  # the initial weight sync is the first, step k's the (k+1)-th
            return stub.stats()["requests"].get("/continue_generation", 0)

        # Down right after step k's weight sync, so step k+1's /generate requests meet it; if they
        # slipped through before the server went down, again after the next step.
        for k in range(2, STEPS - 1):
            if not run.watch(until=lambda r: syncs() >= k + 1, every=0.001):
                break
            _restart_on_same_port(stub, backend, str(assets / "tiny"))
            restarts.append((k, stub.stats()["requests"].get("/generate", 0)))
            if not run.watch(until=lambda r: len(r.metrics_at) >= k + 1):
                break
            if "failed (connection)" in open(f"{run.log}.err").read():
                break
        run.watch()
        rc = run.finish()
    finally:
        stub.close()
    return dict(rc=rc, run=run, restarts=restarts, stats=stub.stats(), workdir=run.workdir)


def test_rollout_server_restarted_mid_run_the_run_completes(sglang_restart_run):
    run = sglang_restart_run
    assert run["rc"] == 0, run["run"].output()[-3000:]
    assert run["restarts"], "the run ended before the server could be restarted"
    rows = read_jsonl(os.path.join(run["workdir"], "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # The restart really met requests (the engine logs each retried /generate by kind) ...
    assert "failed (connection)" in run["run"].output()
    # ... and the restarted server served the rest of the run.
    assert run["stats"]["requests"]["/generate"] > run["restarts"][-1][1]


def test_rollout_retries_are_counted_in_metrics(sglang_restart_run):
    assert sglang_restart_run["rc"] == 0
    rows = read_jsonl(os.path.join(sglang_restart_run["workdir"], "metrics.jsonl"))
    retries = [v for r in rows for k, v in r.items() if k.startswith("rollout/") and "retries" in k]
    assert retries and max(retries) > 0


def test_restarted_rollout_server_samples_the_current_policy(sglang_restart_run):
    run = sglang_restart_run
    assert run["rc"] == 0
    rows = read_jsonl(os.path.join(run["workdir"], "metrics.jsonl"))
    samples = read_jsonl(os.path.join(run["workdir"], "samples.jsonl"))
    # Steps that sampled a special token say nothing about the weights: the learner puts an image
    # feature at every <|image_pad|> of the row, the response's included, where the sampler had
    # embedded the token itself (logp_diff_max 0.03 on such a step without any restart).
    plain = [
        r
        for r in rows
        if r["step"] > run["restarts"][0][0]
        and not any("<|" in s["response"] for s in samples if s["step"] == r["step"])
    ]
    if not plain:
        pytest.skip("every step after the restart sampled a special token")
    assert max(r["learner/sampler_trainer/logp_diff_max"] for r in plain) < 1e-3


# ---- 4a. bad dataset rows and files ---------------------------------------------------------------


@pytest.fixture(scope="module")
def processor(assets):
    return Processor.from_dir(str(assets / "tiny"))


def data_cfg(files, **overrides):
    cfg = data_config_lib.data_config()
    cfg.train_files = list(files)
    cfg.prompts_per_step = 2
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def train_batches(files, processor, k, **overrides):
    it = D.train_iterator(data_cfg(files, **overrides), processor, process_index=0, process_count=1)
    return it, [next(it) for _ in range(k)]


@pytest.mark.parametrize("case", corpus.BAD_ROWS, ids=lambda c: c.name)
def test_bad_row_is_a_named_error_or_a_counted_skip(case, processor, tmp_path):
    path = corpus.write_bad_row_file(tmp_path, case)
    name = os.path.basename(path)
    # Four batches of two: epochs 0 and 1 of the four good rows, so the bad row is met at least once.
    # Found at open it is an error at once; found while reading, with data.max_bad_rows=0.
    with pytest.raises(data_rows.DataError) as info:
        train_batches([path], processor, 4, **({} if case.at_open else {"max_bad_rows": 0}))
    message = str(info.value)
    assert message.startswith(f"{path}: row 2: field '{case.field}': "), message
    assert (info.value.path, info.value.row, info.value.field, info.value.reason) == (
        path,
        2,
        case.field,
        case.reason,
    )

    # Skipped: with skip_bad_rows, or (found while reading) within the default data.max_bad_rows.
    it, batches = train_batches([path], processor, 4, **({"skip_bad_rows": True} if case.at_open else {}))
    uids = [e.uid for batch in batches for e in batch]
    assert sorted(set(uids)) == [f"{name}:{i}" for i in (0, 1, 3, 4)] and len(uids) == 8
    assert it.stats["bad_rows"] == 1  # distinct rows
    counted = it.stats[f"bad_rows/{case.reason}"]
    # At open a bad cheap field is counted once; a bad image each time the row is met (once an epoch).
    assert counted == 1 if case.at_open else 1 <= counted <= 2
    assert (
        it.stats["skipped_bad_rows"]
        == sum(it.stats[f"bad_rows/{r}"] for r in data_rows.BAD_ROW_REASONS)
        == counted
    )


@pytest.mark.parametrize("name", sorted(corpus.WRONG_TYPE_COLUMNS))
def test_column_of_the_wrong_type_names_row_0_then_leaves_no_rows(name, processor, tmp_path):
    path = corpus.write_wrong_type_column(tmp_path, name)
    field = corpus.WRONG_TYPE_COLUMNS[name][0]
    with pytest.raises(data_rows.DataError) as info:
        train_batches([path], processor, 1)
    assert str(info.value).startswith(f"{path}: row 0: field '{field}': "), str(info.value)
    with pytest.raises(data_rows.DataError, match="no usable rows") as info:
        train_batches([path], processor, 1, skip_bad_rows=True)
    assert path in str(info.value)


BAD_FILES = [
    "empty_file",
    "not_parquet",
    "truncated_parquet",
    "missing_file",
    "no_problem_column",
    "no_images_column",
    "zero_rows",
]


@pytest.mark.parametrize("name", BAD_FILES)
def test_unreadable_file_is_a_named_error_even_when_skipping_rows(name, processor, tmp_path):
    path, pattern = corpus.bad_files(tmp_path)[name]
    good = corpus.write_rows(tmp_path / "good.parquet", [corpus.good_row(i) for i in range(4)])
    for skip in (False, True):
        # A bad file among good ones is not skipped: its rows would vanish from every epoch unseen.
        files = [path] if name == "zero_rows" else [good, path]
        with pytest.raises(data_rows.DataError, match=pattern) as info:
            train_batches(files, processor, 1, skip_bad_rows=skip)
        assert path in str(info.value)
    if name == "zero_rows":  # an empty file beside a good one takes nothing away
        _, batches = train_batches([good, path], processor, 2)
        assert sorted(e.uid for b in batches for e in b) == [f"good.parquet:{i}" for i in range(4)]


def test_bad_rows_in_a_run_are_skipped_and_counted(assets, env, reference, tmp_path):
    """A run over a file holding one row of every kind a file of the standard schema can hold."""
    mixed = [case for case in corpus.BAD_ROWS if case.schema is corpus.SCHEMA]
    rows = [corpus.good_row(i) for i in range(8)]
    rows += [{**corpus.good_row(100 + k), **case.overrides} for k, case in enumerate(mixed)]
    root = linked_assets(assets, tmp_path / "assets", rows)
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not an image\n")
    run = Run(
        cli_args(root, tmp_path / "run", reference["judge_flag"], "--config.data.skip_bad_rows=True"),
        env,
        tmp_path / "run",
        tmp_path / "run",
    )
    run.watch()
    assert run.finish() == 0, run.output()[-3000:]
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))
    last = metrics[-1]
    # 12 prompts from 8 good rows: all of epoch 0 is read, so every bad image is met once or twice.
    for reason in {case.reason for case in mixed}:
        n = sum(case.reason == reason for case in mixed)
        at_open = all(case.at_open for case in mixed if case.reason == reason)
        got = last[f"data/bad_rows/{reason}"]
        assert (got == n) if at_open else (n <= got <= 2 * n), (reason, got, n)
    assert last["data/skipped_bad_rows"] == sum(last[f"data/bad_rows/{r}"] for r in data_rows.BAD_ROW_REASONS)
    assert last["data/bad_rows"] == len(mixed)  # distinct rows, each named in the log when first met
    for case in mixed:
        if not case.at_open:
            assert re.search(r"skipping bad row synthetic_train\.parquet:\d+ ", run.output()), run.output()[
                -3000:
            ]
    good = {corpus.good_row(i)["problem"].removeprefix("<image>") for i in range(8)}
    assert {s["prompt"] for s in read_jsonl(tmp_path / "run" / "samples.jsonl")} <= good


# ---- 4b. bad configs ------------------------------------------------------------------------------

# The runs' shape (2 prompts x 4 responses), so the divisibility cases divide as intended.
BASE = {
    "data.prompts_per_step": PROMPTS,
    "rollout.n": N,
    "learner.micro_batches": 1,
}  # 8 rows on the 8-device mesh of the CLI cases


def _xfail_if(reason):
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.name, marks=_xfail_if(c.bug)) for c in corpus.BAD_CONFIGS]
)
def test_validate_config_names_the_key(case, assets):
    config = corpus.apply_overrides(debug_config.get_config(str(assets)), {**BASE, **case.overrides})
    with pytest.raises(ConfigError) as info:
        validate_config(config, num_devices=8)
    assert str(info.value).startswith(case.key), str(info.value)


# config_flags cannot override list-typed keys (see test_cli_can_set_the_train_files).
CLI_CONFIGS = [c for c in corpus.BAD_CONFIGS if not any(isinstance(v, list) for v in c.overrides.values())]


@pytest.fixture(scope="module")
def cli_results(assets, tmp_path_factory):
    """Every command-line case below, run by one forking harness on the 8-device CPU mesh."""
    base = tmp_path_factory.mktemp("cli")
    cases = {}

    def case(name, root, *extra):
        cases[name] = [
            "--config",
            f"{REPO}/configs/debug.py:{root}",
            "--workdir",
            str(base / name),
            "--config.train.steps=1",
            "--config.train.tensorboard=False",
            *(f"--config.{k}={v}" for k, v in BASE.items()),
            *extra,
        ]

    for c in CLI_CONFIGS:
        case(c.name, assets, *c.cli_args())
    case("wrong_type", assets, "--config.rollout.n=four")
    case("misspelled_key", assets, "--config.rollout.nn=4")
    case(
        "train_files_flag",
        assets,
        "--config.data.train_files=/nonexistent/train.parquet",
        "--config.data.synthetic.enabled=False",
    )
    nodata = linked_assets(assets, base / "nodata_assets")
    case("data_file_missing", nodata, "--config.data.synthetic.enabled=False")
    for row in ("problem_is_null", "image_bytes_not_an_image"):
        bad = next(c for c in corpus.BAD_ROWS if c.name == row)
        root = linked_assets(assets, base / f"{row}_assets")
        os.replace(
            corpus.write_bad_row_file(root, bad, rows=8, bad=0), os.path.join(root, "synthetic_train.parquet")
        )
        # Unshuffled, step 1 reads row 0 first: the bad image is met in the first batch.
        case(row, root, "--config.data.shuffle=False")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return corpus.run_cli_cases(cases, env=env, workdir=str(base)), base


def _one_line_exit_2(result, *words):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.name, marks=_xfail_if(c.cli_reason)) for c in CLI_CONFIGS]
)
def test_cli_bad_config_is_one_line_and_exit_2(case, cli_results):
    results, base = cli_results
    _one_line_exit_2(results[case.name], "pr1.train: bad config: ", case.key)
    assert not os.path.exists(base / case.name / "checkpoints")


def test_cli_value_of_the_wrong_type_names_the_flag(cli_results):
    # absl's flag error, raised before pr1 sees the config, as one line naming the flag (exit 2).
    _one_line_exit_2(cli_results[0]["wrong_type"], "config.rollout.n=four", "invalid literal for int()")


def test_cli_misspelled_key_is_a_usage_error_not_a_traceback(cli_results):
    result = cli_results[0]["misspelled_key"]
    assert result.returncode != 0 and "Traceback" not in result.stderr and "rollout.nn" in result.stderr


def test_cli_can_set_the_train_files(cli_results):
    _one_line_exit_2(cli_results[0]["train_files_flag"], "data.train_files")


@pytest.mark.parametrize(
    "name,words",
    [
        (
            "data_file_missing",
            ["bad config: data.train_files:", "synthetic_train.parquet: parquet file not found"],
        ),
        ("problem_is_null", ["bad data:", "synthetic_train.parquet: row 0: field 'problem'"]),
        (
            "image_bytes_not_an_image",
            ["bad data:", "synthetic_train.parquet: row 0: field 'images[0]'", "cannot decode"],
        ),
    ],
)
def test_cli_data_error_is_one_line_naming_file_row_and_field(name, words, cli_results):
    """Not a traceback from inside JAX or grain: one line with pr1's DataError (or ConfigError) text."""
    _one_line_exit_2(cli_results[0][name], *words)


# ---- a kill while the debug run writes its tiny checkpoint -----------------------------------------


def test_a_kill_while_the_tiny_checkpoint_is_written_leaves_no_checkpoint(assets, env, reference, tmp_path):
    """The debug run keeps any existing model.path, so a half-written tiny checkpoint (weights but no
    tokenizer) would break every later run: killed between the two writes, nothing must be left."""
    target = tmp_path / "assets" / "tiny"
    code = (
        "import os, sys; import pr1.models.tiny as t\n"
        "t.write_tokenizer_files = lambda *a, **k: os._exit(9)  # killed after the weights are written\n"
        f"t.write_tiny_checkpoint({str(target)!r})"
    )
    killed = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PYTHONPATH": REPO},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert not target.exists()
    root = tmp_path / "assets"
    for name in ("synthetic_train.parquet", "synthetic_val.parquet"):
        shutil.copy(assets / name, root / name)
    run = Run(
        cli_args(root, tmp_path / "run", reference["judge_flag"], "--config.train.steps=1"),
        env,
        tmp_path / "run",
        tmp_path / "run",
    )
    run.watch()
    assert run.finish() == 0, run.output()[-2000:]
