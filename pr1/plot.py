"""Curves of a run as PNGs: python -m pr1.plot --workdir DIR [--out DIR/plots]
Evaluations side by side:  python -m pr1.plot --eval OUT_A OUT_B ... --out DIR

Reads `DIR/metrics.jsonl` and draws, one PNG each: the reward components (`rewards.png`), response
lengths and truncation (`lengths.png`), policy statistics (entropy, approx KL, clip fractions:
`policy.png`), the per-step time breakdown (`timing.png`) and validation if present (`val.png`).
With --eval it reads the `summary.json` of each `pr1.eval` output dir and draws one bar per run for
each benchmark (`eval.png`), labelled with the model each run evaluated.
"""

from __future__ import annotations

import json
import os
import sys

from pr1 import cli

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


def read_eval_summary(out_dir: str) -> dict:
    path = os.path.join(out_dir, "summary.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {out_dir} a pr1.eval --out dir?")
    with open(path) as f:
        return json.load(f)


def plot_eval(out_dirs: list[str], out: str) -> list[str]:
    """eval.png: accuracy per benchmark, one bar per evaluation run; returns [its path]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for d in out_dirs:
        summary = read_eval_summary(d)
        model = summary.get("model")
        runs.append((model if isinstance(model, str) else os.path.basename(os.path.normpath(d)), summary["benchmarks"]))
    benchmarks = list(dict.fromkeys(name for _, b in runs for name in b))
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(benchmarks) * max(1, len(runs) / 2)), 4.5))
    for i, (label, b) in enumerate(runs):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(benchmarks))]
        ys = [(b.get(name) or {}).get("accuracy") for name in benchmarks]
        bars = ax.bar(xs, [y or 0 for y in ys], width, label=label)
        for bar, y in zip(bars, ys):
            ax.annotate("n/a" if y is None else f"{y:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(benchmarks)), benchmarks)
    ax.set_ylabel("accuracy %")
    ax.set_title("evaluation")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "eval.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m pr1.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="a training run: its curves")
    parser.add_argument("--eval", nargs="+", metavar="OUT", help="pr1.eval --out dirs: accuracy per benchmark")
    parser.add_argument("--out", default=None, help="output dir (default: WORKDIR/plots; required with --eval)")
    args = parser.parse_args(argv)
    if (args.workdir is None) == (args.eval is None) or (args.eval and not args.out):
        parser.error("give --workdir DIR, or --eval OUT [OUT ...] with --out DIR")
    try:
        paths = plot(args.workdir, args.out) if args.workdir else plot_eval(args.eval, args.out)
    except (OSError, ValueError) as e:
        return cli.fail("pr1.plot", e)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
