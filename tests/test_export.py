"""`python -m pr1.export`: a training checkpoint becomes an HF dir holding exactly the trained params."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pr1 import export as export_lib
from pr1 import sharding
from pr1.models import hf
from pr1.models.config import Qwen25VLConfig
from pr1.models.model_def import ModelDef
from pr1.models.tiny import write_tiny_checkpoint
from pr1.train import checkpoint as checkpoint_lib
from pr1.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir with steps 1 and 2 on a (2,2,2) mesh; step 2's params differ from the base weights."""
    base = write_tiny_checkpoint(tmp_path_factory.mktemp("export") / "base", seed=3)
    config = Qwen25VLConfig.from_dir(base)
    mesh = sharding.make_mesh(2, 2, 2)
    model_def = ModelDef.create(config, dtype=jnp.float32)
    params = state_lib.load_params(base, model_def, mesh)
    tx = state_lib.make_optimizer(state_lib.optimizer_config(), total_steps=10)
    state, _ = state_lib.create_train_state(params, tx, model_def, mesh)
    workdir = tmp_path_factory.mktemp("workdir")
    record = {"model": checkpoint_lib.model_record(config, str(base))}
    expected = {}
    with checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(str(workdir))) as ckpt:
        for step in (1, 2):
            # A distinct, non-trivial change per step so the wrong step or the base would be caught.
            state = state.replace(
                params=jax.tree.map(lambda p: p * (1 + 0.01 * step) + 0.001 * step, state.params),
                step=jnp.asarray(step, jnp.int32),
            )
            expected[step] = jax.tree.map(np.asarray, state.params)
            ckpt.save(step, state, record)
    return base, config, workdir, expected


def _flat(model):
    return {hf.hf_name(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _flat_params(config, params):
    return _flat(ModelDef.create(config, dtype=jnp.float32).bind(params))


@pytest.mark.parametrize("step", [1, None])
def test_export_writes_exact_params_of_the_step(trained, tmp_path, step):
    base, config, workdir, expected = trained
    out = tmp_path / "hf"
    got_step = export_lib.export(str(workdir), str(out), step=step)
    assert got_step == (step or 2)
    loaded = _flat(hf.load(out, dtype=jnp.float32))
    want = _flat_params(config, expected[got_step])
    assert loaded.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(loaded[name], want[name], err_msg=name)
    # Tokenizer files come along from the recorded base dir, and the config survives unchanged.
    assert (out / "tokenizer.json").exists() and (out / "preprocessor_config.json").exists()
    with open(out / "config.json") as f:
        written = json.load(f)
    assert written["vision_config"] == config.hf_config["vision_config"]


def test_export_cli_bf16_and_errors(trained, tmp_path):
    base, config, workdir, expected = trained
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = tmp_path / "hf16"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pr1.export",
            "--workdir",
            str(workdir),
            "--step",
            "2",
            "--out",
            str(out),
            "--dtype",
            "bfloat16",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert json.load(open(out / "config.json"))["torch_dtype"] == "bfloat16"
    loaded = _flat(hf.load(out, dtype=jnp.float32))
    want = _flat_params(config, expected[2])
    name = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(loaded[name], want[name].astype(jnp.bfloat16).astype(np.float32))

    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "pr1.export",
            "--workdir",
            str(workdir),
            "--step",
            "7",
            "--out",
            str(tmp_path / "x"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2
    assert "step 7" in missing.stderr and "[1, 2]" in missing.stderr
    assert not (tmp_path / "x").exists()


def test_export_without_model_record_names_the_checkpoint(tmp_path):
    workdir = tmp_path / "w"
    state = {"params": {"w": jnp.ones((2, 2))}, "step": jnp.zeros((), jnp.int32)}
    with checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(str(workdir))) as ckpt:
        ckpt.save(5, state, {"data": {"epoch": 0}})
    with pytest.raises(ValueError, match=r"checkpoints/5 has no host_state\['model'\]"):
        export_lib.export(str(workdir), str(tmp_path / "out"))
