"""Every command line's user errors are one line on stderr naming what to fix, exit code 2, no
traceback: missing or unreadable files, a config file without get_config, an argument the config
does not take, a bad flag; and every launch/ script answers --help with its usage and exit 0.

pr1.train and pr1.annotate run as subprocesses, as users run them; the other commands run in
process (their main returns the exit code, or exits 2 on a flag error) with stderr captured."""

import os
import subprocess
import sys

import pytest

from pr1.analyze.__main__ import main as analyze_main
from pr1.eval.__main__ import main as eval_main
from pr1.export import main as export_main
from pr1.plot import main as plot_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")


def assert_one_line(rc, err, *words):
    assert rc == 2, (rc, err)
    assert "Traceback" not in err and err.strip() and "\n" not in err.strip(), err
    for word in words:
        assert word in err, (word, err)


def run_module(module, *args, env=ENV):
    r = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    return r.returncode, r.stderr


def unreadable_file(tmp_path):
    """A file that exists but cannot be read: mode 000, or (as root, who may read anything) a proc
    file whose first read fails with EIO."""
    if os.geteuid() == 0:
        return "/proc/self/mem"
    path = tmp_path / "secret.py"
    path.write_text("def get_config():\n    return None\n")
    path.chmod(0)
    return str(path)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("configs")
    (d / "no_get_config.py").write_text("import ml_collections\nCONFIG = ml_collections.ConfigDict()\n")
    (d / "no_arg.py").write_text(
        "import ml_collections\n\n\ndef get_config():\n    return ml_collections.ConfigDict({'a': 1})\n"
    )
    (d / "broken.py").write_text("import ml_collections\n\n\ndef get_config():\n    return undefined_name\n")
    return d


def test_train_config_errors(configs, tmp_path):
    work = str(tmp_path / "w")
    cases = [
        (("--config", "/nonexistent/cfg.py"), ["config file /nonexistent/cfg.py not found"]),
        (("--config", str(configs)), [str(configs), "is a directory"]),
        (("--config", unreadable_file(tmp_path)), ["cannot read config file"]),
        (
            ("--config", str(configs / "no_get_config.py")),
            ["no_get_config.py defines no get_config() function"],
        ),
        (("--config", f"{configs / 'no_arg.py'}:big"), ["no_arg.py takes no argument, got 'big'"]),
        (
            ("--config", "configs/perception_r1_qwen2_5_vl_7b.py:big"),
            ["perception_r1_qwen2_5_vl_7b.py does not accept the argument 'big'"],
        ),
        (("--config", str(configs / "broken.py")), ["broken.py:5: NameError", "undefined_name"]),
        (("--config", str(configs / "no_arg.py"), "--config.b=2"), ["--config.b", "no key 'b'"]),
        # A renamed key names its new spelling (seconds carry the service flags' _s suffix).
        (
            ("--config", "configs/debug.py", "--config.rewards.judge.timeout=3"),
            ["--config.rewards.judge.timeout", "renamed to rewards.judge.timeout_s"],
        ),
    ]
    for args, words in cases:
        rc, err = run_module("pr1.train", *args, "--workdir", work)
        assert_one_line(rc, err, "pr1.train: ", *words)
    rc, err = run_module("pr1.train", "--config", str(configs / "no_arg.py"))
    assert_one_line(rc, err, "--workdir")
    assert not os.path.exists(work)


def test_annotate_input_errors(tmp_path):
    services = [
        "--teacher_url=http://127.0.0.1:9/v1",
        "--teacher_model=t",
        "--extractor_url=http://127.0.0.1:9/v1",
        "--extractor_model=x",
        f"--output={tmp_path / 'out.parquet'}",
    ]
    not_parquet = tmp_path / "in.parquet"
    not_parquet.write_text("not parquet")
    for path, words in (
        (tmp_path / "missing.parquet", ["missing.parquet", "not found"]),
        (not_parquet, ["in.parquet", "not a readable parquet file"]),
        (tmp_path, [str(tmp_path)]),
    ):
        rc, err = run_module("pr1.annotate", f"--input={path}", *services)
        assert_one_line(rc, err, "pr1.annotate: ", *words)
    rc, err = run_module("pr1.annotate", "--input=x.parquet")
    assert_one_line(rc, err, "--output", "--teacher_url")


def _in_process(main, argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # flag errors, found while parsing (pr1/cli.py)
        rc = e.code
    return rc, capsys.readouterr().err


def test_eval_analyze_export_plot_input_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    records = tmp_path / "a.jsonl"
    records.write_text("not json\n")
    cases = [
        (
            eval_main,
            [
                "--model",
                str(empty),
                "--benchmark",
                f"parquet={tmp_path / 'nope.parquet'}",
                "--out",
                str(tmp_path / "o"),
            ],
            ["pr1.eval: ", "nope.parquet"],
        ),
        (
            eval_main,
            [
                "--model",
                str(empty),
                "--benchmark",
                f"mathvista={tmp_path / 'nope'}",
                "--out",
                str(tmp_path / "o"),
            ],
            ["pr1.eval: ", "nope", "MathVista"],
        ),  # a multi-line hint, folded
        (
            eval_main,
            ["--model", str(empty), "--benchmark", "mathvista:/x", "--out", "o"],
            ["--benchmark wants NAME=PATH"],
        ),
        (
            eval_main,
            ["--benchmark", "parquet=/x", "--out", "o"],
            ["exactly one of --model DIR or --workdir DIR"],
        ),
        (
            analyze_main,
            ["mcnemar", str(tmp_path / "missing.jsonl"), str(records), "--label", "accuracy"],
            ["pr1.analyze: ", "missing.jsonl"],
        ),
        (
            analyze_main,
            ["mcnemar", str(records), str(records), "--label", "accuracy"],
            ["a.jsonl:1", "not valid JSON"],
        ),
        (
            analyze_main,
            ["mcnemar", str(empty), str(records), "--label", "accuracy"],
            ["pr1.analyze: ", str(empty)],
        ),
        (analyze_main, [str(records)], ["pr1.analyze: give a command: mcnemar"]),
        (
            export_main,
            ["--workdir", str(tmp_path / "norun"), "--out", str(tmp_path / "x")],
            ["pr1.export: ", "norun"],
        ),
        (export_main, ["--workdir", str(empty)], ["--out"]),
        (plot_main, ["--workdir", str(tmp_path / "norun")], ["pr1.plot: ", "norun"]),
        (plot_main, ["--workdir", str(empty), "--eval", str(empty)], ["give --workdir DIR, or --eval"]),
    ]
    for main, argv, words in cases:
        rc, err = _in_process(main, argv, capsys)
        assert_one_line(rc, err, *words)


@pytest.mark.parametrize(
    "script", sorted(f for f in os.listdir(os.path.join(REPO, "launch")) if f.endswith(".sh"))
)
def test_launch_scripts_answer_help(script):
    for flag in ("--help", "-h"):
        r = subprocess.run(
            ["bash", os.path.join(REPO, "launch", script), flag],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")},
        )
        assert r.returncode == 0, (script, flag, r.stderr)
        assert len(r.stdout.splitlines()) >= 5 and r.stderr == "", (script, r.stdout, r.stderr)
