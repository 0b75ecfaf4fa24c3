"""Where the time of a real training step goes: a few steps of configs/debug.py, phase by phase.

    python -m pr1.bench.step_breakdown [--steps 6] [--judge_latency 0.5] [--assets DIR] [--workdir DIR]

Runs `pr1.train.loop.train` on the debug config (tiny model, synthetic image task, embedded
rollout, offline lexical judge) for --steps steps with validation, sample logging and TensorBoard
off, then reads `<workdir>/metrics.jsonl` and prints each `time/<phase>` the loop records
(rollout, logprobs, judge_wait, update, sync, checkpoint, data; see pr1.plot PANELS["timing"])
averaged over the steps after the first, which pays for compilation, as seconds and as fractions
of `time/step`. "other" is what no phase timer covers (metrics, progress line, reward bookkeeping).

The summary number is the fraction of the step spent in device compute (rollout + logprobs +
update): 1 would mean no host-side overhead at all. With --judge_latency S the perception judge is
a loopback stub (`pr1.bench.judge.StubJudgeProcess`) answering every request after S seconds
instead of the offline lexical judge, and the reward stage's exposed time (time/judge_wait: what
the step still waits for rewards after its logprob pass) is reported per step against the step.
The debug config's embedded engine hands its batch to the reward stage at once; server engines
stream each response to it as it finishes (pr1.train.rollout_ahead). The checkpoint interval stays the debug
config's, so a short run saves only its last step. Without --assets / --workdir both go to
temporary directories that are deleted afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile

from absl import flags

from pr1 import cli
from pr1.bench import ratio as ratio_lib
from pr1.bench.judge import StubJudgeProcess
from pr1.train.metrics import METRICS_FILE

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEBUG_CONFIG = os.path.join(REPO, "configs", "debug.py")
COMPUTE_PHASES = ("time/rollout", "time/logprobs", "time/update")


def debug_config(assets: str, steps: int):
    """configs/debug.py's config with `steps` steps and nothing but training steps in them."""
    if not os.path.exists(DEBUG_CONFIG):
        raise FileNotFoundError(f"{DEBUG_CONFIG} not found: step_breakdown runs from a pr1 source checkout")
    spec = importlib.util.spec_from_file_location("pr1_debug_config", DEBUG_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(assets)
    c.train.steps = steps
    c.train.val_every = 0  # validation is not part of a training step
    c.train.log_samples_every = 0
    c.train.tensorboard = False
    return c


def phase_names(rows: list[dict]) -> list[str]:
    """The `time/*` phase keys present in `rows`, in pr1.plot's timing-panel order, then any others."""
    from pr1.plot import PANELS

    present = {k for r in rows for k in r if k.startswith("time/") and k != "time/step"}
    ordered = [k for k in PANELS["timing"][1] if k in present]
    return ordered + sorted(present - set(ordered))


def breakdown(rows: list[dict]) -> dict:
    """Mean seconds per phase over the steps after the first, their fractions of the mean step time.

    A phase missing from a step counts as 0 s there (the loop only records phases that ran).
    Returns steps (how many were averaged), step_s, phases {name: seconds}, fractions {name: share},
    other_s / other_fraction (step time no phase covers), compute_s and compute_fraction, and
    compute_stats: the per-step compute / step ratios (`pr1.bench.ratio.Ratio`: median, min, max),
    reward_exposed_stats: the per-step time/judge_wait / step ratios.
    """
    rows = sorted(rows, key=lambda r: r["step"])[1:]
    if not rows:
        raise ValueError(f"{METRICS_FILE} needs at least 2 steps: the first one is compilation")
    n = len(rows)
    step_s = sum(r["time/step"] for r in rows) / n
    phases = {k: sum(r.get(k, 0.0) for r in rows) / n for k in phase_names(rows)}
    compute_s = sum(phases.get(k, 0.0) for k in COMPUTE_PHASES)
    other_s = step_s - sum(phases.values())
    # Per step: device compute against the step it was part of, for a median and min-max.
    per_step = ratio_lib.from_pairs(
        [sum(r.get(k, 0.0) for k in COMPUTE_PHASES) for r in rows], [r["time/step"] for r in rows]
    )
    exposed = ratio_lib.from_pairs(
        [r.get("time/judge_wait", 0.0) for r in rows], [r["time/step"] for r in rows]
    )
    return dict(
        steps=n,
        step_s=step_s,
        phases=phases,
        fractions={k: v / step_s for k, v in phases.items()},
        other_s=other_s,
        other_fraction=other_s / step_s,
        compute_s=compute_s,
        compute_fraction=compute_s / step_s,
        compute_stats=per_step,
        reward_exposed_stats=exposed,
    )


def read_rows(workdir: str) -> list[dict]:
    path = os.path.join(workdir, METRICS_FILE)
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def measure(
    steps: int = 6, *, assets: str | None = None, workdir: str | None = None, judge_latency: float = 0.0
) -> dict:
    """Train `steps` debug-config steps and return `breakdown` of their metrics (plus `devices`,
    judge_latency). judge_latency > 0: the judge is a loopback stub answering after that long."""
    import contextlib

    import jax

    from pr1.train.loop import train

    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the first step compiles and is left out), got {steps}")
    made = []
    try:
        if assets is None:
            assets = tempfile.mkdtemp(prefix="pr1-bench-assets-")
            made.append(assets)
        if workdir is None:
            workdir = os.path.join(tempfile.mkdtemp(prefix="pr1-bench-breakdown-"), "run")
            made.append(os.path.dirname(workdir))
        config = debug_config(assets, steps)
        with StubJudgeProcess(judge_latency) if judge_latency > 0 else contextlib.nullcontext() as url:
            if url:
                config.rewards.judge.url = url
                config.rewards.judge.retries = 0
            train(config, workdir)
        r = breakdown(read_rows(workdir))
        r["devices"] = f"{jax.device_count()} {jax.devices()[0].platform}"
        r["judge_latency"] = judge_latency
        return r
    finally:
        for d in made:
            shutil.rmtree(d, ignore_errors=True)


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("steps", 6, "training steps (the first is left out of the mean)", flag_values=fv)
    flags.DEFINE_float(
        "judge_latency",
        0.0,
        "seconds per judge request of a loopback judge stub (0: the offline lexical judge)",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "assets", None, "debug assets dir (tiny checkpoint, parquet); default: temporary", flag_values=fv
    )
    flags.DEFINE_string(
        "workdir", None, "training workdir, kept afterwards; default: temporary", flag_values=fv
    )


