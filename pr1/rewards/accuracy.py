"""The accuracy reward r_a: is the response's answer mathematically equal to the ground truth?

Where it sits: the reward stage calls `AccuracyScorer.score_batch` on every rollout batch (in a
thread, overlapping the judge calls); `combine` weights it 0.9. `accuracy_reward` is the one-item
public form: it runs in one worker process of its own (`verify_process`) with the same timeouts,
and works from any script, `python -` or a notebook.

Definition: take the text inside the first `<answer>…</answer>` (else the whole response) and score
1.0 iff math-verify says `verify(parse(boxed gold), parse(answer))`; any error is 0. Two deliberate
differences from the release (docs/fidelity.md): its `<answer>` regex has no DOTALL, so a multi-line
answer block never matches there and math-verify reads the whole response; and it parses the bare
gold, which truncates LaTeX golds (`2\\sqrt{3}` parses as 2) where we box it first.

Why a process pool: math-verify guards its sympy calls with `signal.alarm`, which only works in a
process's main thread, and the trainer calls rewards from a background thread. So each item runs
in a persistent worker process (the worker's main thread), under a per-item soft timeout raised
by our own interval timer; a timeout scores 0 and is counted. Sympy can also hang inside C code
where no signal handler runs (huge integer powers), so the parent keeps a hard deadline per item
too: past it the workers are killed and the pool rebuilt, the other in-flight items re-run. A
worker that dies (OOM killer, segfault) breaks the pool the same way; the items that were in flight
are re-run one at a time so the one that kills its worker is identified and scored 0 alone.

Workers start with "forkserver" (or "spawn"), never "fork": the trainer has JAX and its threads
loaded. Such children re-import the entry module as `__mp_main__`, so a program that uses the pool
(the trainer, the annotate pipeline) keeps its work under `if __name__ == "__main__":` and must not
touch devices at import time. The pool is the batched stage's implementation detail; the public
one-item function does not use it.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures as cf
import dataclasses
import logging
import multiprocessing
import os
import threading
import time
from typing import Callable, Sequence

import numpy as np

from pr1.rewards.verify import SoftTimeout, extract_answer, run_item, verify_answer, worker_init

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Parent side (the workers run `verify.worker_init` and `verify.run_item`)


def _ping() -> int:
    time.sleep(0.01)  # long enough that one idle worker cannot answer every ping of a round
    return os.getpid()


@dataclasses.dataclass
class AccuracyBatch:
    """Scores [N] float32 plus this batch's timeout and error counts."""

    scores: np.ndarray
    timeouts: int
    errors: int


