"""Every command line speaks one dialect (pr1/cli.py): absl flags whose words are joined by '_', every
OpenAI-compatible service named by its role with the same suffixes, and an old spelling answered
with the new one (one line, exit 2).

The flags are read from each command's own --help: in process for the commands parsed by
`cli.parse` (their main answers --help before doing anything), as `python -m` for pr1.train and
pr1.bench.memory (absl's app.run, which owns the global flag registry)."""

import ast
import contextlib
import importlib
import io
import os
import re
import subprocess
import sys

import pytest

from pr1 import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every `python -m` command: its name -> the module whose main parses its flags.
CLIS = {
    "pr1.train": "pr1.train.__main__",
    "pr1.eval": "pr1.eval.__main__",
    "pr1.annotate": "pr1.annotate.__main__",
    "pr1.analyze": "pr1.analyze.__main__",
    "pr1.export": "pr1.export",
    "pr1.plot": "pr1.plot",
    "pr1.debug_ablation": "pr1.debug_ablation",
    "pr1.data.synthetic": "pr1.data.synthetic",
    "pr1.models.tiny": "pr1.models.tiny",
    "pr1.bench.all": "pr1.bench.all",
    "pr1.bench.decode_step": "pr1.bench.decode_step",
    "pr1.bench.export": "pr1.bench.export",
    "pr1.bench.judge": "pr1.bench.judge",
    "pr1.bench.memory": "pr1.bench.memory",
    "pr1.bench.sampler": "pr1.bench.sampler",
    "pr1.bench.step_breakdown": "pr1.bench.step_breakdown",
    "pr1.bench.train_step": "pr1.bench.train_step",
    "pr1.bench.trl_grpo": "pr1.bench.trl_grpo",
}
APP_RUN = ("pr1.train", "pr1.bench.memory")  # ml_collections' --config: absl's app.run
# Modules with a `__main__` block that are not commands a user types.
NOT_CLIS = {"pr1.rewards.verify_process": "the math-verify worker's stdin/stdout protocol"}
# Servers given by URL that are not a service role: the policy's own rollout engines.
ENGINE_URLS = {"sglang_url", "vllm_url"}
FLAG_LINE = re.compile(r"^\s*--(?:\[no\])?([^\s:]+):", re.M)


def _runs_as_main(tree: ast.Module) -> bool:
    """Whether the module has a top-level `if __name__ == "__main__":` block."""
    return any(
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        for node in tree.body
    )


def _main_modules() -> set[str]:
    """The modules `python -m` can run: __main__.py files and modules with a __main__ block."""
    found = set()
    for root, _, files in os.walk(os.path.join(REPO, "pr1")):
        for name in files:
            path = os.path.join(root, name)
            if name == "__main__.py" or (
                name.endswith(".py") and _runs_as_main(ast.parse(open(path).read()))
            ):
                found.add(os.path.relpath(path, REPO)[:-3].replace(os.sep, "."))
    return found


def _help_in_process(module) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0, module.__name__
    return out.getvalue()


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """{command: its --help text}."""
    texts = {}
    for name, module in CLIS.items():
        if name in APP_RUN:
            r = subprocess.run(
                [sys.executable, "-m", name, "--help"],
                cwd=REPO,
                env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"),
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert r.returncode == 1 and not r.stderr, (name, r.stderr)  # absl's app.run exits 1 after --help
            texts[name] = r.stdout
        else:
            texts[name] = _help_in_process(importlib.import_module(module))
    return texts


def test_every_command_is_listed_and_none_uses_argparse():
    assert _main_modules() == set(CLIS.values()) | set(NOT_CLIS)
    for root, _, files in os.walk(os.path.join(REPO, "pr1")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            imported = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.Import):
                    imported |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom):
                    imported.add(node.module)
            assert "argparse" not in imported, f"{path}: pr1 commands parse absl flags (pr1/cli.py)"


def test_flag_names_are_one_dialect(helps):
    suffixes_by_role: dict[str, dict[str, set[str]]] = {}
    for name, text in helps.items():
        flag_names = FLAG_LINE.findall(text)
        assert flag_names, (name, text)
        for flag in flag_names:
            assert "-" not in flag, f"{name} --{flag}: flag names join words with '_'"
            # A service knob is spelled only as <role>_<suffix>: no --llm_url, --retries, --backoff_s.
            suffix = next((s for s in cli.SERVICE_SUFFIXES if flag == s or flag.endswith("_" + s)), None)
            if suffix and flag not in ENGINE_URLS | {"model"}:  # --model: the policy, or the bench's size
                role = flag[: -len(suffix)].rstrip("_")
                assert role in cli.ROLES, f"{name} --{flag}: a service flag is --<role>_{suffix}, {cli.ROLES}"
        for role in cli.ROLES:
            if f"{role}_url" in flag_names:
                suffixes = {f[len(role) + 1 :] for f in flag_names if f.startswith(role + "_")}
                assert set(cli.SERVICE_SUFFIXES) <= suffixes, (name, role, suffixes)
                suffixes_by_role.setdefault(role, {})[name] = suffixes
    assert set(suffixes_by_role) == set(cli.ROLES), suffixes_by_role  # every role has a command
    for role, by_command in suffixes_by_role.items():
        assert len({frozenset(s) for s in by_command.values()}) == 1, (role, by_command)


