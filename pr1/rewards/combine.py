"""The total reward: config, weighting, judge-failure policy, and the async reward stage.

Where it sits: after the rollout engine returns n responses per prompt, the trainer hands them to
`RewardStage.submit` (or awaits `RewardStage.score`) and computes logprobs meanwhile; the result's
`totals` go to `pr1.rl.grpo.group_advantages`, its `metrics` to the metric writers.

    R = w_a * r_a + w_f * r_f + w_v * r_v + w_p * r_p
      = 0.9 * accuracy + 0.1 * format + 0.7 * perception + repetition     (released run)

Failure policy for a response whose judgement still failed after retries (`judge.failure_policy`):
- "zero": r_v = 0 for it, counted (the paper's description; the released code crashes the step
  instead, see docs/fidelity.md).
- "drop": the perception term is removed from every response of its GRPO group, so no response is
  ranked against a sibling on a verdict that does not exist; the group keeps the other terms.
- "fail": raise `JudgeFailureError` (stop the step).
Under every policy the step raises when the failure rate (failed / judged) is above
`judge.max_failure_rate`: a judge that is down must stop the run, not quietly zero its reward.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Sequence

import ml_collections
import numpy as np

from pr1.http_policy import check_url
from pr1.rewards.accuracy import AccuracyScorer
from pr1.rewards.format import format_reward
from pr1.rewards.judge import Judge, LexicalJudge, OpenAIJudge
from pr1.rewards.perception import Judgement, as_annotations
from pr1.rewards.repetition import repetition_penalty

COMPONENTS = ("accuracy", "format", "perception", "repetition")
FAILURE_POLICIES = ("zero", "drop", "fail")


class JudgeFailureError(RuntimeError):
    """Too many (or, under policy "fail", any) perception judgements failed in one step."""


def rewards_config() -> ml_collections.ConfigDict:
    """Reward settings with the defaults of the released Perception-R1 run.

    weights: the coefficients of R (perception 0.7 as released; their code's default is 0.5).
    accuracy: math-verify pool (workers 0 = min(8, CPUs)), per-item timeout and kill grace (s).
    judge: url "" uses the offline LexicalJudge; otherwise an OpenAI-compatible base URL such as
    "http://judge-host:30000/v1". api_key_env names the environment variable with the key.
    judge.max_concurrency and judge.requests_per_minute are TOTALS for the judge service: they are
    split evenly over the training processes that call it (`judge_share`), so a 16-host pod with
    max_concurrency=512 keeps 512 requests in flight at the judge, 32 from each host, not 8,192.
    Each process's share is logged at start.
    """
    c = ml_collections.ConfigDict()
    c.weights = ml_collections.ConfigDict(dict(accuracy=0.9, format=0.1, perception=0.7, repetition=1.0))
    c.repetition = ml_collections.ConfigDict(dict(n=20, max_penalty=-2.0))
    c.accuracy = ml_collections.ConfigDict(dict(workers=0, timeout=5.0, kill_grace=5.0))
    c.judge = ml_collections.ConfigDict(
        dict(
            url="",
            model="Qwen2.5-32B-Instruct",
            api_key_env="PR1_JUDGE_API_KEY",
            temperature=0.0,
            max_tokens=512,
            max_concurrency=256,
            requests_per_minute=0.0,
            # Seconds, with the suffixes of the CLIs' service flags (--judge_timeout_s, ...).
            timeout_s=120.0,
            connect_timeout_s=10.0,
            retries=4,
            backoff_s=1.0,
            backoff_max_s=30.0,
            cache_size=200_000,
            failure_policy="zero",
            max_failure_rate=0.1,
            # Upper bound on one judge prompt, counted as UTF-8 bytes (a byte-level BPE token such as
            # Qwen's covers at least one byte, so bytes bound tokens from above): a request that could
            # exceed it is not sent and its judgement fails, naming the sizes. Qwen2.5-32B-Instruct
            # reads 32,768 tokens, max_tokens of which are the reply.
            max_prompt_tokens=32_000,
            # Ask the judge even when weights.perception is 0, so an accuracy-only run still logs its
            # perception reward (as a measurement: it does not enter the total).
            measure_unweighted=False,
        )
    )
    return c


def check_config(cfg) -> None:
    """Raises ValueError naming the offending `rewards.*` key."""
    for name in COMPONENTS:
        if name not in cfg.weights:
            raise ValueError(f"rewards.weights.{name} is missing")
    if cfg.judge.failure_policy not in FAILURE_POLICIES:
        raise ValueError(
            f"rewards.judge.failure_policy must be one of {FAILURE_POLICIES}, "
            f"got {cfg.judge.failure_policy!r}"
        )
    if not 0.0 <= cfg.judge.max_failure_rate <= 1.0:
        raise ValueError(
            f"rewards.judge.max_failure_rate must be in [0, 1], got {cfg.judge.max_failure_rate}"
        )
    j = cfg.judge
    if j.url:
        check_url(j.url, "rewards.judge.url", "http://host:port/v1", " (empty: the offline lexical judge)")
    for key in ("timeout_s", "connect_timeout_s"):
        if j[key] <= 0:
            raise ValueError(f"rewards.judge.{key} must be > 0, got {j[key]}")
    if j.retries < 0 or j.requests_per_minute < 0:
        key = "retries" if j.retries < 0 else "requests_per_minute"
        raise ValueError(f"rewards.judge.{key} must be >= 0, got {j[key]}")
    if j.max_prompt_tokens < 1:
        raise ValueError(f"rewards.judge.max_prompt_tokens must be >= 1, got {j.max_prompt_tokens}")
    if cfg.judge.max_concurrency < 1:
        raise ValueError(f"rewards.judge.max_concurrency must be >= 1, got {cfg.judge.max_concurrency}")
    if cfg.repetition.n < 1:
        raise ValueError(f"rewards.repetition.n must be >= 1, got {cfg.repetition.n}")
    if cfg.accuracy.timeout <= 0:
        raise ValueError(f"rewards.accuracy.timeout must be > 0, got {cfg.accuracy.timeout}")


def judge_share(judge_cfg, processes: int = 1) -> tuple[int, float]:
    """This process's (max_concurrency, requests_per_minute): the service totals split evenly over
    `processes` (concurrency rounded down, so the processes together never exceed the total)."""
    processes = int(processes)
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    total = int(judge_cfg.max_concurrency)
    if total < processes:
        raise ValueError(
            f"rewards.judge.max_concurrency={total} is the judge service's total, split over "
            f"{processes} processes: it must be at least {processes} (one request each)"
        )
    return total // processes, float(judge_cfg.requests_per_minute) / processes


def make_judge(judge_cfg, processes: int = 1) -> Judge:
    """OpenAIJudge for a configured URL (with this process's share of the service budget, see
    `judge_share`), else the offline LexicalJudge."""
    if not judge_cfg.url:
        return LexicalJudge()
    concurrency, rpm = judge_share(judge_cfg, processes)
    mine = ml_collections.ConfigDict(judge_cfg.to_dict())
    mine.max_concurrency, mine.requests_per_minute = concurrency, rpm
    return OpenAIJudge.from_config(mine)


# Metrics that count events: over several processes they add up (the rest are per-response means).
COUNT_METRICS = (
    "judge/failures",
    "judge/malformed",
    "judge/dropped_groups",
    "judge/neutralized",
    "accuracy/timeouts",
    "accuracy/errors",
)


@dataclasses.dataclass
class RewardOutput:
    """totals [N] float32; components: name -> [N] float32 (raw, unweighted; "perception" is the
    value that entered the total, "perception_used" 1/0); metrics: name -> float; judged: how many
    responses a judge call was made for (judge/failure_rate's denominator)."""

    totals: np.ndarray
    components: dict[str, np.ndarray]
    metrics: dict[str, float]
    judged: int = 0


def mean_metrics(components: dict[str, np.ndarray], totals: np.ndarray) -> dict[str, float]:
    """The per-response means of `RewardOutput.metrics`, from its components and totals (of one
    process, or gathered from all): perception over the responses whose judgement was used."""
    n = totals.shape[0]
    out = {
        f"rewards/{name}/mean": float(components[name].mean()) if n else 0.0
        for name in ("accuracy", "format", "repetition")
    }
    used = components["perception_used"] > 0
    out["rewards/perception/mean"] = float(components["perception"][used].mean()) if used.any() else 0.0
    out["rewards/total/mean"] = float(totals.mean()) if n else 0.0
    return out


def failure_rate(failures: float, judged: float) -> float:
    """judge/failure_rate: failed judgements over the responses a judge was asked about."""
    return failures / judged if judged else 0.0


def combine(
    accuracy,
    fmt,
    perception,
    repetition,
    *,
    failed=None,
    judged=None,
    malformed=None,
    group_size: int | None = None,
    config=None,
    first_error: str = "",
) -> RewardOutput:
    """Total reward per response from per-component arrays [N] and the judge's failure flags.

    failed: [N] bool, the judgement failed after retries. judged: [N] bool, a judge call was made
    (False for an empty annotation list); defaults to all True. malformed: [N] bool, for metrics.
    group_size: responses per prompt (contiguous), needed by the "drop" policy.
    config: a `rewards_config()` (defaults used when None).
    """
    cfg = config if config is not None else rewards_config()
    check_config(cfg)
    arrays = {
        name: np.asarray(x, np.float32)
        for name, x in zip(COMPONENTS, (accuracy, fmt, perception, repetition))
    }
    n = arrays["accuracy"].shape[0]
    for name, x in arrays.items():
        if x.shape != (n,):
            raise ValueError(f"{name} rewards have shape {x.shape}, expected ({n},)")
    failed = np.zeros(n, bool) if failed is None else np.asarray(failed, bool)
    judged = np.ones(n, bool) if judged is None else np.asarray(judged, bool)
    malformed = np.zeros(n, bool) if malformed is None else np.asarray(malformed, bool)

    policy = cfg.judge.failure_policy
    n_failed, n_judged = int(failed.sum()), int(judged.sum())
    rate = failure_rate(n_failed, n_judged)
    hint = f" First error: {first_error}" if first_error else ""
    if n_failed and policy == "fail":
        raise JudgeFailureError(
            f"{n_failed} of {n_judged} perception judgements failed this step and "
            f"rewards.judge.failure_policy='fail'.{hint}"
        )
    if rate > cfg.judge.max_failure_rate:
        raise JudgeFailureError(
            f"{n_failed} of {n_judged} perception judgements failed this step "
            f"({rate:.1%}), above rewards.judge.max_failure_rate="
            f"{cfg.judge.max_failure_rate}; is the judge server healthy?{hint}"
        )

    used = np.ones(n, bool)
    dropped_groups = 0
    if policy == "drop" and n_failed:
        if not group_size or n % group_size:
            raise ValueError(
                f"failure_policy 'drop' needs group_size dividing {n} responses, got {group_size}"
            )
        bad = failed.reshape(-1, group_size).any(axis=1)
        dropped_groups = int(bad.sum())
        used = ~np.repeat(bad, group_size)
    # Under "zero" a failed judgement contributes 0, whatever value the caller passed.
    perception = np.where(used & ~failed, arrays["perception"], 0.0).astype(np.float32)
    w = cfg.weights
    totals = (
        w.accuracy * arrays["accuracy"]
        + w.format * arrays["format"]
        + w.perception * perception
        + w.repetition * arrays["repetition"]
    ).astype(np.float32)

    components = dict(arrays, perception=perception, perception_used=used.astype(np.float32))
    metrics = mean_metrics(components, totals)
    metrics.update(
        {
            "judge/failures": float(n_failed),
            "judge/failure_rate": float(rate),
            "judge/malformed": float(malformed.sum()),
            "judge/dropped_groups": float(dropped_groups),
        }
    )
    return RewardOutput(totals, components, metrics, judged=n_judged)


class RewardStage:
    """Computes all reward terms of a rollout batch, asynchronously.

        `await stage.score(...)` from async code, or `stage.submit(...)` from the (synchronous) trainer:
        it returns a concurrent.futures.Future at once and runs on the stage's own event-loop thread,
        so the learner's logprob pass proceeds meanwhile. The accuracy pool runs in a worker thread of
        that loop, in parallel with the judge requests. `close()` stops the thread, the judge's idle
    connections and the accuracy pool (unless the scorer was passed in).
    """

    def budget_line(self) -> str:
        """One line saying what this process may ask of the judge service, for the start-up log."""
        if not isinstance(self.judge, OpenAIJudge):
            return f"judge: {self.judge!r} (in process, no service budget)"
        c = self.judge.client
        rpm = f"{c.requests_per_minute:g} requests/minute" if c.requests_per_minute else "no rate limit"
        total = self.cfg.judge
        return (
            f"judge {c.url}: this process's share of the service budget: {c.max_concurrency} requests "
            "in flight "
            f"(rewards.judge.max_concurrency={total.max_concurrency} in total), {rpm} "
            f"(rewards.judge.requests_per_minute={total.requests_per_minute:g} in total)"
        )

    def __init__(
        self,
        config=None,
        *,
        judge: Judge | None = None,
        scorer: AccuracyScorer | None = None,
        processes: int = 1,
    ):
        """processes: how many processes call the judge service (the training run's process count);
        each takes its share of the judge budget."""
        self.cfg = config if config is not None else rewards_config()
        check_config(self.cfg)
        self.judge = judge if judge is not None else make_judge(self.cfg.judge, processes)
        acc = self.cfg.accuracy
        self._owns_scorer = scorer is None  # a scorer passed in may be shared: its owner closes it
        self.scorer = (
            scorer
            if scorer is not None
            else AccuracyScorer(workers=acc.workers or None, timeout=acc.timeout, kill_grace=acc.kill_grace)
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def score(
        self,
        responses: Sequence[str],
        answers: Sequence[str],
        annotations: Sequence,
        *,
        group_size: int | None = None,
    ) -> RewardOutput:
        """Rewards of N responses; annotations[i] is a list or the `<info1>…` string form."""
        if not len(responses) == len(answers) == len(annotations):
            raise ValueError(
                f"{len(responses)} responses, {len(answers)} answers, "
                f"{len(annotations)} annotation lists: they must match"
            )
        anns = self.judged_annotations(annotations)
        acc_task = asyncio.create_task(asyncio.to_thread(self.scorer.score_batch, responses, answers))
        try:
            judgements: list[Judgement] = await self.judge.judge_many(zip(responses, anns))
        finally:
            acc = await acc_task  # never leave the pool busy behind our back
        return self._output(responses, acc.scores, acc.timeouts, acc.errors, judgements, anns, group_size)

    def judged_annotations(self, annotations: Sequence) -> list[list[str]]:
        """The annotation lists the judge is asked about: none with gamma = 0 (the accuracy-only
        baseline; verdicts would not count) unless judge.measure_unweighted asks for them as a
        measurement. The batch and the streamed paths both ask here."""
        judged = bool(self.cfg.weights.perception) or bool(self.cfg.judge.get("measure_unweighted", False))
        return [as_annotations(a) if judged else [] for a in annotations]

    def _output(self, responses, accuracy, timeouts, errors, judgements, anns, group_size) -> RewardOutput:
        rep = self.cfg.repetition
        failed = [j.failed for j in judgements]
        out = combine(
            accuracy,
            [format_reward(r) for r in responses],
            [j.score for j in judgements],
            [repetition_penalty(r, rep.n, rep.max_penalty) for r in responses],
            failed=failed,
            judged=[bool(a) for a in anns],
            malformed=[j.malformed for j in judgements],
            group_size=group_size,
            config=self.cfg,
            first_error=next((j.error for j in judgements if j.failed), ""),
        )
        out.metrics.update(
            {
                "accuracy/timeouts": float(timeouts),
                "accuracy/errors": float(errors),
                "judge/neutralized": float(sum(j.neutralized > 0 for j in judgements)),
            }
        )
        return out

    def stream(
        self, answers: Sequence[str], annotations: Sequence, *, group_size: int | None = None
    ) -> "RewardStream":
        """A batch of len(answers) responses scored as they arrive: `add(i, response)` from any thread
        as response i finishes (its judge request and accuracy check start then), `finish()` once all
        are added gives a Future of the same RewardOutput `submit` would."""
        return RewardStream(self, answers, annotations, group_size)

    def submit(self, responses, answers, annotations, *, group_size: int | None = None):
        """Starts `score` on the stage's loop thread; returns a concurrent.futures.Future."""
        return asyncio.run_coroutine_threadsafe(
            self.score(responses, answers, annotations, group_size=group_size), self._ensure_loop()
        )

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="pr1-rewards", daemon=True
                )
                self._thread.start()
            return self._loop

    def close(self) -> None:
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self.judge.aclose(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
        if self._owns_scorer:
            self.scorer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RewardStream:
    """One batch's rewards, scored response by response while the rest is still generating
    (`RewardStage.stream`). Judge requests start per response; accuracy checks are batched over
    whatever has arrived while the previous check ran (the math-verify pool is busy meanwhile)."""

    def __init__(self, stage: RewardStage, answers, annotations, group_size):
        if len(answers) != len(annotations):
            raise ValueError(
                f"{len(answers)} answers but {len(annotations)} annotation lists: they must match"
            )
        self.stage, self.group_size = stage, group_size
        self.answers = [str(a) for a in answers]
        self.anns = stage.judged_annotations(annotations)
        self.responses: list[str | None] = [None] * len(answers)
        self._loop = stage._ensure_loop()
        self._judged: dict[int, asyncio.Task] = {}
        self._accuracy = np.zeros(len(answers), np.float32)
        self._timeouts = self._errors = 0
        self._queue: list[int] = []
        self._drain: asyncio.Task | None = None
        self._session = None  # the judge client's keep-alive session, open from the first response to finish

    def add(self, i: int, response: str) -> None:
        """Response i has finished (thread-safe; call once per index)."""
        if not 0 <= i < len(self.responses):
            raise IndexError(f"response index {i} outside the batch of {len(self.responses)}")
        self._loop.call_soon_threadsafe(self._start, i, response)

    def finish(self):
        """After every add: a concurrent.futures.Future of the batch's RewardOutput."""
        return asyncio.run_coroutine_threadsafe(self._finish(), self._loop)

    def _start(self, i: int, response: str) -> None:  # on the stage's loop
        if self.responses[i] is not None:
            raise ValueError(f"response {i} added twice")
        self.responses[i] = response
        client = getattr(self.stage.judge, "client", None)
        if self._session is None and client is not None:
            # Scheduled before the first request: tasks start in order, and entering takes no await.
            self._session = client.session()
            asyncio.ensure_future(self._session.__aenter__())
        self._judged[i] = asyncio.ensure_future(self.stage.judge.judge(response, self.anns[i]))
        self._queue.append(i)
        if self._drain is None or self._drain.done():
            self._drain = asyncio.ensure_future(self._score_accuracy())

    async def _score_accuracy(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            acc = await asyncio.to_thread(
                self.stage.scorer.score_batch,
                [self.responses[i] for i in batch],
                [self.answers[i] for i in batch],
            )
            self._accuracy[batch] = acc.scores
            self._timeouts += acc.timeouts
            self._errors += acc.errors

    async def _finish(self) -> RewardOutput:
        missing = [i for i, r in enumerate(self.responses) if r is None]
        if missing:
            raise ValueError(f"RewardStream.finish: responses {missing[:8]} were never added")
        try:
            judgements = [await self._judged[i] for i in range(len(self.responses))]
        finally:
            while self._drain is not None and not self._drain.done():
                await self._drain  # never leave the pool busy behind our back
            if self._session is not None:
                await self._session.__aexit__(None, None, None)
        if self._drain is not None:
            self._drain.result()  # an accuracy-pool failure surfaces here
        return self.stage._output(
            self.responses,
            self._accuracy,
            self._timeouts,
            self._errors,
            judgements,
            self.anns,
            self.group_size,
        )
