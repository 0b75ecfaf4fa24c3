"""One math-verify worker process behind `accuracy_reward`, the one-item public function.

Why not the reward stage's pool (`accuracy.AccuracyScorer`): its workers start with forkserver or
spawn, which re-import the caller's main module, so a script without an `if __name__ == "__main__":`
guard, code piped to `python -` or a notebook cell would run again inside every worker (and the pool
fails to start). This worker is a fresh `python -m pr1.rewards.verify_process`: nothing of the
caller is imported, so `accuracy_reward` works wherever Python runs. It keeps the pool's protection
against a hanging math-verify: a soft timeout per item inside the worker (SIGALRM in the worker's
main thread, which math-verify's sympy calls cannot swallow; the item scores 0) and a hard deadline
in the caller (timeout + kill_grace: sympy stuck in C code, where no signal handler runs, gets the
worker killed; the item scores 0 and the next call starts a new worker).

Protocol: one JSON object per line each way over the worker's stdin/stdout; the worker says
{"ready": true} once math-verify is imported, so start-up never counts against an item's deadline.
POSIX only (select on a pipe), like the SIGALRM timeouts themselves.
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import select
import subprocess
import sys
import threading
import time

from pr1.rewards.verify import extract_answer, run_item, worker_init

DEFAULT_VERIFY = "pr1.rewards.verify:verify_answer"


def _resolve(name: str):
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


class VerifyProcess:
    """Scores one (response, answer) at a time in a lazily started worker process.

    verify_fn: "module:function", a `(content, answer) -> float` the worker imports (default
    math-verify). timeout: seconds per item inside the worker; kill_grace: extra seconds before the
    worker is killed. `counters`: items, timeouts, errors, restarts. Thread-safe (calls are serialised).
    """

    def __init__(
        self,
        *,
        verify_fn: str = DEFAULT_VERIFY,
        timeout: float = 5.0,
        kill_grace: float = 5.0,
        startup_timeout: float = 120.0,
    ):
        if timeout <= 0 or kill_grace <= 0:
            raise ValueError(f"accuracy timeout and kill_grace must be > 0, got {timeout}, {kill_grace}")
        self.verify_fn = verify_fn
        self.timeout = float(timeout)
        self.kill_grace = float(kill_grace)
        self.startup_timeout = float(startup_timeout)
        self.counters = collections.Counter(items=0, timeouts=0, errors=0, restarts=0)
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._lock = threading.Lock()

    def score(self, response: str, answer: str) -> float:
        """1.0 iff the response's <answer> (else all of it) equals `answer`; 0.0 on timeout or error."""
        request = (
            json.dumps({"content": extract_answer(response), "answer": str(answer), "timeout": self.timeout})
            + "\n"
        )
        with self._lock:
            self.counters["items"] += 1
            proc = self._ensure()
            try:
                proc.stdin.write(request.encode())
                proc.stdin.flush()
                line = self._readline(proc, self.timeout + self.kill_grace)
            except OSError:  # the worker died under the write
                line = b""
            if not line:
                # No answer by the hard deadline (None: stuck in C code) or none at all (b"": it died).
                self.counters["timeouts" if line is None else "errors"] += 1
                self._kill()
                return 0.0
            reply = json.loads(line)
            if reply["status"] != "ok":
                self.counters[reply["status"] + "s"] += 1
            return float(reply["score"])

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                proc, self._proc = self._proc, None
                proc.stdin.close()  # the worker ends at EOF
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    # -- the worker process

    def _ensure(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pr1.rewards.verify_process", self.verify_fn],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            bufsize=0,
        )
        self._buf = b""
        ready = self._readline(self._proc, self.startup_timeout)
        if not ready or not json.loads(ready).get("ready"):
            self._kill()
            raise RuntimeError(
                f"the math-verify worker process ({sys.executable} -m pr1.rewards.verify_process "
                f"{self.verify_fn}) did not start within {self.startup_timeout:g}s; see its stderr"
            )
        return self._proc

    def _readline(self, proc: subprocess.Popen, timeout: float) -> bytes | None:
        """The next line (without newline); None past the deadline; b"" if the worker closed its end."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([proc.stdout], [], [], remaining)[0]:
                return None
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                return b""
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            self.counters["restarts"] += 1


def _serve(verify_fn_name: str) -> None:
    verify_fn = _resolve(verify_fn_name)
    # The protocol owns the real stdout; anything the verifier prints goes to stderr instead.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    worker_init(verify_fn)
    channel.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        status, score = run_item(verify_fn, request["content"], request["answer"], float(request["timeout"]))
        channel.write(json.dumps({"status": status, "score": score}) + "\n")


if __name__ == "__main__":
    _serve(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_VERIFY)
