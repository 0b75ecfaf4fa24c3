"""A real vLLM server for the live tier, started and stopped by the tests themselves.

`PR1_VLLM_PYTHON` names the interpreter of a venv with vLLM (launch/vllm_cpu_env.sh builds one);
the server runs through launch/serve_vllm.sh (so the script is tested too) on 127.0.0.1 at a free
port, CPU build, fp32, dev mode on (rollout mode). Without the variable `require_vllm_python()`
skips, saying how to get one.

    server = VLLMServer(checkpoint_dir, log_path)
    server.start(); server.wait_healthy()
    server.url        # http://127.0.0.1:PORT
    server.kill()     # SIGKILL of the whole process group: a crash, not a shutdown
    server.stop()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = float(os.environ.get("PR1_VLLM_START_TIMEOUT", "600"))


def require_vllm_python() -> str:
    python = os.environ.get("PR1_VLLM_PYTHON")
    if not python:
        pytest.skip(
            "live tier: set PR1_VLLM_PYTHON to the python of a vLLM venv (build one with "
            "launch/vllm_cpu_env.sh DIR, then PR1_VLLM_PYTHON=DIR/bin/python python3 -m pytest -m live)"
        )
    if not os.access(python, os.X_OK):
        pytest.fail(f"PR1_VLLM_PYTHON={python} is not an executable interpreter")
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    def __init__(
        self,
        checkpoint: str,
        log_path: str,
        *,
        python: str | None = None,
        mode: str = "rollout",
        port: int | None = None,
        name: str = "tiny",
    ):
        self.checkpoint = str(checkpoint)
        self.log_path = str(log_path)
        self.python = python or require_vllm_python()
        self.mode = mode
        self.port = port or free_port()
        self.name = name
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(
            os.environ,
            PYTHON=self.python,
            DEVICE="cpu",
            HOST="127.0.0.1",
            PORT=str(self.port),
            NAME=self.name,
            MAX_MODEL_LEN="2048",
            CPU_KV_GIB="1",
        )
        # pr1's test process pins JAX and XLA flags; vLLM's torch must not inherit them.
        for key in ("XLA_FLAGS", "JAX_PLATFORMS"):
            env.pop(key, None)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [os.path.join(REPO, "launch", "serve_vllm.sh"), self.mode, self.checkpoint],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.close()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM server exited with {self.proc.returncode}; log: {self.log_path}\n"
                    + self.log_tail()
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"vLLM server at {self.url} not healthy within {timeout:g} s; log: "
                    f"{self.log_path}\n" + self.log_tail()
                )
            time.sleep(1.0)

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL to the server's process group (API server and engine core): a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
