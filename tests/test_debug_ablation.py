"""The debug run's ablation tooling: config argument, run summaries, the compare plot, and the learning
test (a shortened, seeded debug run whose accuracy reward must rise)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pr1 import debug_ablation
from pr1 import plot as plot_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import debug as debug_config  # noqa: E402


def test_config_argument_picks_assets_dir_and_baseline():
    default = debug_config.get_config()
    assert default.model.path == "/tmp/pr1-debug/tiny" and default.rewards.weights.perception == 0.7
    base = debug_config.get_config("baseline")
    assert base.model.path == "/tmp/pr1-debug/tiny" and base.rewards.weights.perception == 0.0
    both = debug_config.get_config("/x/y/,baseline")
    assert both.model.path == "/x/y/tiny" and both.rewards.weights.perception == 0.0
    assert debug_config.get_config("/x/y").rewards.weights.perception == 0.7
    # Apart from gamma (and the run's name) the two configs are the same run.
    a, b = json.loads(default.to_json_best_effort()), json.loads(base.to_json_best_effort())
    for c in (a, b):
        del c["rewards"]["weights"]["perception"], c["train"]["run_name"]
    assert a == b


def test_baseline_measures_perception_without_training_on_it():
    """measure_unweighted (on in the debug config): with gamma = 0 the judge still scores, for the
    metrics and the compare plot, and the totals are those of an unmeasured run."""
    from pr1.rewards import AccuracyScorer, LexicalJudge, RewardStage, rewards_config

    responses, answers = ["2", "1 2", "x 3", "3"], ["2", "1", "1", "3"]
    annotations = [
        "<info1>there are 2 dots</info1>",
        "<info1>there is 1 dot</info1>",
        "<info1>there is 1 dot</info1>",
        "<info1>there are 3 dots</info1>",
    ]
    outs = {}
    with AccuracyScorer(workers=1) as scorer:
        for measure in (False, True):
            cfg = rewards_config()
            cfg.weights.perception = 0.0
            cfg.judge.measure_unweighted = measure
            with RewardStage(cfg, judge=LexicalJudge(), scorer=scorer) as stage:
                outs[measure, "batch"] = stage.submit(responses, answers, annotations, group_size=2).result(
                    timeout=120
                )
                # The trainer's path: responses scored one by one as they finish.
                stream = stage.stream(answers, annotations, group_size=2)
                for i in reversed(range(len(responses))):
                    stream.add(i, responses[i])
                outs[measure, "stream"] = stream.finish().result(timeout=120)
    for path in ("batch", "stream"):
        off, on = outs[False, path], outs[True, path]
        np.testing.assert_array_equal(off.components["perception"], [0, 0, 0, 0], err_msg=path)
        np.testing.assert_allclose(on.components["perception"], [1, 1, 0, 1], atol=1e-5, err_msg=path)
        assert on.metrics["rewards/perception/mean"] == pytest.approx(0.75, abs=1e-5), path
        np.testing.assert_array_equal(on.totals, off.totals, err_msg=path)
        np.testing.assert_allclose(on.totals, [0.9, 0.0, 0.0, 0.9], atol=1e-6, err_msg=path)
    assert debug_config.get_config("baseline").rewards.judge.measure_unweighted


def _rows(accuracy, perception=None, val=None):
    rows = []
    for i, acc in enumerate(accuracy, 1):
        p = perception[i - 1] if perception else 0.0
        r = {
            "step": i,
            "rewards/accuracy/mean": acc,
            "rewards/perception/mean": p,
            "rewards/total/mean": 0.9 * acc + 0.7 * p,
        }
        if val and i in val:
            r["val/accuracy"] = val[i]
        rows.append(r)
    return rows


def test_summarize_takes_quarters_of_the_logged_steps():
    acc = [0.0, 0.1, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.6, 0.6, 0.7]  # 12 steps: quarters of 3
    s = debug_ablation.summarize(_rows(acc, perception=[1.0] * 12, val={6: 0.25, 12: 0.5}))
    assert s["quarter_steps"] == 3 and s["steps"] == 12
    assert s["acc_first_quarter"] == pytest.approx(0.1 / 3)
    assert s["acc_last_quarter"] == pytest.approx((0.6 + 0.6 + 0.7) / 3)
    assert s["perception_last_quarter"] == 1.0
    assert s["total_last_quarter"] == pytest.approx(0.9 * 1.9 / 3 + 0.7)
    assert s["val_accuracy_last"] == 0.5
    assert np.isnan(debug_ablation.summarize(_rows([0.0, 1.0]))["val_accuracy_last"])
    with pytest.raises(ValueError, match="no training steps"):
        debug_ablation.summarize([{"step": 1, "val/accuracy": 0.5}])


def test_report_has_every_run_the_spread_and_the_differences():
    runs = {
        "perception": {
            0: {c: 0.5 for c in debug_ablation.COLUMNS},
            1: {c: 0.7 for c in debug_ablation.COLUMNS},
        },
        "baseline": {
            0: {c: 0.4 for c in debug_ablation.COLUMNS},
            1: {c: 0.4 for c in debug_ablation.COLUMNS},
        },
    }
    text = debug_ablation.report(runs)
    rows = [line.split()[:2] for line in text.splitlines()[1:]]
    assert rows[:6] == [
        ["perception", "0"],
        ["perception", "1"],
        ["baseline", "0"],
        ["baseline", "1"],
        ["perception", "mean"],
        ["baseline", "mean"],
    ]
    assert "0.600 ± 0.141" in text  # mean and sample std of 0.5, 0.7
    assert "seed 0: +0.100, seed 1: +0.300; mean +0.200 ± 0.141" in text


def test_compare_plot_draws_groups_on_shared_axes(tmp_path):
    dirs = []
    for name, acc in (("a0", [0.0, 0.2, 0.4]), ("a1", [0.0, 0.4, 0.6]), ("b0", [0.0, 0.1, 0.1])):
        d = tmp_path / name
        d.mkdir()
        with open(d / "metrics.jsonl", "w") as f:
            for r in _rows(acc, perception=acc, val={3: acc[-1]}):
                f.write(json.dumps(r) + "\n")
        dirs.append(str(d))
    out = tmp_path / "plots"
    assert plot_lib.main(["--compare", f"{dirs[0]},{dirs[1]}", "--compare", dirs[2], "--out", str(out)]) == 0
    png = out / "compare.png"
    from PIL import Image

    assert Image.open(png).size == (1100, 700)
    with pytest.raises(ValueError, match="2 labels for 1 runs"):
        plot_lib.plot_compare([dirs[0]], str(out), labels=["x", "y"])
    assert (
        plot_lib.main(["--compare", str(tmp_path / "missing"), "--out", str(out)]) == 2
    )  # one-line error, exit 2 (pr1.cli)


def test_debug_run_learns(tmp_path):
    """A shortened debug run (seed 0, the first 60 of its 120 steps) raises its accuracy reward clearly.

    Measured (seeds 0, 1, 2): the last quarter of these 60 steps is 0.17-0.23 above the first, and
    the full runs 0.31-0.33; the margin asserted is 0.1. Runs as its own process with one CPU
    device, as a user's `python -m pr1.train` does.
    """
    steps = LEARNING_TEST_STEPS
    workdir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    cmd = [
        sys.executable,
        "-m",
        "pr1.train",
        "--config",
        f"{REPO}/configs/debug.py:{tmp_path / 'assets'}",
        "--workdir",
        str(workdir),
        f"--config.train.steps={steps}",
        "--config.train.val_every=0",
        "--config.train.tensorboard=False",
        "--config.train.checkpoint_every=1000",
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = debug_ablation.summarize(plot_lib.read_metrics(str(workdir / "metrics.jsonl")))
    assert summary["steps"] == steps
    rise = summary["acc_last_quarter"] - summary["acc_first_quarter"]
    assert rise >= LEARNING_TEST_MARGIN, summary


LEARNING_TEST_STEPS = 60  # the full run: 120 steps
LEARNING_TEST_MARGIN = 0.1
