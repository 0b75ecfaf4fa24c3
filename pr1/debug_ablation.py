"""The paper's ablation in miniature.

    python -m pr1.debug_ablation [--seeds 0,1,2] [--root DIR] [--config.k=v ...]

For each seed S it trains configs/debug.py (perception weight gamma = 0.7) and then
configs/debug.py:baseline (gamma = 0, accuracy only) as two `python -m pr1.train` processes with
train.seed = data.seed = S, from the same tiny random-init model (written once per seed, under
ROOT/assets-seedS, with its weights seeded by S) and the same synthetic data. Then it prints, per run
and as mean ± standard deviation over the seeds, the accuracy reward of the first and of the last
quarter of the steps, the perception and total rewards of the last quarter, the last greedy
validation accuracy and the wall time, writes them to ROOT/summary.json, and draws both configs'
curves (mean over seeds, min-max band) to ROOT/compare.png (`pr1.plot.plot_compare`).

Runs: ROOT/seedS/perception and ROOT/seedS/baseline (metrics.jsonl, train.log). A run that already
finished is not trained again (its recorded wall time is reused); delete ROOT for a fresh start.
Extra `--config.key=value` arguments go to every run (e.g. --config.train.steps=30).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import flags

from pr1 import cli
from pr1 import plot as plot_lib

CONFIGS = (("perception", ""), ("baseline", ",baseline"))
RUN_RECORD = "ablation_run.json"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG_CONFIG = os.path.join(REPO, "configs", "debug.py")
# Printed and saved per run, in this order.
COLUMNS = (
    "acc_first_quarter",
    "acc_last_quarter",
    "perception_last_quarter",
    "total_last_quarter",
    "val_accuracy_last",
    "wall_s",
)


def summarize(rows: list[dict]) -> dict:
    """The numbers of one run from its metrics.jsonl rows (quarters of the steps it logged)."""
    rows = sorted((r for r in rows if "rewards/accuracy/mean" in r), key=lambda r: r["step"])
    if not rows:
        raise ValueError("no training steps in the metrics")
    q = max(1, len(rows) // 4)

    def mean(key, part):
        return statistics.fmean(float(r[key]) for r in part)

    first, last = rows[:q], rows[-q:]
    val = [r["val/accuracy"] for r in rows if "val/accuracy" in r]
    return {
        "steps": rows[-1]["step"],
        "quarter_steps": q,
        "acc_first_quarter": mean("rewards/accuracy/mean", first),
        "acc_last_quarter": mean("rewards/accuracy/mean", last),
        "perception_first_quarter": mean("rewards/perception/mean", first),
        "perception_last_quarter": mean("rewards/perception/mean", last),
        "total_first_quarter": mean("rewards/total/mean", first),
        "total_last_quarter": mean("rewards/total/mean", last),
        "val_accuracy_last": float(val[-1]) if val else float("nan"),
    }


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _read_rows(workdir: str) -> list[dict]:
    return plot_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))


def run_one(root: str, seed: int, name: str, flag: str, overrides: list[str]) -> dict:
    """Trains one (seed, config) run unless it already finished; returns its summary with wall_s."""
    workdir = os.path.join(root, f"seed{seed}", name)
    record = os.path.join(workdir, RUN_RECORD)
    if os.path.exists(record):
        with open(record) as f:
            done = json.load(f)
        print(f"seed {seed} {name}: finished before ({workdir}), not retrained", flush=True)
        return {**summarize(_read_rows(workdir)), "wall_s": done["wall_s"], "workdir": workdir}
    os.makedirs(workdir, exist_ok=True)
    assets = os.path.join(root, f"assets-seed{seed}")
    cmd = [
        sys.executable,
        "-m",
        "pr1.train",
        "--config",
        f"{DEBUG_CONFIG}:{assets}{flag}",
        "--workdir",
        workdir,
        f"--config.train.seed={seed}",
        f"--config.data.seed={seed}",
        *overrides,
    ]
    log_path = os.path.join(workdir, "train.log")
    print(f"seed {seed} {name}: training (log: {log_path})", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"seed {seed} {name}: `{' '.join(cmd)}` exited with {rc}; see {log_path}")
    with open(record, "w") as f:
        json.dump({"wall_s": wall, "command": cmd}, f, indent=2)
    return {**summarize(_read_rows(workdir)), "wall_s": wall, "workdir": workdir}


def report(results: dict[str, dict[int, dict]]) -> str:
    """The table: one row per run, then mean ± std per config, then the per-seed differences."""
    head = f"{'config':<11} {'seed':>4}  " + "  ".join(f"{c:>24}" for c in COLUMNS)
    lines = [head]
    for name, by_seed in results.items():
        for seed, r in sorted(by_seed.items()):
            lines.append(f"{name:<11} {seed:>4}  " + "  ".join(f"{r[c]:>24.3f}" for c in COLUMNS))
    for name, by_seed in results.items():
        cells = []
        for c in COLUMNS:
            m, s = _spread([r[c] for r in by_seed.values()])
            cells.append(f"{m:>15.3f} ± {s:<6.3f}")
        lines.append(f"{name:<11} {'mean':>4}  " + "  ".join(cells))
    if len(results) == 2:
        (a, ra), (b, rb) = results.items()
        seeds = sorted(set(ra) & set(rb))
        for c in ("acc_last_quarter", "val_accuracy_last"):
            diffs = [ra[s][c] - rb[s][c] for s in seeds]
            m, s = _spread(diffs)
            lines.append(
                f"{a} - {b}, {c}: "
                + ", ".join(f"seed {k}: {d:+.3f}" for k, d in zip(seeds, diffs))
                + f"; mean {m:+.3f} ± {s:.3f}"
            )
    return "\n".join(lines)


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("seeds", "0,1,2", "comma-separated seeds", flag_values=fv)
    flags.DEFINE_string(
        "root", "/tmp/pr1-debug/ablation", "where runs, summary.json, compare.png go", flag_values=fv
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # --config.key=value overrides go to every run's pr1.train as they are.
    overrides = [a for a in argv if a.startswith("--config.")]
    args = cli.parse(
        "pr1.debug_ablation", [a for a in argv if not a.startswith("--config.")], define_flags, doc=__doc__
    )
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        cli.usage_error("pr1.debug_ablation", f"--seeds must be comma-separated integers, got {args.seeds!r}")
    root = os.path.abspath(args.root)
    results: dict[str, dict[int, dict]] = {name: {} for name, _ in CONFIGS}
    try:
        for seed in seeds:
            for name, flag in CONFIGS:
                results[name][seed] = run_one(root, seed, name, flag, overrides)
    except RuntimeError as e:
        print(f"pr1.debug_ablation: {e}", file=sys.stderr)
        return 1
    table = report(results)
    print(table)
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump({"seeds": seeds, "overrides": overrides, "runs": results}, f, indent=2)
    groups = [",".join(results[name][s]["workdir"] for s in seeds) for name, _ in CONFIGS]
    labels = [
        f"{name} (gamma {'0.7' if name == 'perception' else '0'}, {len(seeds)} seeds)" for name, _ in CONFIGS
    ]
    # The debug task's answers are 1, 2 or 3 in equal shares: a third is what not looking earns.
    chance = (1 / 3, "chance: a digit 1-3 without looking")
    (png,) = plot_lib.plot_compare(
        groups, root, labels=labels, reference={"rewards/accuracy/mean": chance, "val/accuracy": chance}
    )
    print(f"wrote {os.path.join(root, 'summary.json')} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
