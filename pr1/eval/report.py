"""Evaluation reports: per-benchmark and per-subset accuracy from per-problem records.

Where it sits: `pr1.eval` writes `<out>/<benchmark>.jsonl` records (`pr1.eval.run`); this module
turns them into `<out>/summary.json` and `<out>/results.md`, and `python -m pr1.plot --eval` draws
several runs' summaries side by side.

Accuracy is over the problems whose check finished. Problems whose LLM check failed (correct = null)
are not counted as wrong: they are reported as `unchecked` next to the accuracy, and a re-run of
`pr1.eval` with the same `--out` re-checks them. `rule_undecided` counts answers the rules could not
judge without a checker LLM (counted wrong); `no_answer` responses with nothing to extract;
`truncated` responses cut at max_new_tokens.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Iterable

from pr1.eval.problems import IDENTIFIER_SUBSETS, MULTI_VALUED_SUBSETS, SUBSET_SEP

# The paper's Table (accuracy %, see shared/reference/paper.md) for side-by-side reading.
PAPER = {
    "Qwen2.5-VL-7B-Instruct": {"mathvista": 68.1, "mathverse": 47.4, "mathvision": 25.1, "wemath": 61.4},
    "Perception-R1-7B": {"mathvista": 74.2, "mathverse": 54.3, "mathvision": 28.6, "wemath": 72.0},
}


def _tally(records: Iterable[dict]) -> dict:
    c = collections.Counter()
    for r in records:
        c["n"] += 1
        if r.get("correct") is None:
            c["unchecked"] += 1
        else:
            c["checked"] += 1
            c["correct"] += bool(r["correct"])
        c["rule_undecided"] += r.get("checked_by") == "rule_undecided"
        c["llm_checked"] += r.get("checked_by") == "llm"
        c["no_answer"] += r.get("extracted") is None and r.get("correct") is not None
        c["truncated"] += r.get("finish_reason") == "length"
    out = {
        k: int(c[k])
        for k in (
            "n",
            "correct",
            "checked",
            "unchecked",
            "rule_undecided",
            "llm_checked",
            "no_answer",
            "truncated",
        )
    }
    out["accuracy"] = round(100.0 * c["correct"] / c["checked"], 2) if c["checked"] else None
    return out


def summarize(records_by_benchmark: dict[str, list[dict]]) -> dict:
    """{benchmark: tally + subsets {key: {value: tally}}}, plus the model label(s) seen."""
    models = sorted({str(r.get("model")) for recs in records_by_benchmark.values() for r in recs})
    benchmarks = {}
    for name, records in records_by_benchmark.items():
        entry = _tally(records)
        groups: dict[str, dict[str, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
        for r in records:
            for key, value in (r.get("subsets") or {}).items():
                if key in IDENTIFIER_SUBSETS:  # one bucket per problem: not a breakdown
                    continue
                values = value if isinstance(value, list) else [value]
                if key in MULTI_VALUED_SUBSETS:  # a problem counts towards each of its skills
                    values = [v for x in values for v in str(x).split(SUBSET_SEP) if v]
                for v in values:
                    groups[key][str(v)].append(r)
        entry["subsets"] = {
            key: {v: _tally(rs) for v, rs in sorted(values.items())} for key, values in sorted(groups.items())
        }
        benchmarks[name] = entry
    return {"model": models[0] if len(models) == 1 else models, "benchmarks": benchmarks}


def _pct(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def markdown(summary: dict, *, subsets: bool = True) -> str:
    """The summary as Markdown: one overview table, then one table per subset key."""
    lines = [
        f"# Evaluation of {summary['model']}",
        "",
        "| benchmark | accuracy % | correct / checked | unchecked | rule-undecided | LLM-checked "
        "| no answer | truncated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, b in summary["benchmarks"].items():
        lines.append(
            f"| {name} | {_pct(b['accuracy'])} | {b['correct']} / {b['checked']} | {b['unchecked']} | "
            f"{b['rule_undecided']} | {b['llm_checked']} | {b['no_answer']} | {b['truncated']} |"
        )
    known = [n for n in summary["benchmarks"] if any(n in row for row in PAPER.values())]
    if known:
        lines += [
            "",
            "Paper (accuracy %): "
            + "; ".join(
                f"{model}: " + ", ".join(f"{n} {row[n]}" for n in known if n in row)
                for model, row in PAPER.items()
            ),
        ]
    unchecked = sum(b["unchecked"] for b in summary["benchmarks"].values())
    if unchecked:
        lines += [
            "",
            f"**{unchecked} problems are unchecked** (the LLM checker failed on them): accuracy is over "
            "the checked ones; re-run pr1.eval with the same --out to re-check them.",
        ]
    if subsets:
        for name, b in summary["benchmarks"].items():
            for key, values in b["subsets"].items():
                lines += [
                    "",
                    f"## {name} by {key}",
                    "",
                    "| value | accuracy % | correct / checked |",
                    "|---|---|---|",
                ]
                for value, t in values.items():
                    lines.append(f"| {value} | {_pct(t['accuracy'])} | {t['correct']} / {t['checked']} |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, records_by_benchmark: dict[str, list[dict]]) -> dict:
    """Writes summary.json and results.md into out_dir (atomically) and returns the summary."""
    summary = summarize(records_by_benchmark)
    for name, text in (
        ("summary.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n"),
        ("results.md", markdown(summary)),
    ):
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return summary
