"""Where a run reports itself: metrics.jsonl, TensorBoard, optional W&B, a progress line, step timers.

Only process 0 writes. `metrics.jsonl` holds one JSON object per step (`step` plus flat
"group/name" keys) and is appended across restarts, so a resumed run continues the same file; rows
of steps after the checkpoint a run resumed from are dropped first (they were redone).

With several processes each holds only its own responses; `rollout_metrics`, `reward_metrics` and
`data_metrics` are collectives that report the GLOBAL batch. Means are taken over the gathered
per-response values, in process order (which is the one-process row order), so a k-process run
logs the same numbers, bit for bit, as one process with the same global batch; counts are summed.
Timings (time/*) are process 0's own.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

import jax
import numpy as np

from pr1 import distributed
from pr1.rewards.combine import COUNT_METRICS, RewardOutput, failure_rate, mean_metrics

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


class StepTimer:
    """Wall time of the named phases of one step: `with timer("rollout"): ...` → time/rollout."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.times.items()}


def _truncate_after(path: str, step: int) -> None:
    """Drop rows of steps > `step` (work a crash lost and the resumed run redoes)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                continue  # a line cut by the crash
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class MetricsWriter:
    """Writes step metrics (process 0 only). `wandb_project` empty: no W&B."""

    def __init__(
        self,
        workdir: str,
        *,
        resume_step: int = 0,
        tensorboard: bool = True,
        wandb_project: str = "",
        run_name: str = "",
        config_dict: dict | None = None,
    ):
        self.enabled = jax.process_index() == 0
        self.workdir = workdir
        self._tb = self._wandb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        self.samples_path = os.path.join(workdir, SAMPLES_FILE)
        _truncate_after(self.path, resume_step)
        _truncate_after(self.samples_path, resume_step)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ValueError(
                    "train.wandb_project is set but wandb is not installed (pip install wandb)"
                ) from None
            self._wandb = wandb.init(
                project=wandb_project, name=run_name or None, config=config_dict, resume="allow"
            )

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _plain(v) for k, v in sorted(metrics.items())})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def write_samples(self, step: int, samples: list[dict]) -> None:
        if not self.enabled or not samples:
            return
        with open(self.samples_path, "a") as f:
            for s in samples:
                f.write(json.dumps({"step": int(step), **s}) + "\n")
        if self._tb is not None:
            text = "\n\n".join(
                f"**reward {s.get('reward', 0):.3f}**\n\n```\n{s.get('response', '')}\n```" for s in samples
            )
            self._tb.add_text("samples", text, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def rollout_metrics(completions, tokens: int) -> dict[str, float]:
    """Response lengths and finish reasons over every process's completions; `tokens` is this
    process's count of real tokens in its learner rows."""
    lengths = distributed.allgather_host(np.array([len(c.token_ids) for c in completions], np.float32))
    finish = distributed.allgather_host(
        np.array(
            [[c.finish_reason == "length", c.finish_reason == "abort"] for c in completions], bool
        ).reshape(-1, 2)
    )
    (total_tokens,) = distributed.sum_over_processes([tokens])
    return {
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/clip_frac": float(np.mean(finish[:, 0])),
        "response/abort_frac": float(np.mean(finish[:, 1])),
        "tokens/step": float(total_tokens),
    }


def reward_metrics(rewards: RewardOutput) -> dict[str, float]:
    """`rewards.metrics` over every process's responses: `pr1.rewards.combine.mean_metrics` of the
    gathered components, counts summed, judge/failure_rate from the summed failures and `judged`.
    One process: `rewards.metrics` as they are.
    """
    if not distributed.is_multiprocess():
        return dict(rewards.metrics)
    gathered = {
        name: distributed.allgather_host(rewards.components[name])
        for name in ("accuracy", "format", "repetition", "perception", "perception_used")
    }
    out = mean_metrics(gathered, distributed.allgather_host(rewards.totals))
    rest = sorted(k for k in rewards.metrics if k not in out and k != "judge/failure_rate")
    counts = [k for k in rest if k in COUNT_METRICS]
    summed = distributed.sum_over_processes([rewards.metrics[k] for k in counts] + [rewards.judged])
    out.update(zip(counts, summed[:-1]))
    out["judge/failure_rate"] = failure_rate(out.get("judge/failures", 0.0), summed[-1])
    # Anything else is taken as a per-response mean: weighted by each process's responses.
    others = [k for k in rest if k not in COUNT_METRICS]
    rows = float(len(rewards.totals))
    weighted = distributed.sum_over_processes([rewards.metrics[k] * rows for k in others] + [rows])
    out.update({k: v / max(weighted[-1], 1.0) for k, v in zip(others, weighted[:-1])})
    return out


def counter_metrics(stats: dict, prefix: str) -> dict[str, float]:
    """Numeric counters summed over processes, as <prefix>/<name>."""
    if not distributed.is_multiprocess():
        return {f"{prefix}/{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float))}
    every = distributed.allgather_object(
        {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}
    )
    keys = sorted({k for s in every for k in s})
    return {f"{prefix}/{k}": float(sum(s.get(k, 0.0) for s in every)) for k in keys}


def data_metrics(stats: dict) -> dict[str, float]:
    """The data iterator's counters (`PromptIterator.stats`), as data/<name>."""
    return counter_metrics(stats, "data")


def _plain(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return value if math.isfinite(value) else str(value)


class Progress:
    """One line per step on stderr: step/total, reward, tokens/s and ETA from the mean step time."""

    def __init__(self, total_steps: int, start_step: int):
        self.total = total_steps
        self.start_step = start_step
        self.start = time.perf_counter()
        self.enabled = jax.process_index() == 0

    def update(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        done = step - self.start_step
        per_step = (time.perf_counter() - self.start) / max(done, 1)
        eta = per_step * (self.total - step)
        width = 20
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        reward = metrics.get("rewards/total/mean", float("nan"))
        print(
            f"[{bar}] step {step}/{self.total}  reward {reward:.3f}  "
            f"acc {metrics.get('rewards/accuracy/mean', float('nan')):.3f}  "
            f"{metrics.get('perf/tokens_per_s', 0.0):.0f} tok/s  {per_step:.1f} s/step  ETA {_hms(eta)}",
            file=sys.stderr,
            flush=True,
        )


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
