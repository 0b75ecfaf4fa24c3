"""Where a run reports itself: metrics.jsonl, TensorBoard, optional W&B, a progress line, step timers.

Only process 0 writes. `metrics.jsonl` holds one JSON object per step (`step` plus flat
"group/name" keys) and is appended across restarts, so a resumed run continues the same file; rows
of steps after the checkpoint a run resumed from are dropped first (they were redone).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

import jax

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

    def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True, wandb_project: str = "",
                 run_name: str = "", config_dict: dict | None = None):
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
                raise ValueError("train.wandb_project is set but wandb is not installed (pip install wandb)") from None
            self._wandb = wandb.init(project=wandb_project, name=run_name or None, config=config_dict, resume="allow")

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
            text = "\n\n".join(f"**reward {s.get('reward', 0):.3f}**\n\n```\n{s.get('response', '')}\n```" for s in samples)
            self._tb.add_text("samples", text, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


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
        print(f"[{bar}] step {step}/{self.total}  reward {metrics.get('rewards/total/mean', float('nan')):.3f}  "
              f"acc {metrics.get('rewards/accuracy/mean', float('nan')):.3f}  "
              f"{metrics.get('perf/tokens_per_s', 0.0):.0f} tok/s  {per_step:.1f} s/step  ETA {_hms(eta)}",
              file=sys.stderr, flush=True)


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
