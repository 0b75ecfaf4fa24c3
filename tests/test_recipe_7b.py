"""The paper's 7B recipe is consistent: its config validates and its train step lowers on 8 fake devices."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from pr1 import sharding
from pr1.models import vision
from pr1.models.config import Qwen25VLConfig, qwen2_5_vl_7b_hf_config
from pr1.train import state as state_lib
from pr1.train import step as step_lib
from pr1.train.config import validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_perception_r1_7b_update_step_lowers_on_8_devices(tmp_path):
    c = _recipe("perception_r1_qwen2_5_vl_7b")
    with open(tmp_path / "config.json", "w") as f:
        json.dump(qwen2_5_vl_7b_hf_config(), f)
    c.model.path = str(tmp_path)  # shapes only: no weights are read
    validate_config(c, num_devices=8, check_files=False)  # shapes only: no data is read
    assert _recipe("grpo_qwen2_5_vl_7b").rewards.weights.perception == 0.0

    config = Qwen25VLConfig.from_dir(tmp_path)
    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    model_def = state_lib.ModelDef.create(
        config, dtype=jnp.dtype(c.model.param_dtype), compute_dtype=jnp.dtype(c.model.compute_dtype)
    )
    tx = state_lib.run_optimizer(c, model_def)
    state, shardings = state_lib.abstract_train_state(model_def, tx, mesh)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    assert 8.2e9 < n_params < 8.4e9  # Qwen2.5-VL-7B: 8.29B

    rows = c.data.prompts_per_step * c.rollout.n // c.train.mini_batches
    length = c.data.max_prompt_length + c.rollout.max_new_tokens
    patches = vision.patch_bucket(
        vision.patch_slots(np.array([[1, 96, 96]]), config.vision), c.rollout.min_patch_bucket
    )
    shapes = {
        "input_ids": ((rows, length), jnp.int32),
        "attention_mask": ((rows, length), jnp.int32),
        "position_ids": ((rows, 3, length), jnp.int32),
        "loss_mask": ((rows, length), jnp.int32),
        "old_logprobs": ((rows, length), jnp.float32),
        "advantages": ((rows,), jnp.float32),
    }
    shapes.update(vision.layout_shapes(rows, patches, config.vision))
    shapes["pixel_values"] = ((rows, patches, 1176), jnp.bfloat16)
    batch_sh = sharding.batch_sharding(mesh, rows)
    batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sh) for k, (s, d) in shapes.items()}
    update = step_lib.make_update_step(model_def, tx, c.learner, shardings, mesh)
    lowered = update.lower(state, batch)
    out_state = lowered.out_info[0]
    # Every parameter and moment keeps its fsdp sharding through the step.
    for got, want in zip(jax.tree.leaves(out_state), jax.tree.leaves(shardings)):
        assert got.sharding.is_equivalent_to(want, len(got.shape)), (got, want)
    embed = out_state.params["embed_tokens"]["embedding"]
    assert embed.shape == (152064, 3584) and embed.sharding.spec[1] == "fsdp"


def test_perception_r1_7b_validates_on_v5p_64_and_8_devices(tmp_path):
    """As released (no flags): fsdp takes every device, micro-batching derives from the mesh."""
    c = _recipe("perception_r1_qwen2_5_vl_7b")
    c.model.path = str(tmp_path)
    for devices in (32, 8):
        validate_config(c, num_devices=devices, check_files=False)
    rows = c.data.prompts_per_step * c.rollout.n // c.train.mini_batches
    # One response per device per micro-batch: 32 micro-batches of 32 on v5p-64, 128 of 8 on 8 GPUs.
    for fsdp, k in ((32, 32), (8, 128)):
        mesh = jax.sharding.AbstractMesh((1, fsdp, 1), ("data", "fsdp", "tensor"))
        assert step_lib.micro_batch_count(c.learner, rows, mesh) == k
