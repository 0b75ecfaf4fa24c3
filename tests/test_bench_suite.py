"""The benchmark suite: the export benchmark's numbers, the step-time breakdown's arithmetic, and
`python -m pr1.bench.all`'s table (a row per benchmark, "skipped: ..." for one that cannot run).
No timing is asserted: only that numbers are positive and consistent with each other."""

import json
import os
import sys

import pytest

from pr1.bench import all as suite
from pr1.bench import export as export_bench
from pr1.bench import step_breakdown
from pr1.models.config import Qwen25VLConfig, tiny_hf_config


def _hf_param_count() -> int:
    """Parameters of the tiny model as transformers builds it: an independent count of what is saved."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig(**tiny_hf_config()))
    return sum(p.numel() for p in model.parameters())


def test_export_benchmark_on_tiny_model(tmp_path):
    r = export_bench.measure(Qwen25VLConfig.from_hf_dict(tiny_hf_config()), str(tmp_path), repeats=3)
    for key in ("export_MBps", "raw_MBps", "load_MBps", "raw_read_MBps", "export_s", "raw_s", "load_s"):
        assert r[key] > 0, key
    # The ratios are medians of 3 interleaved pairs; each pair's ratio is the raw side's seconds over ours.
    for prefix, stats in (("", r["write_ratio"]), ("read_", r["read_stats"])):
        assert stats.repeats == 3 and len(stats.ratios) == 3
        assert r[f"{prefix}ratio"] == sorted(stats.ratios)[1]
        assert r[f"{prefix}ratio_min"] == min(stats.ratios) <= r[f"{prefix}ratio"] <= r[f"{prefix}ratio_max"]
        for ours, peer, ratio in zip(stats.ours, stats.peer, stats.ratios):
            assert ratio == pytest.approx(ours / peer, rel=1e-12)
    assert r["export_MBps"] == pytest.approx(r["bytes"] / 1e6 / r["export_s"], rel=1e-12)
    # float32 weights plus small headers, config.json and the index: a few KB over 4 bytes per param.
    weights = 4 * _hf_param_count()
    assert weights <= r["bytes"] < weights + 64 * 1024
    assert os.listdir(tmp_path) == []  # the export and the raw file were removed


def test_raw_write_and_read_move_exactly_the_bytes_asked(tmp_path):
    path = str(tmp_path / "raw.bin")
    n = (16 << 20) + 12345  # more than one block, not a multiple of it
    assert export_bench.raw_write(path, n) > 0
    assert os.path.getsize(path) == n
    assert export_bench.raw_read(path)[0] == n


def test_step_breakdown_averages_the_steps_after_the_first():
    rows = [
        {
            "step": 2,
            "time/step": 2.0,
            "time/rollout": 0.5,
            "time/logprobs": 0.3,
            "time/update": 0.7,
            "time/judge_wait": 0.1,
        },
        {"step": 1, "time/step": 50.0, "time/rollout": 20.0, "time/update": 25.0},  # compilation: left out
        {
            "step": 3,
            "time/step": 4.0,
            "time/rollout": 1.5,
            "time/logprobs": 0.5,
            "time/update": 0.9,
            "time/checkpoint": 0.6,
            "rewards/total/mean": 0.5,
        },
    ]
    r = step_breakdown.breakdown(rows)
    # By hand: means over steps 2 and 3, a phase absent from a step counting 0 there.
    assert r["steps"] == 2 and r["step_s"] == pytest.approx(3.0)
    assert r["phases"] == pytest.approx(
        {
            "time/rollout": 1.0,
            "time/logprobs": 0.4,
            "time/judge_wait": 0.05,
            "time/update": 0.8,
            "time/checkpoint": 0.3,
        }
    )
    assert list(r["phases"]) == [
        "time/rollout",
        "time/logprobs",
        "time/judge_wait",
        "time/update",
        "time/checkpoint",
    ]
    assert r["compute_s"] == pytest.approx(2.2) and r["compute_fraction"] == pytest.approx(2.2 / 3)
    assert r["other_s"] == pytest.approx(0.45)
    assert r["fractions"]["time/update"] == pytest.approx(0.8 / 3)
    with pytest.raises(ValueError, match="at least 2 steps"):
        step_breakdown.breakdown(rows[1:2])


def test_suite_prints_one_row_per_benchmark_and_skips_what_cannot_run(tmp_path, monkeypatch, capsys):
    # torch and TRL made unimportable: the sampler comparison and the TRL one must be skipped, not crash.
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.delenv("PR1_TRL_SITE", raising=False)
    out_json = tmp_path / "rows.json"
    assert (
        suite.main(
            [
                "--quick",
                "--only",
                "export,sampler,trl_grpo",
                "--json",
                str(out_json),
                "--export_dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out.split("\n\nbenchmark ")[-1].splitlines()
    body = [line for line in table[2:] if "|" in line]  # the machine line follows the table
    by_name = {}
    for line in body:
        by_name.setdefault(line.split("|")[0].strip(), []).append(line)
    assert set(by_name) == {"export", "sampler", "trl_grpo"}
    assert len(by_name["export"]) == 2 and all("skipped" not in line for line in by_name["export"])
    assert (
        len(by_name["sampler"]) == 1
        and "skipped: " in by_name["sampler"][0]
        and "torch" in by_name["sampler"][0]
    )
    assert len(by_name["trl_grpo"]) == 1 and "skipped: TRL not installed" in by_name["trl_grpo"][0]

    recorded = json.loads(out_json.read_text())
    assert (
        recorded["machine"]["cpu_count"] == os.cpu_count() and len(recorded["machine"]["loadavg_1_5_15"]) == 3
    )
    assert "jax" in recorded["machine"]
    rows = recorded["rows"]
    assert [r["benchmark"] for r in rows] == ["export", "export", "sampler", "trl_grpo"]
    for r in rows[:2]:
        assert r["skipped"] is None and r["ours"] > 0 and r["peer"] > 0
        assert r["repeats"] == 3 and r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
    assert rows[2]["skipped"] and rows[2]["ratio"] is None
    assert [p for p in os.listdir(tmp_path) if p != "rows.json"] == []


def test_suite_rejects_an_unknown_benchmark_name(capsys):
    with pytest.raises(SystemExit):
        suite.main(["--only", "export,nonesuch"])
    assert "nonesuch" in capsys.readouterr().err
