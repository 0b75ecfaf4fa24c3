"""Fixtures of the fault suite (tests/test_faults.py): the run's dataset, a corpus of bad parquet
files and bad config values, a judge reply that varies with the response, and a harness that runs
many `python -m pr1.train` command lines in one process.

Where it sits: test_faults.py drives real training runs (subprocesses it kills, stub servers it
fails) with these; nothing in pr1 imports this module.

`run_cli_cases` exists because each `python -m pr1.train` pays ~4 s of imports before it reads a
flag. It starts one Python process that imports the trainer once and forks a child per command line;
a child runs pr1/train/__main__.py as `python -m` would (fresh absl flags, no JAX backend yet),
down to the exit code and what reaches stderr (an uncaught exception prints its traceback, as the
interpreter would).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pr1.bench.judge import default_reply, request_key
from pr1.data.synthetic import SCHEMA, make_row

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the run's dataset -------------------------------------------------------------------------


def good_row(i: int) -> dict:
    """Synthetic colour row i, made unique: its question and annotations name the item, so a judge
    request (response, annotations) and a logged sample (step, question, response) identify each
    other. Same image size as the debug data (56 px), so every run compiles the same shapes."""
    row = make_row("color", 0, i, 56)
    question = row["problem"].removeprefix("<image>")
    facts = row["visual_key_info"].replace("the shape", f"shape {i}")
    return {**row, "problem": f"<image>Item {i}. {question}", "visual_key_info": facts}


def write_rows(path, rows, schema=SCHEMA) -> str:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def png(width: int = 56, height: int = 56, color=(30, 60, 220)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


# ---- a judge that does not say 1 to everything --------------------------------------------------


def hashed_reply(messages: list[dict]) -> str:
    """The stub judge's verdicts, 0 or 1 per annotation, a hash of the judged response: rewards that
    differ inside a GRPO group (so the update moves the params) yet are the same in every process
    that asks, as a resumed run must see."""
    m = default_reply(messages).count("</info")
    digest = hashlib.sha256(request_key(messages).encode("utf-8", "surrogatepass")).digest()
    return "".join(f"<info{k}>{digest[k] & 1}</info{k}>" for k in range(1, m + 1))


# ---- bad rows and bad files ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BadRow:
    """Row 2 of a five-row file is bad; the error must name `field` and count under `reason`."""

    name: str
    overrides: dict
    field: str
    reason: str
    schema: pa.Schema = SCHEMA
    at_open: bool = True  # found when the file is opened (cheap fields), else when the row is read


_FLOAT_ANSWER = pa.schema([("answer", pa.float64()) if f.name == "answer" else f for f in SCHEMA])


def _image(data=None, path=None) -> list[dict]:
    return [{"bytes": data, "path": path}]


# Kinds test_dataset.py's BAD_ROWS does not have, and those it has met here through the training
# iterator (shuffled, endless, drop_remainder) rather than one validation pass.
BAD_ROWS = [
    BadRow("problem_is_null", {"problem": None}, "problem", "empty_problem"),
    BadRow("answer_is_nan", {"answer": float("nan")}, "answer", "bad_answer", _FLOAT_ANSWER),
    BadRow("answer_is_blank", {"answer": "   "}, "answer", "bad_answer"),
    BadRow(
        "annotations_json_list_of_numbers",
        {"visual_key_info": "[1, 2]"},
        "visual_key_info",
        "bad_annotations",
    ),
    BadRow(
        "annotations_unclosed_tag",
        {"visual_key_info": "<info1>shape 2 is red"},
        "visual_key_info",
        "bad_annotations",
    ),
    BadRow(
        "more_placeholders_than_images",
        {"problem": "<image><image>Two shapes?"},
        "problem",
        "image_count_mismatch",
    ),
    BadRow(
        "fewer_placeholders_than_images", {"images": _image(png()) * 2}, "problem", "image_count_mismatch"
    ),
    # Images are header-checked when the file opens: format, size, aspect ratio.
    BadRow(
        "image_bytes_not_an_image",
        {"images": _image(b"GIF89a but not really")},
        "images[0]",
        "undecodable_image",
    ),
    BadRow(
        "image_path_is_a_text_file", {"images": _image(None, "notes.txt")}, "images[0]", "undecodable_image"
    ),
    BadRow("image_path_missing", {"images": _image(None, "gone/missing.png")}, "images[0]", "missing_image"),
    BadRow("image_aspect_ratio_over_200", {"images": _image(png(450, 2))}, "images[0]", "unprocessable"),
    # A whole header but cut pixel data: found only when the row is read.
    BadRow(
        "image_bytes_truncated_png",
        {"images": _image(png()[:60])},
        "images[0]",
        "undecodable_image",
        at_open=False,
    ),
]


def write_bad_row_file(directory, case: BadRow, rows: int = 5, bad: int = 2) -> str:
    """`rows` good rows with row `bad` replaced by the case's fields; a notes.txt beside it for the
    image-path cases."""
    with open(os.path.join(directory, "notes.txt"), "w") as f:
        f.write("not an image\n")
    data = [good_row(i) for i in range(rows)]
    data[bad] = {**data[bad], **case.overrides}
    if case.schema is _FLOAT_ANSWER:  # one type per column: the good answers as numbers too
        for i, r in enumerate(data):
            if i != bad:
                r["answer"] = float(r["answer"])
    return write_rows(os.path.join(directory, f"{case.name}.parquet"), data, case.schema)


# A column whose type no value of can be right: every row is bad, so skipping leaves nothing.
WRONG_TYPE_COLUMNS = {
    "problem_numbers": ("problem", pa.int64(), lambda i: i),
    "answer_lists": ("answer", pa.list_(pa.string()), lambda i: [str(i)]),
    "answer_bools": ("answer", pa.bool_(), lambda i: bool(i % 2)),
}


def write_wrong_type_column(directory, name: str, rows: int = 5) -> str:
    column, kind, value = WRONG_TYPE_COLUMNS[name]
    schema = pa.schema([(column, kind) if f.name == column else f for f in SCHEMA])
    data = [{**good_row(i), column: value(i)} for i in range(rows)]
    return write_rows(os.path.join(directory, f"{name}.parquet"), data, schema)


def bad_files(directory) -> dict[str, tuple[str, str]]:
    """Files that cannot be read at all: name -> (path, a regex the DataError message must match
    besides the path). skip_bad_rows cannot skip a file."""
    d = str(directory)
    out = {}
    empty = os.path.join(d, "empty_file.parquet")
    open(empty, "wb").close()
    out["empty_file"] = (empty, "not a readable parquet file")
    text = os.path.join(d, "csv_named_parquet.parquet")
    with open(text, "w") as f:
        f.write("problem,answer\nWhat is 1+1?,2\n")
    out["not_parquet"] = (text, "not a readable parquet file")
    whole = write_rows(os.path.join(d, "whole.parquet"), [good_row(i) for i in range(5)])
    cut = os.path.join(d, "cut_in_half.parquet")
    with open(whole, "rb") as f, open(cut, "wb") as g:
        g.write(f.read()[: os.path.getsize(whole) // 2])
    out["truncated_parquet"] = (cut, "not a readable parquet file")
    out["missing_file"] = (os.path.join(d, "never_written.parquet"), "parquet file not found")
    rows = [{k: v for k, v in good_row(i).items() if k != "problem"} for i in range(5)]
    out["no_problem_column"] = (
        write_rows(
            os.path.join(d, "no_problem.parquet"), rows, pa.schema([f for f in SCHEMA if f.name != "problem"])
        ),
        r"no column 'problem' \(config data\.problem_key\)",
    )
    rows = [{k: v for k, v in good_row(i).items() if k != "images"} for i in range(5)]
    out["no_images_column"] = (
        write_rows(
            os.path.join(d, "no_images.parquet"), rows, pa.schema([f for f in SCHEMA if f.name != "images"])
        ),
        r"no column 'images' \(config data\.images_key\)",
    )
    out["zero_rows"] = (write_rows(os.path.join(d, "zero_rows.parquet"), []), "no usable rows")
    return out


# ---- bad config values --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BadConfig:
    """Config overrides that cannot work; the ConfigError must start with `key`."""

    name: str
    overrides: dict
    key: str
    bug: str = ""  # why validate_config does not raise yet ("" = it must today)
    cli_bug: str | None = None  # why the CLI does not exit 2 with one line yet (None: follows from bug)

    @property
    def cli_reason(self) -> str:
        if self.cli_bug is not None:
            return self.cli_bug
        if not self.bug:
            return ""
        return (
            f"{self.bug}; pr1/train/__main__.py catches only ConfigError, so the user gets its "
            "traceback and exit 1"
        )

    def cli_args(self) -> list[str]:
        return [f"--config.{k}={v}" for k, v in self.overrides.items()]


BAD_CONFIGS = [
    BadConfig("dtype_unknown", {"model.param_dtype": "float16"}, "model.param_dtype"),
    BadConfig("compute_dtype_unknown", {"model.compute_dtype": "float16"}, "model.compute_dtype"),
    BadConfig("mesh_axis_zero", {"mesh.data": 0}, "mesh.data"),
    BadConfig("mesh_axis_negative", {"mesh.tensor": -2}, "mesh.tensor"),
    BadConfig("mesh_does_not_divide_devices", {"mesh.data": 3, "mesh.fsdp": -1}, "mesh"),
    BadConfig("prompts_per_step_negative", {"data.prompts_per_step": -4}, "data.prompts_per_step"),
    BadConfig(
        "mini_batches_split_groups",
        {"data.prompts_per_step": 3, "train.mini_batches": 2},
        "train.mini_batches",
    ),
    BadConfig("micro_batches_do_not_divide", {"learner.micro_batches": 3}, "learner.micro_batches"),
    BadConfig("max_new_tokens_zero", {"rollout.max_new_tokens": 0}, "rollout.max_new_tokens"),
    BadConfig("top_p_above_one", {"rollout.top_p": 1.5}, "rollout.top_p"),
    BadConfig("temperature_zero", {"rollout.temperature": 0.0}, "rollout.temperature"),
    BadConfig("sglang_without_urls", {"rollout.engine": "sglang"}, "rollout.sglang.urls"),
    BadConfig("learning_rate_negative", {"optim.learning_rate": -0.001}, "optim.learning_rate"),
    BadConfig("warmup_ratio_one", {"optim.warmup_ratio": 1.0}, "optim.warmup_ratio"),
    BadConfig("max_grad_norm_zero", {"optim.max_grad_norm": 0.0}, "optim.max_grad_norm"),
    BadConfig("remat_typo", {"learner.remat": "ful"}, "learner.remat"),
    BadConfig("kl_without_reference", {"learner.kl_coef": 0.1}, "learner.kl_coef"),
    BadConfig("dual_clip_below_one", {"learner.dual_clip": 0.5}, "learner.dual_clip"),
    BadConfig("steps_zero", {"train.steps": 0}, "train.steps"),
    BadConfig("checkpoint_every_zero", {"train.checkpoint_every": 0}, "train.checkpoint_every"),
    BadConfig("val_every_negative", {"train.val_every": -1}, "train.val_every"),
    BadConfig("max_prompt_length_tiny", {"data.max_prompt_length": 4}, "data.max_prompt_length"),
    BadConfig("num_threads_negative", {"data.num_threads": -1}, "data.num_threads"),
    BadConfig("min_pixels_above_max", {"data.min_pixels": 10000, "data.max_pixels": 3136}, "data.min_pixels"),
    BadConfig(
        "judge_max_failure_rate_above_one",
        {"rewards.judge.max_failure_rate": 1.5},
        "rewards.judge.max_failure_rate",
    ),
    BadConfig(
        "judge_max_concurrency_zero", {"rewards.judge.max_concurrency": 0}, "rewards.judge.max_concurrency"
    ),
    BadConfig("accuracy_timeout_zero", {"rewards.accuracy.timeout": 0.0}, "rewards.accuracy.timeout"),
    # Once rejected only after the model was loaded (found by this suite, now checked up front):
    BadConfig(
        "data_file_missing",
        {"data.synthetic.enabled": False, "data.train_files": ["/nonexistent/train.parquet"]},
        "data.train_files",
    ),
    BadConfig("judge_url_without_scheme", {"rewards.judge.url": "judge-host:8000/v1"}, "rewards.judge.url"),
    BadConfig(
        "judge_timeout_zero",
        {"rewards.judge.url": "http://127.0.0.1:9/v1", "rewards.judge.timeout_s": 0.0},
        "rewards.judge.timeout_s",
    ),
    BadConfig("keep_checkpoints_zero", {"train.keep_checkpoints": 0}, "train.keep_checkpoints"),
    BadConfig(
        "sglang_url_without_scheme",
        {"rollout.engine": "sglang", "rollout.sglang.urls": ["gpu-node:30000"]},
        "rollout.sglang.urls",
    ),
    BadConfig("responses_do_not_divide_devices", {"data.prompts_per_step": 3}, "data.prompts_per_step"),
]


# ---- many CLI runs in one process ---------------------------------------------------------------


@dataclasses.dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli_cases(
    cases: dict[str, list[str]], *, env: dict, workdir: str, timeout_per_case: float = 120.0
) -> dict[str, CliResult]:
    """{name: argv after `python -m pr1.train`} -> {name: CliResult}, one forked child per case."""
    request = {"cases": cases, "workdir": workdir, "timeout": timeout_per_case}
    done = subprocess.run(
        [sys.executable, "-c", "import tests.faults_corpus as f; f._fork_server()"],
        input=json.dumps(request),
        env={**env, "PYTHONPATH": REPO},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_per_case * len(cases) + 120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the CLI harness failed (rc {done.returncode}): {done.stderr[-3000:]}")
    return {name: CliResult(**r) for name, r in json.loads(done.stdout.splitlines()[-1]).items()}


def _fork_server() -> None:
    import runpy
    import signal
    import time
    import traceback

    request = json.loads(sys.stdin.read())
    # The trainer's heavy imports, so that no child pays for them; they start no JAX backend, so
    # forking is safe. pr1.train.__main__ itself runs in each child, as `python -m` runs it.
    import pr1.train.loop  # noqa: F401

    results = {}
    for name, args in request["cases"].items():
        out, err = (os.path.join(request["workdir"], f"{name}.{s}") for s in ("out", "err"))
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for fd, path in ((1, out), (2, err)):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
                sys.argv = ["pr1.train", *args]
                try:
                    runpy.run_module("pr1.train", run_name="__main__", alter_sys=True)
                    code = 0
                except SystemExit as e:
                    if e.code is None or isinstance(e.code, int):
                        code = e.code or 0
                    else:  # sys.exit("message"): the interpreter prints it and exits 1
                        print(e.code, file=sys.stderr)
                except BaseException:  # what the interpreter does with an uncaught exception
                    traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + request["timeout"]
        while True:
            waited, status = os.waitpid(pid, os.WNOHANG)
            if waited:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = -1
                break
            time.sleep(0.02)
        code = os.waitstatus_to_exitcode(status) if status != -1 else -9
        results[name] = {"returncode": code, "stdout": open(out).read(), "stderr": open(err).read()}
    print(json.dumps(results))


# ---- train() with overrides the CLI cannot express ---------------------------------------------


def train_command(root: str, workdir: str, overrides: dict) -> list[str]:
    """argv of a process that runs `pr1.train.loop.train` on configs/debug.py:<root> with `overrides`
    ({"a.b": value}); for values a command line cannot give (list-typed keys such as
    rollout.sglang.urls are refused by config_flags)."""
    spec = json.dumps({"root": str(root), "workdir": str(workdir), "overrides": overrides})
    return [sys.executable, "-c", "import sys, tests.faults_corpus as f; f._train_main(sys.argv[1])", spec]


def apply_overrides(config, overrides: dict):
    config.update_from_flattened_dict(overrides)
    return config


def _train_main(arg: str) -> None:
    spec = json.loads(arg)
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import debug

    from pr1.train.loop import train

    train(apply_overrides(debug.get_config(spec["root"]), spec["overrides"]), spec["workdir"])
