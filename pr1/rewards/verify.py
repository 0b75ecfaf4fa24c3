"""Is an answer mathematically equal to the ground truth? math-verify, and how a worker process runs it.

Where it sits: the definition half of the accuracy reward (`accuracy.py` has the module docstring
with the reasons). `extract_answer` and `verify_answer` are the reward's definition;
`worker_init` and `run_item` run inside a verifier process, in its main thread, where the soft
timeout (SIGALRM) can interrupt sympy. Both runners use them: the reward stage's process pool
(`accuracy.AccuracyScorer`) and the one-item worker behind `accuracy_reward` (`verify_process`).
Nothing here starts a process.
"""

from __future__ import annotations

import logging
import re
import signal

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(response: str) -> str:
    """The content of the first <answer>…</answer> block, stripped; the whole response if none."""
    m = _ANSWER.search(response)
    return (m.group(1) if m else response).strip()


def _as_gold(answer: str) -> str:
    # Ground truths are bare expressions ("2\sqrt{3}"); math-verify parses bare LaTeX only up to the
    # first token it can read as an expression ("2"), so they are boxed unless already delimited.
    answer = str(answer).strip()
    if "\\boxed" in answer or "$" in answer:
        return answer
    return "\\boxed{" + answer + "}"


def verify_answer(content: str, answer: str) -> float:
    """1.0 iff math-verify finds `content` equal to the ground truth `answer`, in this process.

    No timeout of its own (math-verify's are disabled: they would fight over SIGALRM with the
    pool's timer); call it through `AccuracyScorer`, or from a main thread with your own guard.
    """
    from math_verify import parse, verify

    gold = parse(_as_gold(answer), parsing_timeout=None)
    pred = parse(content, parsing_timeout=None)
    return 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0


# ----------------------------------------------------------------------------------------------
# Worker side: what runs inside a verifier process (the pool's workers and `verify_process`)


class SoftTimeout(BaseException):
    # BaseException, not Exception: math-verify catches Exception everywhere and would turn the
    # timeout into an ordinary "not equal", which we could then not count.
    pass


def _on_alarm(signum, frame):
    raise SoftTimeout()


def worker_init(verify_fn) -> None:
    # verify_fn arrives as an argument so that unpickling it imports its module now, at start-up,
    # not on the clock of the first item.
    del verify_fn
    # Ctrl-C goes to the whole process group; the parent decides how to stop, not the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # With its own timeouts disabled math-verify warns once per process; we handle timeouts.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401  (pay the sympy import before the first timed item)


def run_item(verify_fn, content: str, answer: str, soft_timeout: float) -> tuple[str, float]:
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, soft_timeout)
    try:
        return "ok", float(verify_fn(content, answer))
    except SoftTimeout:
        return "timeout", 0.0
    except Exception:  # the released reward: any exception scores 0
        return "error", 0.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