def run(argv=None) -> dict:
    """Parses the CLI flags in `argv` and returns `measure`'s numbers."""
    args = cli.parse("pr1.bench.step_breakdown", argv, define_flags, doc=__doc__)
    if args.workdir and os.path.exists(os.path.join(args.workdir, METRICS_FILE)):
        # train() would resume there and measure nothing new.
        raise FileExistsError(
            f"--workdir {args.workdir} already holds a run ({METRICS_FILE}); give a fresh one"
        )
    return measure(args.steps, assets=args.assets, workdir=args.workdir, judge_latency=args.judge_latency)


def main(argv=None) -> int:
    r = run(argv)
    print(
        f"debug config, mean of steps 2..{r['steps'] + 1} on {r['devices']} device(s): "
        f"{r['step_s']:.3f} s/step"
    )
    for name, seconds in r["phases"].items():
        print(f"  {name:18s} {seconds:8.3f} s  {r['fractions'][name]:6.1%}")
    print(f"  {'other':18s} {r['other_s']:8.3f} s  {r['other_fraction']:6.1%}")
    print(
        f"device compute (rollout + logprobs + update): {r['compute_fraction']:.1%} of the step; per step "
        f"{r['compute_stats']}"
    )
    judge = (
        f"judge stub at {r['judge_latency'] * 1000:.0f} ms" if r["judge_latency"] else "offline lexical judge"
    )
    print(
        f"reward stage exposed (time/judge_wait, {judge}): per step {r['reward_exposed_stats']} of the step"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