def test_services_are_named_by_role(helps):
    flags_of = {name: set(FLAG_LINE.findall(text)) for name, text in helps.items()}
    assert {f"checker_{s}" for s in cli.SERVICE_SUFFIXES} <= flags_of["pr1.eval"]
    assert {f"judge_{s}" for s in cli.SERVICE_SUFFIXES} <= flags_of["pr1.analyze"]
    for role in ("teacher", "extractor"):
        assert {f"{role}_{s}" for s in cli.SERVICE_SUFFIXES} <= flags_of["pr1.annotate"]
    assert "assets_from" in flags_of["pr1.eval"] and "assets_from" in flags_of["pr1.export"]


# Renamed flags beyond '-' -> '_': (command, old, new).
RENAMED = [
    ("pr1.eval", "llm_url", "checker_url"),
    ("pr1.eval", "llm_model", "checker_model"),
    ("pr1.eval", "llm_api_key_env", "checker_api_key_env"),
    ("pr1.eval", "llm_mode", "checker_mode"),
    ("pr1.eval", "llm_concurrency", "checker_max_concurrency"),
    ("pr1.eval", "llm_retries", "checker_retries"),
    ("pr1.eval", "llm_timeout", "checker_timeout_s"),
    ("pr1.analyze", "judge-url", "judge_url"),
    ("pr1.analyze", "judge-model", "judge_model"),
    ("pr1.analyze", "judge-api-key-env", "judge_api_key_env"),
    ("pr1.analyze", "judge-timeout", "judge_timeout_s"),
    ("pr1.analyze", "judge-retries", "judge_retries"),
    ("pr1.analyze", "judge-max-concurrency", "judge_max_concurrency"),
    ("pr1.analyze", "save-labels", "save_labels"),
    ("pr1.analyze", "skip-failed", "skip_failed"),
    ("pr1.annotate", "teacher_timeout", "teacher_timeout_s"),
    ("pr1.annotate", "extractor_timeout", "extractor_timeout_s"),
    ("pr1.annotate", "retries", "teacher_retries and --extractor_retries"),
    ("pr1.annotate", "backoff", "teacher_backoff_s and --extractor_backoff_s"),
    ("pr1.annotate", "backoff_max", "teacher_backoff_max_s and --extractor_backoff_max_s"),
    ("pr1.export", "assets-from", "assets_from"),
    ("pr1.data.synthetic", "image-size", "image_size"),
    ("pr1.models.tiny", "max-pixels", "max_pixels"),
    ("pr1.models.tiny", "tie-word-embeddings", "tie_word_embeddings"),
    ("pr1.bench.all", "trl-site", "trl_site"),
    ("pr1.bench.all", "export-dir", "export_dir"),
    ("pr1.bench.export", "no-read", "noread"),
    ("pr1.bench.step_breakdown", "judge-latency", "judge_latency"),
    ("pr1.bench.train_step", "micro-batches", "micro_batches"),
    ("pr1.bench.train_step", "logprob-chunk", "logprob_chunk"),
    ("pr1.bench.trl_grpo", "trl-site", "trl_site"),
]


@pytest.mark.parametrize("command, old, new", RENAMED)
def test_old_spellings_name_the_new_flag(command, old, new, capsys):
    module = importlib.import_module(CLIS[command])
    for arg in (f"--{old}=1", f"--{old}"):
        with pytest.raises(SystemExit) as e:
            module.main([arg])
        err = capsys.readouterr().err
        assert e.value.code == 2, (command, arg, err)
        assert err == f"{command}: --{old} was renamed to --{new}\n", err


def test_any_flag_with_dashes_names_its_underscore_form(helps, capsys):
    """Not only the listed renames: `--a-b` of any flag `--a_b` of a cli.parse command."""
    for name, text in helps.items():
        if name in APP_RUN:
            continue
        module = importlib.import_module(CLIS[name])
        for flag in FLAG_LINE.findall(text):
            if "_" not in flag:
                continue
            old = flag.replace("_", "-")
            with pytest.raises(SystemExit) as e:
                module.main([f"--{old}=1"])
            assert e.value.code == 2
            assert capsys.readouterr().err == f"{name}: --{old} was renamed to --{flag}\n"


def test_bad_flag_and_extra_argument_are_one_line(capsys):
    from pr1.export import main

    for argv, words in (
        (["--workdir=w", "--out=o", "--nonesuch=1"], ["bad flag", "nonesuch"]),
        (["--workdir=w", "--out=o", "stray"], ["unexpected arguments: stray"]),
        (["--workdir=w"], ["--out"]),
        (["--workdir=w", "--out=o", "--step=x"], ["--step"]),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("pr1.export: ") and err.count("\n") == 1, err
        for word in words:
            assert word in err, (word, err)
