"""Ratios that survive a noisy machine: warm-up, then interleaved repeats, median and min-max.

Where it sits: every pr1 benchmark (`pr1.bench.train_step`, `sampler`, `judge`, `export`,
`step_breakdown`, `trl_grpo`) compares ours with a peer or a bound through `interleaved`, and
`pr1.bench.all --json` records the result with `machine()`.

Why interleave: on a shared machine the load changes over seconds to minutes, and a benchmark that
measures all of A and then all of B measures the load as much as A and B (the suite moved by 2x
between runs). Alternating A B A B ... puts both sides of each pair under nearly the same load; the
ratio of each pair is the number, and the median over pairs with its min and max says how far it
can be trusted.

A side is a callable returning one measurement: a float, or a dict {measure: float} when one run
yields several (prefill and decode). Measurements are rates (bigger is better: tokens/s, MB/s,
FLOP/s); the ratio of a pair is ours / peer. A peer that is a fixed bound (a judge client's ideal
c / latency) is a callable returning the constant.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from typing import Callable, Mapping

Measure = Callable[[], "float | Mapping[str, float]"]
MIN_REPEATS = 5


@dataclasses.dataclass
class Ratio:
    """Per-pair measurements of one measure and their ratios (ours / peer), in run order."""

    ours: list[float]
    peer: list[float]

    @property
    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.ours, self.peer)]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def lo(self) -> float:
        return min(self.ratios)

    @property
    def hi(self) -> float:
        return max(self.ratios)

    @property
    def ours_median(self) -> float:
        return statistics.median(self.ours)

    @property
    def peer_median(self) -> float:
        return statistics.median(self.peer)

    @property
    def repeats(self) -> int:
        return len(self.ours)

    def summary(self) -> dict:
        return dict(
            ratio=self.median,
            ratio_min=self.lo,
            ratio_max=self.hi,
            ours=self.ours_median,
            peer=self.peer_median,
            repeats=self.repeats,
            ratios=self.ratios,
            ours_all=list(self.ours),
            peer_all=list(self.peer),
        )

    def __str__(self) -> str:
        return f"{self.median:.3g} (min {self.lo:.3g}, max {self.hi:.3g}, {self.repeats} pairs)"


def _as_dict(value) -> dict[str, float]:
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items()}
    return {"": float(value)}


def interleaved(
    ours: Measure,
    peer: Measure,
    *,
    repeats: int = MIN_REPEATS,
    warmup: int = 1,
    label: str = "",
    log: Callable[[str], None] | None = print,
) -> dict[str, Ratio]:
    """Runs `warmup` unrecorded rounds of ours then peer, then `repeats` recorded pairs; the order
    within a pair alternates (A B, B A, A B, ...) so neither side always runs on the other's heels.

    Returns {measure: Ratio} (measure "" for sides returning a float). Both sides must return the
    same measures. `log` gets one line per pair.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        ours()
        peer()
    out: dict[str, Ratio] = {}
    for i in range(repeats):
        if i % 2 == 0:
            a = _as_dict(ours())
            b = _as_dict(peer())
        else:
            b = _as_dict(peer())
            a = _as_dict(ours())
        if set(a) != set(b):
            raise ValueError(f"{label or 'interleaved'}: ours measured {sorted(a)} but the peer {sorted(b)}")
        for k in a:
            r = out.setdefault(k, Ratio([], []))
            r.ours.append(a[k])
            r.peer.append(b[k])
        if log is not None:
            pairs = ", ".join(f"{k or 'ratio'} {a[k] / b[k]:.3g} ({a[k]:.4g} / {b[k]:.4g})" for k in a)
            log(f"{label + ' ' if label else ''}pair {i + 1}/{repeats}: {pairs}")
    return out


def from_pairs(ours: list[float], peer: list[float]) -> Ratio:
    """A Ratio from pairs measured elsewhere (e.g. per training step), in order."""
    if len(ours) != len(peer) or not ours:
        raise ValueError(
            f"need equally many (>= 1) measurements of both sides, got {len(ours)} and {len(peer)}"
        )
    return Ratio([float(x) for x in ours], [float(x) for x in peer])


def rate(work: float, fn: Callable[[], object]) -> float:
    """`work` units divided by the wall-clock seconds of one call of `fn`."""
    start = time.perf_counter()
    fn()
    return work / max(time.perf_counter() - start, 1e-12)


def machine() -> dict:
    """What a ratio was measured on: cores, load, thread settings of JAX/XLA and torch, versions."""
    info: dict = {"cpu_count": os.cpu_count()}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        info["loadavg_1_5_15"] = list(os.getloadavg())
    except OSError:
        pass
    for var in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    info["python"] = sys.version.split()[0]
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        info["jax"] = jax.__version__
        try:
            devices = jax.devices()
            info["jax_devices"] = f"{len(devices)} {devices[0].platform}"
        except RuntimeError:
            pass
    if "torch" in sys.modules and sys.modules["torch"] is not None:
        torch = sys.modules["torch"]
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    return info


def load_now() -> str:
    """The 1-minute load average over usable cores, for progress lines."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        return f"load {os.getloadavg()[0]:.1f} on {cores} cores"
    except OSError:
        return f"{cores} cores"
