"""Curves of a run as PNGs: python -m pr1.plot --workdir DIR [--out DIR/plots]

Reads `DIR/metrics.jsonl` and draws, one PNG each: the reward components (`rewards.png`), response
lengths and truncation (`lengths.png`), policy statistics (entropy, approx KL, clip fractions:
`policy.png`), the per-step time breakdown (`timing.png`) and validation if present (`val.png`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

PANELS = {
    "rewards": ("reward", ["rewards/total/mean", "rewards/accuracy/mean", "rewards/format/mean",
                           "rewards/perception/mean", "rewards/repetition/mean"]),
    "lengths": ("tokens / fraction", ["response/length_mean", "response/length_max", "response/clip_frac"]),
    "policy": ("value", ["learner/entropy", "learner/approx_kl", "learner/pg_clipfrac", "learner/pg_clipfrac_dual",
                         "learner/grad_norm", "learner/kl"]),
    "timing": ("seconds", ["time/step", "time/rollout", "time/logprobs", "time/judge_wait", "time/update",
                           "time/sync", "time/checkpoint", "time/validation"]),
    "val": ("value", ["val/accuracy", "val/format", "val/perception"]),
}


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is this a pr1 workdir?")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"pr1.plot: skipping unreadable line {i} of {path}", file=sys.stderr)
    return rows


def plot(workdir: str, out: str | None = None) -> list[str]:
    """Writes the PNGs; returns their paths (panels with no data are skipped)."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt

    rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    out = out or os.path.join(workdir, "plots")
    os.makedirs(out, exist_ok=True)
    written = []
    for name, (ylabel, keys) in PANELS.items():
        series = {}
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                series[key] = points
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for key, points in series.items():
            steps, values = zip(*points)
            ax.plot(steps, values, label=key, marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name} — {os.path.basename(os.path.abspath(workdir))}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = os.path.join(out, f"{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pr1.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default=None, help="output dir (default: WORKDIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot(args.workdir, args.out)
    except FileNotFoundError as e:
        print(f"pr1.plot: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