class AccuracyScorer:
    """Scores (response, answer) pairs in a persistent, lazily started process pool.

    workers: pool size (0 or None: min(8, CPUs)). timeout: seconds per item inside the worker.
    kill_grace: extra seconds before the parent kills a worker that ignores the soft timeout.
    verify_fn: a picklable top-level `(content, answer) -> float` (default math-verify).
    start_method: "forkserver" (default) or "spawn"; never "fork", because the trainer process
    has JAX (and its threads) loaded and a forked copy of that state can deadlock.

    `counters` are cumulative: items, timeouts, errors, pool_restarts. Thread-safe (batches are
    serialised). `close()` stops the workers; the next call starts a new pool.
    """

    def __init__(
        self,
        *,
        workers: int | None = None,
        timeout: float = 5.0,
        kill_grace: float = 5.0,
        verify_fn: Callable[[str, str], float] = verify_answer,
        start_method: str = "forkserver",
        startup_timeout: float = 120.0,
    ):
        if timeout <= 0 or kill_grace <= 0:
            raise ValueError(f"accuracy timeout and kill_grace must be > 0, got {timeout}, {kill_grace}")
        if start_method == "fork":
            raise ValueError("start_method='fork' is unsafe with JAX loaded; use 'forkserver' or 'spawn'")
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.timeout = float(timeout)
        self.kill_grace = float(kill_grace)
        self.verify_fn = verify_fn
        self.start_method = start_method
        self.startup_timeout = startup_timeout
        self.counters = collections.Counter(items=0, timeouts=0, errors=0, pool_restarts=0)
        self._pool: cf.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    # -- pool lifecycle

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context(self.start_method)
            self._pool = cf.ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=worker_init, initargs=(self.verify_fn,)
            )
            # Wait until every worker has answered, so that start-up (seconds: sympy, and the
            # entry module that spawn/forkserver children re-import) never counts against an
            # item's deadline.
            seen: set[int] = set()
            deadline = time.monotonic() + self.startup_timeout
            try:
                while len(seen) < self.workers:
                    pings = [self._pool.submit(_ping) for _ in range(self.workers)]
                    seen.update(p.result(timeout=max(0.0, deadline - time.monotonic())) for p in pings)
            except Exception as e:
                self._kill_pool()
                raise RuntimeError(
                    f"the math-verify worker pool ({self.start_method}) did not start: {e!r}. Its "
                    "workers re-import the main module: scripts need an `if __name__ == '__main__':` "
                    "guard, and verify_fn must be importable by module name"
                ) from e
        return self._pool

    def _kill_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # ProcessPoolExecutor cannot cancel a running call; killing its processes is the only way
        # to stop a stuck one. `_processes` is private but stable since 3.3.
        procs = list((getattr(pool, "_processes", None) or {}).values())
        for p in procs:
            p.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.join(timeout=5)
        self.counters["pool_restarts"] += 1

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- scoring

    def score(self, response: str, answer: str) -> float:
        return float(self.score_batch([response], [answer]).scores[0])

    def score_batch(self, responses: Sequence[str], answers: Sequence[str]) -> AccuracyBatch:
        """Accuracy of each response against its answer; every item resolves (timeouts score 0)."""
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        with self._lock:
            return self._score_locked([extract_answer(r) for r in responses], [str(a) for a in answers])

    def _score_locked(self, contents: list[str], answers: list[str]) -> AccuracyBatch:
        n = len(contents)
        scores = np.zeros(n, np.float32)
        status = ["ok"] * n
        pending = collections.deque(range(n))
        suspects: collections.deque[int] = collections.deque()  # were in flight when a worker died
        running: dict[cf.Future, tuple[int, float]] = {}
        solo = None  # a suspect running alone: if the pool breaks now, it is the culprit
        hard = self.timeout + self.kill_grace

        def submit(pool, i):
            fut = pool.submit(run_item, self.verify_fn, contents[i], answers[i], self.timeout)
            running[fut] = (i, time.monotonic())

        while pending or suspects or running:
            pool = self._get_pool()
            if not running and suspects:
                solo = suspects.popleft()
                submit(pool, solo)
            elif solo is None:
                # Never more in flight than workers: a submitted item starts at once, so a
                # deadline counted from submission bounds its own run time, not its queueing.
                while pending and len(running) < self.workers:
                    submit(pool, pending.popleft())

            next_deadline = min(t0 for _, t0 in running.values()) + hard
            done, _ = cf.wait(
                list(running),
                timeout=max(0.0, next_deadline - time.monotonic()),
                return_when=cf.FIRST_COMPLETED,
            )
            broken = []
            for fut in done:
                i, _ = running.pop(fut)
                try:
                    status[i], scores[i] = fut.result()
                except cf.process.BrokenProcessPool:
                    broken.append(i)
                except SoftTimeout:  # the alarm fired in the worker's `finally`, after the call
                    status[i], scores[i] = "timeout", 0.0
                except Exception:
                    status[i], scores[i] = "error", 0.0
            if broken:
                # Every in-flight future of a broken pool fails; we cannot tell which item did it
                # unless it ran alone.
                broken += [i for i, _ in running.values()]
                running.clear()
                self._kill_pool()
                if solo is not None:
                    status[solo], scores[solo] = "error", 0.0
                    log.warning("math-verify item %d killed its worker; scored 0", solo)
                else:
                    suspects.extend(broken)
                    log.warning("a math-verify worker died; re-running %d items one at a time", len(broken))
                solo = None
                continue
            if not running:
                solo = None

            now = time.monotonic()
            expired = [f for f, (_, t0) in running.items() if now - t0 >= hard]
            if expired:
                for f in expired:
                    i, _ = running.pop(f)
                    status[i], scores[i] = "timeout", 0.0
                    log.warning(
                        "math-verify item %d ignored its %.1fs timeout; restarting the pool", i, self.timeout
                    )
                # The other in-flight items lose their workers too: run them again from the start.
                pending.extendleft(i for i, _ in running.values())
                running.clear()
                solo = None
                self._kill_pool()

        timeouts = status.count("timeout")
        errors = status.count("error")
        self.counters.update(items=n, timeouts=timeouts, errors=errors)
        return AccuracyBatch(scores, timeouts, errors)


_default_lock = threading.Lock()
_default_verifier = None


def default_verifier():
    """The process-wide `verify_process.VerifyProcess` behind `accuracy_reward` (started on first
    use, closed at exit)."""
    global _default_verifier
    with _default_lock:
        if _default_verifier is None:
            from pr1.rewards.verify_process import VerifyProcess

            _default_verifier = VerifyProcess()
            atexit.register(_default_verifier.close)
        return _default_verifier


def accuracy_reward(response: str, answer: str) -> float:
    """r_a for one response: 1.0 if its <answer> (else all of it) equals `answer` per math-verify.

    Runs in a worker process of its own (`default_verifier()`), 5 s per item, killed past 10 s;
    0.0 on timeout or error. Safe in a script without a main guard, under `python -` and in a
    notebook: the worker imports nothing of the caller. For batches use
    `AccuracyScorer.score_batch`, which keeps a pool of workers busy.
    """
    return default_verifier().score(response, answer)
