"""The benchmark suite: every pr1 benchmark in one process, one table of ratios against a peer or bound.

    python -m pr1.bench.all [--quick] [--only train_step,judge] [--json rows.json] [--trl_site DIR]

Each benchmark is compared with something measured in the same run, so a ratio stays meaningful
on a busy or unfamiliar machine:

  train_step      update-step FLOP/s vs the measured matmul peak (MFU)        pr1.bench.train_step
  sampler         embedded sampler vs transformers `generate`, prefill/decode  pr1.bench.sampler
  judge           judge-client requests/s vs ideal concurrency / latency       pr1.bench.judge
  export          hf.save (and hf.load) MB/s vs raw file write (and read)      pr1.bench.export
  step_breakdown  device compute (rollout+logprobs+update) vs the debug step   pr1.bench.step_breakdown
  trl_grpo        pr1 GRPO steps/s vs TRL GRPOTrainer's, same tiny model       pr1.bench.trl_grpo

Every ratio is ours / peer: the median over >= 5 interleaved pairs after a warm-up (3 with
--quick), printed with its min-max (`pr1.bench.ratio`); --json writes the rows with the machine
they ran on (cores, load before and after, JAX / torch versions and thread settings). Sizes are
small enough for a few minutes on a 2-core CPU (--quick: smaller still); run a benchmark's own
module for its full options. A benchmark that cannot run (torch or TRL missing, an error) gets a
"skipped: <reason>" row and the suite goes on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from typing import Callable

from absl import flags

from pr1 import cli


@dataclasses.dataclass
class Row:
    """One line of the table: `ours` against `peer` (both in their units), ratio = ours / peer."""

    benchmark: str
    measure: str
    ours: float | None = None
    ours_unit: str = ""
    peer: float | None = None
    peer_unit: str = ""
    ratio: float | None = None
    meaning: str = ""
    skipped: str | None = None
    ratio_min: float | None = None
    ratio_max: float | None = None
    repeats: int | None = None
    load: str = ""  # the 1-minute load when the row was finished


def _row(benchmark, measure, ours, ours_unit, peer, peer_unit, meaning, stats=None) -> Row:
    """`stats`: the interleaved pairs (`pr1.bench.ratio.Ratio`); ratio is their median and ours /
    peer the medians of each side. Without it, one measurement: ratio = ours / peer."""
    from pr1.bench.ratio import load_now

    if stats is None:
        r = float(ours) / float(peer)
        return Row(
            benchmark,
            measure,
            float(ours),
            ours_unit,
            float(peer),
            peer_unit,
            r,
            meaning,
            None,
            r,
            r,
            1,
            load_now(),
        )
    return Row(
        benchmark,
        measure,
        float(ours),
        ours_unit,
        float(peer),
        peer_unit,
        stats.median,
        meaning,
        None,
        stats.lo,
        stats.hi,
        stats.repeats,
        load_now(),
    )


# -- one function per benchmark: (quick, options) -> rows; each imports its module lazily so a
# missing dependency only skips that benchmark.


def train_step_rows(quick: bool, opts) -> list[Row]:
    from pr1.bench import train_step

    batch, seq, steps = (1, 128, 3) if quick else (2, 256, 5)
    argv = ["--batch", str(batch), "--seq", str(seq), "--steps", str(steps)]
    r = train_step.run(argv)
    return [
        _row(
            "train_step",
            f"MFU, {r['params'] / 1e6:.0f}M model, {r['tokens']} tokens/step",
            r["achieved_flops"] / 1e9,
            "GFLOP/s",
            r["peak_flops"] / 1e9,
            "GFLOP/s peak",
            f"share of the matmul peak measured now ({r['devices']} {r['platform']} {r['dtype']})",
            r["mfu_ratio"],
        )
    ]


def sampler_rows(quick: bool, opts) -> list[Row]:
    from pr1.bench import sampler

    # decode = extra tokens / (t(new) - t(1)): too few new tokens and that difference drowns in noise.
    argv = (
        ["--model", "tiny", "--batch", "4", "--prompt", "32", "--new", "32", "--repeats", "3"]
        if quick
        else [
            "--model",
            "small",
            "--batch",
            "4",
            "--prompt",
            "64",
            "--new",
            "32",
            "--image",
            "--repeats",
            "5",
        ]
    )
    r = sampler.run(argv)
    ours, ref = r["pr1"], r["transformers"]
    meaning = ">1: pr1 faster than transformers generate (CPU), same model and batch"
    return [
        _row("sampler", k, ours[k], "tok/s", ref[k], "tok/s", meaning, r["ratios"][k])
        for k in ("prefill", "decode")
    ]


def judge_rows(quick: bool, opts) -> list[Row]:
    from pr1.bench import judge

    latency = 0.05
    concurrencies, min_requests, repeats = ([16], 64, 3) if quick else ([64, 512], 256, 5)
    rows = judge.run_bench(
        latency, concurrencies, requests_per_slot=4, min_requests=min_requests, repeats=repeats, warmup=1
    )
    return [
        _row(
            "judge",
            f"{r['requests']} requests, concurrency {r['concurrency']}, {latency * 1000:.0f} ms stub",
            r["achieved"],
            "req/s",
            r["ideal"],
            "req/s ideal",
            f"1: every client slot kept busy; <1: client/host overhead ({r['failed']} failed)",
            r["ratio_stats"],
        )
        for r in rows
    ]


def export_rows(quick: bool, opts) -> list[Row]:
    from pr1.bench import export

    argv = [
        "--model",
        "tiny" if quick else "small",
        "--dir",
        opts.export_dir,
        "--repeats",
        "3" if quick else "5",
    ]
    r = export.run(argv)
    where = f"{r['model']} model, {r['bytes'] / 1e6:.0f} MB fp32"
    rows = [
        _row(
            "export",
            f"hf.save + fsync, {where}",
            r["export_MBps"],
            "MB/s",
            r["raw_MBps"],
            "MB/s raw write",
            "1: export at raw disk-write speed (both fsynced, same filesystem)",
            r["write_ratio"],
        )
    ]
    if "load_MBps" in r:
        rows.append(
            _row(
                "export",
                f"hf.load, {where}",
                r["load_MBps"],
                "MB/s",
                r["raw_read_MBps"],
                "MB/s raw read",
                "1: load at raw read speed (both from the page cache)",
                r["read_stats"],
            )
        )
    return rows


def step_breakdown_rows(quick: bool, opts) -> list[Row]:
    from pr1.bench import step_breakdown

    latency = 0.5
    r = step_breakdown.run(["--steps", "3" if quick else "6", "--judge_latency", str(latency)])
    shares = ", ".join(
        f"{k.removeprefix('time/')} {v:.0%}"
        for k, v in sorted(r["fractions"].items(), key=lambda kv: -kv[1])
        if v >= 0.005
    )
    where = f"configs/debug.py, judge stub {latency * 1000:.0f} ms, {r['steps']} steps after the first"
    exposed = r["reward_exposed_stats"]
    return [
        _row(
            "step_breakdown",
            where,
            r["compute_stats"].ours_median,
            "s compute",
            r["compute_stats"].peer_median,
            "s/step",
            f"share of the step in device compute (per step); mean shares: {shares}, "
            f"other {r['other_fraction']:.0%}",
            r["compute_stats"],
        ),
        _row(
            "step_breakdown",
            f"reward stage exposed, {where}",
            exposed.ours_median,
            "s judge_wait",
            exposed.peer_median,
            "s/step",
            "share of the step waiting for rewards after the logprob pass "
            "(goal <= 0.05; embedded engine: batch handed over at once)",
            exposed,
        ),
    ]


def trl_grpo_rows(quick: bool, opts) -> list[Row]:
    from pr1.bench import trl_grpo

    argv = ["--steps", "3", "--new", "8"] if quick else ["--steps", "5", "--new", "16"]
    if opts.trl_site:
        argv += ["--trl_site", opts.trl_site]
    r = trl_grpo.run(argv)
    return [
        _row(
            "trl_grpo",
            f"GRPO step, {r['prompts']} prompts x {r['group']}, <= {r['max_new_tokens']} tokens",
            1 / r["pr1_step_s"],
            "steps/s",
            1 / r["trl_step_s"],
            "steps/s TRL",
            ">1: pr1 faster than TRL GRPOTrainer (CPU), same tiny model and batch",
            r["ratio_stats"],
        )
    ]


BENCHMARKS: dict[str, Callable] = {
    "train_step": train_step_rows,
    "sampler": sampler_rows,
    "judge": judge_rows,
    "export": export_rows,
    "step_breakdown": step_breakdown_rows,
    "trl_grpo": trl_grpo_rows,
}


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, ImportError) else f"{type(e).__name__}: {text}"


def run_suite(names, quick: bool, opts) -> list[Row]:
    rows = []
    for i, name in enumerate(names, 1):
        print(f"== [{i}/{len(names)}] {name}", flush=True)
        start = time.perf_counter()
        try:
            rows += BENCHMARKS[name](quick, opts)
        except Exception as e:  # one broken benchmark must not cost the others' numbers
            if not isinstance(e, ImportError):
                traceback.print_exc()
            rows.append(Row(name, "", skipped=_reason(e)))
        print(f"== {name} done in {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def _num(value: float | None, unit: str) -> str:
    return "" if value is None else f"{value:.4g} {unit}".strip()


def format_table(rows: list[Row]) -> str:
    header = (
        "benchmark",
        "measure",
        "ours",
        "peer / bound",
        "ratio",
        "min-max (pairs)",
        "what the ratio means",
    )
    lines = []
    for r in rows:
        if r.skipped is not None:
            lines.append((r.benchmark, r.measure, "", "", "", "", f"skipped: {r.skipped}"))
        else:
            lines.append(
                (
                    r.benchmark,
                    r.measure,
                    _num(r.ours, r.ours_unit),
                    _num(r.peer, r.peer_unit),
                    f"{r.ratio:.3g}",
                    f"{r.ratio_min:.3g}-{r.ratio_max:.3g} ({r.repeats})",
                    r.meaning,
                )
            )
    widths = [max(len(str(x[i])) for x in [header] + lines) for i in range(len(header) - 1)]

    def fmt(cells):
        return " | ".join([str(c).ljust(w) for c, w in zip(cells, widths)] + [str(cells[-1])])

    return "\n".join(
        [fmt(header), "-+-".join("-" * w for w in widths) + "-+-" + "-" * 20] + [fmt(x) for x in lines]
    )


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_bool("quick", False, "smaller sizes (tiny models, fewer steps)", flag_values=fv)
    flags.DEFINE_string("only", "", f"comma-separated subset of {','.join(BENCHMARKS)}", flag_values=fv)
    flags.DEFINE_string("json", "", "also write the rows to this JSON file", flag_values=fv)
    flags.DEFINE_string(
        "trl_site",
        os.environ.get("PR1_TRL_SITE"),
        "site-packages dir holding trl for trl_grpo (default: $PR1_TRL_SITE)",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "export_dir",
        tempfile.gettempdir(),
        "directory on the filesystem the export benchmark writes to",
        flag_values=fv,
    )


def main(argv=None) -> int:
    opts = cli.parse("pr1.bench.all", argv, define_flags, doc=__doc__)
    names = [n.strip() for n in opts.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        cli.usage_error(
            "pr1.bench.all",
            f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}",
        )
    if opts.trl_site and "trl_grpo" in names:
        from pr1.bench.trl_grpo import import_trl

        try:  # on the path before another benchmark imports transformers
            import_trl(opts.trl_site)
        except ImportError:
            pass  # trl_grpo reports it in its row
    from pr1.bench.ratio import machine

    before = machine()
    rows = run_suite(names, opts.quick, opts)
    after = machine()  # after the benchmarks imported jax / torch: their versions and thread settings
    after["loadavg_at_start"] = before.get("loadavg_1_5_15")
    print()
    print(format_table(rows))
    print(f"\nmachine: {json.dumps(after)}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(
                {"machine": after, "quick": opts.quick, "rows": [dataclasses.asdict(r) for r in rows]},
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
