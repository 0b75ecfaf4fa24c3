"""`python -m pr1.eval` end to end on the tiny checkpoint with the embedded engine.

The response of each problem is checked against transformers' own greedy `generate` on a prompt
built by transformers' own processor from the question plus the paper's instruction, so the
prompt construction, the image path and the decoding are all held to an independent reference.
A training checkpoint holding the same weights must give the same records as the HF dir.
"""

import io
import json

import jax.numpy as jnp
import pytest
import torch
from PIL import Image

from pr1 import sharding
from pr1.data.prompts import FORMAT_INSTRUCTION
from pr1.data.synthetic import write_synthetic
from pr1.eval.__main__ import main as eval_main
from pr1.eval.registry import load_benchmark
from pr1.models.config import Qwen25VLConfig
from pr1.models.generation import default_stop_token_ids
from pr1.models.model_def import ModelDef
from pr1.models.tiny_tokenizer import write_tokenizer_files
from pr1.train import checkpoint as checkpoint_lib
from pr1.train import state as state_lib
from tests.hf_reference import load_hf_processor, make_hf_model

MAX_NEW = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_e2e")
    # transformers' unit-scale init: outputs that depend on the prompt (our tiny init's do not, much).
    ckpt = root / "ckpt"
    make_hf_model(seed=2).save_pretrained(ckpt)
    write_tokenizer_files(ckpt, max_pixels=200_704)
    data = write_synthetic(root / "data" / "val.parquet", n=5, seed=1, task="mix")
    return root, ckpt, data


def _hf_greedy(ckpt, question, image_bytes):
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = load_hf_processor(ckpt)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}] * len(image_bytes)
            + [{"type": "text", "text": f"{question.strip()} {FORMAT_INSTRUCTION}"}],
        }
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in image_bytes]
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    stop = default_stop_token_ids(processor.tokenizer, Qwen25VLConfig.from_dir(ckpt))
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=list(stop),
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    cut = next((i for i, t in enumerate(ids) if t in stop), len(ids))
    return processor.tokenizer.decode(ids[:cut], skip_special_tokens=False), cut < len(ids)


def test_eval_cli_on_tiny_checkpoint_matches_transformers(setup, tmp_path, capsys):
    root, ckpt, data = setup
    out = tmp_path / "out"
    args = [
        "--model",
        str(ckpt),
        "--benchmark",
        f"parquet={data}",
        "--out",
        str(out),
        "--max_new_tokens",
        str(MAX_NEW),
        "--dtype",
        "float32",
        "--batch_size",
        "3",
        "--label",
        "tiny",
    ]
    assert eval_main(args) == 0
    problems = load_benchmark("parquet", str(data))
    name = problems[0].benchmark
    lines = (out / f"{name}.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == [p.id for p in problems] and len(records) == 5
    for rec, problem in list(zip(records, problems))[:2]:
        want, stopped = _hf_greedy(ckpt, problem.question, problem.images)
        assert rec["response"] == want
        assert rec["finish_reason"] == ("stop" if stopped else "length")
        assert rec["answer"] == problem.answer and rec["model"] == "tiny"
    assert all(r["response_tokens"] > 0 for r in records) and len({r["response"] for r in records}) > 1
    # A random tiny model states no answer: every record is a checked miss.
    assert all(r["correct"] is False and r["checked_by"] == "rule" for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmarks"][name]["n"] == 5 and summary["benchmarks"][name]["accuracy"] == 0.0
    assert f"| {name} | 0.0 | 0 / 5 |" in capsys.readouterr().out
    # Re-running with the same --out generates nothing new and keeps the file as it is.
    assert eval_main(args) == 0
    assert (out / f"{name}.jsonl").read_text().splitlines() == lines

    # A training checkpoint of the same weights (bf16 → fp32 cast path not involved: fp32 stored).
    config = Qwen25VLConfig.from_dir(ckpt)
    mesh = sharding.make_mesh(2, 2, 2)
    model_def = ModelDef.create(config, dtype=jnp.float32)
    params = state_lib.load_params(ckpt, model_def, mesh)
    tx = state_lib.make_optimizer(state_lib.optimizer_config(), total_steps=10)
    state, _ = state_lib.create_train_state(params, tx, model_def, mesh)
    workdir = tmp_path / "run"
    with checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(str(workdir))) as ckpt_mgr:
        ckpt_mgr.save(
            3,
            state.replace(step=jnp.asarray(3, jnp.int32)),
            {"model": checkpoint_lib.model_record(config, str(ckpt))},
        )
    out2 = tmp_path / "out2"
    assert (
        eval_main(
            [
                "--workdir",
                str(workdir),
                "--benchmark",
                f"parquet={data}",
                "--out",
                str(out2),
                "--max_new_tokens",
                str(MAX_NEW),
                "--dtype",
                "float32",
                "--mesh",
                "data=1,fsdp=4,tensor=2",
            ]
        )
        == 0
    )
    records2 = [json.loads(line) for line in (out2 / f"{name}.jsonl").read_text().splitlines()]
    assert [r["response"] for r in records2] == [r["response"] for r in records]
    assert records2[0]["model"] == "run@3"


def test_eval_cli_errors_name_the_problem(setup, tmp_path, capsys):
    root, ckpt, data = setup
    assert (
        eval_main(
            [
                "--model",
                str(ckpt),
                "--benchmark",
                f"parquet={tmp_path / 'nope.parquet'}",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "nope.parquet" in capsys.readouterr().err
    assert (
        eval_main(
            [
                "--workdir",
                str(tmp_path / "norun"),
                "--benchmark",
                f"parquet={data}",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "norun" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["--model", str(ckpt), "--benchmark", "mathvista", "--out", str(tmp_path / "o")])
