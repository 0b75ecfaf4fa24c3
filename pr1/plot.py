"""Curves of a run as PNGs: python -m pr1.plot --workdir DIR [--out DIR/plots]
Evaluations side by side:  python -m pr1.plot --eval OUT_A --eval OUT_B ... --out DIR
Runs side by side:         python -m pr1.plot --compare RUN_A --compare RUN_B ... [--labels A,B] --out DIR

Reads `DIR/metrics.jsonl` and draws, one PNG each: the reward components (`rewards.png`), response
lengths and truncation (`lengths.png`), policy statistics (entropy, approx KL, clip fractions:
`policy.png`), the per-step time breakdown (`timing.png`) and validation if present (`val.png`).
With --eval it reads the `summary.json` of each `pr1.eval` output dir and draws one bar per run for
each benchmark (`eval.png`), labelled with the model each run evaluated. With --compare it draws the
accuracy, perception and total reward and the validation accuracy of several runs on shared axes
(`compare.png`); a run given as `DIR1,DIR2,...` (one config on several seeds) is drawn as the mean
over its runs with a band from their minimum to their maximum.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from pr1 import cli

PANELS = {
    "rewards": (
        "reward",
        [
            "rewards/total/mean",
            "rewards/accuracy/mean",
            "rewards/format/mean",
            "rewards/perception/mean",
            "rewards/repetition/mean",
        ],
    ),
    "lengths": ("tokens / fraction", ["response/length_mean", "response/length_max", "response/clip_frac"]),
    "policy": (
        "value",
        [
            "learner/entropy",
            "learner/approx_kl",
            "learner/pg_clipfrac",
            "learner/pg_clipfrac_dual",
            "learner/grad_norm",
            "learner/kl",
        ],
    ),
    "timing": (
        "seconds",
        [
            "time/step",
            "time/rollout",
            "time/logprobs",
            "time/judge_wait",
            "time/update",
            "time/sync",
            "time/checkpoint",
            "time/validation",
        ],
    ),
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


COMPARE_PANELS = (
    ("rewards/accuracy/mean", "accuracy reward (sampled)"),
    ("rewards/perception/mean", "perception reward (sampled)"),
    ("rewards/total/mean", "total reward (sampled)"),
    ("val/accuracy", "validation accuracy (greedy)"),
)


def _series(rows: list[dict], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if isinstance(r.get(key), (int, float))}


def _smooth(values, window: int):
    """Trailing mean over `window` points (per-step rewards of a small batch are noisy)."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_compare(
    groups: list[str],
    out: str,
    labels: list[str] | None = None,
    smooth: int = 5,
    reference: dict[str, tuple[float, str]] | None = None,
) -> list[str]:
    """compare.png: one panel per COMPARE_PANELS key, one curve per group; returns [its path].

    A group is a run dir or comma-separated run dirs (drawn as their mean, with a min-max band).
    Sampled rewards are drawn smoothed (trailing mean over `smooth` steps); validation points as is.
    reference: metric key -> (value, label), drawn as a dashed horizontal line (e.g. chance level).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if labels is not None and len(labels) != len(groups):
        raise ValueError(f"{len(labels)} labels for {len(groups)} runs")
    runs = []
    for i, group in enumerate(groups):
        dirs = [d for d in group.split(",") if d]
        if not dirs:
            raise ValueError(f"empty run list {group!r}")
        metrics = [read_metrics(os.path.join(d, "metrics.jsonl")) for d in dirs]
        name = labels[i] if labels else os.path.basename(os.path.normpath(dirs[0]))
        if len(dirs) > 1 and not labels:
            name += f" (mean of {len(dirs)})"
        runs.append((name, metrics))

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (key, title) in zip(axes.flat, COMPARE_PANELS):
        for k, (name, metrics) in enumerate(runs):
            per_run = [_series(rows, key) for rows in metrics]
            # Steps every run of the group has (a shorter run cuts the curve, it does not bend it).
            steps = sorted(set.intersection(*(set(s) for s in per_run)))
            if not steps:
                continue
            table = [[s[t] for s in per_run] for t in steps]
            mean = [sum(v) / len(v) for v in table]
            is_val = key.startswith("val/")
            color = f"C{k}"
            y = mean if is_val else _smooth(mean, smooth)
            ax.plot(steps, y, color=color, label=name, marker="o" if is_val else None, markersize=4)
            if len(per_run) > 1:
                lo, hi = [min(v) for v in table], [max(v) for v in table]
                if not is_val:
                    lo, hi = _smooth(lo, smooth), _smooth(hi, smooth)
                ax.fill_between(steps, lo, hi, color=color, alpha=0.15, linewidth=0)
        if reference and key in reference:
            value, text = reference[key]
            ax.axhline(value, color="gray", linestyle="--", linewidth=1, label=text)
        ax.set_title(title if key.startswith("val/") else f"{title}, {smooth}-step mean", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {key} in these runs", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "compare.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


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
        runs.append(
            (
                model if isinstance(model, str) else os.path.basename(os.path.normpath(d)),
                summary["benchmarks"],
            )
        )
    benchmarks = list(dict.fromkeys(name for _, b in runs for name in b))
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(benchmarks) * max(1, len(runs) / 2)), 4.5))
    for i, (label, b) in enumerate(runs):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(benchmarks))]
        ys = [(b.get(name) or {}).get("accuracy") for name in benchmarks]
        bars = ax.bar(xs, [y or 0 for y in ys], width, label=label)
        for bar, y in zip(bars, ys):
            ax.annotate(
                "n/a" if y is None else f"{y:.1f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
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


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "a training run: its curves", flag_values=fv)
    flags.DEFINE_multi_string(
        "eval", None, "a pr1.eval --out dir (repeat): accuracy per benchmark", flag_values=fv
    )
    flags.DEFINE_multi_string(
        "compare",
        None,
        "a training run (repeat; a run: DIR or DIR1,DIR2,... for several seeds): their curves on shared axes",
        flag_values=fv,
    )
    flags.DEFINE_list(
        "labels", None, "with --compare: one legend label per run, comma-separated", flag_values=fv
    )
    flags.DEFINE_string(
        "out", None, "output dir (default: WORKDIR/plots; required with --eval/--compare)", flag_values=fv
    )


def main(argv=None) -> int:
    args = cli.parse("pr1.plot", argv, define_flags, doc=__doc__)
    chosen = [a for a in (args.workdir, args.eval, args.compare) if a is not None]
    if len(chosen) != 1 or ((args.eval or args.compare) and not args.out):
        cli.usage_error(
            "pr1.plot",
            "give --workdir DIR, or --eval OUT [--eval OUT ...] / --compare RUN [--compare RUN ...] "
            "with --out DIR",
        )
    if args.labels and not args.compare:
        cli.usage_error("pr1.plot", "--labels goes with --compare")
    try:
        if args.workdir:
            paths = plot(args.workdir, args.out)
        elif args.eval:
            paths = plot_eval(args.eval, args.out)
        else:
            paths = plot_compare(args.compare, args.out, labels=args.labels)
    except (OSError, ValueError) as e:
        return cli.fail("pr1.plot", e)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
