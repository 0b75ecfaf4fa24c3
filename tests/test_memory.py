"""The memory planner (pr1.bench.memory) on the tiny model and 8 fake devices, against hand counts."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from pr1.bench import accelerators, memory
from pr1.models.config import qwen2_5_vl_7b_hf_config, tiny_hf_config
from pr1.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import debug as debug_config  # noqa: E402

# The small shapes every test plans for: 8 prompts x n=8 = 64 responses of 64 prompt + 4 new tokens,
# one 56x56 image (16 patches of 14x14x3x2 = 1176 values) per prompt, in one 64-patch window slot.
PROMPTS, N, PROMPT_BUCKET, NEW, PATCHES, PATCH_DIM = 8, 8, 64, 4, 64, 1176


def small_config(tmp_path, mesh="fsdp=8", **overrides):
    c = debug_config.get_config(str(tmp_path / "assets"))
    c.data.prompts_per_step = PROMPTS
    c.rollout.n = N
    c.data.max_prompt_length = PROMPT_BUCKET
    c.rollout.max_new_tokens = NEW
    c.learner.micro_batches = 1  # what these plans were written for (the debug run uses 8)
    c.update_from_flattened_dict(overrides)
    model_config = memory.prepare_config(
        c, memory.model_hf_config(c), str(tmp_path / "model"), memory.parse_mesh(mesh)
    )
    return c, model_config, memory.plan_mesh(c)


def qwen2_5_vl_parameters(d):
    """Parameter count of a Qwen2.5-VL config.json, from the architecture (HF modeling_qwen2_5_vl):
    q/k/v projections with bias, o without, SwiGLU MLPs, RMSNorm weights, a bias-free Conv3d patch
    embedding, vision blocks with biased qkv/proj/MLP, and the 2x2 patch merger (RMSNorm + 2 Linear)."""
    t, v = d["text_config"], d["vision_config"]
    h, i = t["hidden_size"], t["intermediate_size"]
    kv = t["num_key_value_heads"] * (h // t["num_attention_heads"])
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    text = t["vocab_size"] * h * (1 if d["tie_word_embeddings"] else 2) + t["num_hidden_layers"] * layer + h
    vh, vi, out, m = v["hidden_size"], v["intermediate_size"], v["out_hidden_size"], 4 * v["hidden_size"]
    block = 2 * vh + (3 * vh * vh + 3 * vh) + (vh * vh + vh) + 2 * (vh * vi + vi) + (vi * vh + vh)
    return text + v["depth"] * block + 3 * 2 * 14 * 14 * vh + vh + (m * m + m) + (m * out + out)


TINY = tiny_hf_config()
TINY_PARAMS = qwen2_5_vl_parameters(TINY)
# Leaves whose only dimension is a tensor-parallel one stay whole under fsdp: the q/k/v biases of each
# decoder layer, the qkv and gate/up biases of each vision block, the merger's first bias (4 x 32).
TINY_WHOLE = (
    TINY["text_config"]["num_hidden_layers"] * (64 + 32 + 32)
    + TINY["vision_config"]["depth"] * (3 * 32 + 64 + 64)
    + 4 * 32
)
# Optimizer: AdamW's mu and nu per parameter, plus two int32 step counts (Adam's, the lr schedule's).
COUNTS = 2 * 4


def _train_state(c, model_def, mesh):
    """The run's abstract train state and its shardings, as the planner and the trainer build it."""
    return state_lib.abstract_train_state(model_def, state_lib.run_optimizer(c, model_def), mesh)


def test_hand_count_of_known_checkpoints():
    assert TINY_PARAMS == 244_640
    assert qwen2_5_vl_parameters(qwen2_5_vl_7b_hf_config()) == 8_292_166_656  # Qwen2.5-VL-7B's 8.29B


def test_replicated_state_bytes_are_the_hand_count(tmp_path):
    """data=8: every leaf whole on every device; fp32 params, AdamW mu + nu."""
    c, model_config, mesh = small_config(tmp_path, mesh="data=8")
    state, _ = _train_state(c, state_lib.ModelDef.create(model_config, jnp.float32), mesh)
    assert memory.bytes_per_device(state.params) == 4 * TINY_PARAMS
    assert memory.bytes_per_device(state.opt_state) == 2 * 4 * TINY_PARAMS + COUNTS


def test_fsdp_state_bytes_are_the_hand_count(tmp_path):
    """fsdp=8: sharded leaves hold 1/8 on each device, the whole ones all of it."""
    c, model_config, mesh = small_config(tmp_path, mesh="fsdp=8")
    state, _ = _train_state(c, state_lib.ModelDef.create(model_config, jnp.float32), mesh)
    hand = 4 * ((TINY_PARAMS - TINY_WHOLE) // 8 + TINY_WHOLE)
    assert memory.bytes_per_device(state.params) == hand
    assert memory.bytes_per_device(state.opt_state) == 2 * hand + COUNTS


def test_optimizer_state_is_fp32_and_keeps_its_dtypes_with_bf16_params(tmp_path):
    """Whatever the params' dtype, AdamW's moments are fp32 (4 + 4 bytes per parameter) and the
    update hands back the state it was given: one program, planned once."""
    c, model_config, mesh = small_config(tmp_path, **{"model.param_dtype": "bfloat16"})
    model_def = state_lib.ModelDef.create(model_config, jnp.bfloat16)
    tx = state_lib.run_optimizer(c, model_def)
    state, shardings = state_lib.abstract_train_state(model_def, tx, mesh)
    elements = (TINY_PARAMS - TINY_WHOLE) // 8 + TINY_WHOLE
    assert memory.bytes_per_device(state.params) == 2 * elements
    assert memory.bytes_per_device(state.opt_state) == 8 * elements + COUNTS
    lowered, _ = memory.lower_update_step(c, model_def, tx, shardings, mesh, state, model_config)
    steady, changed = memory.steady_state(lowered, state)
    assert not changed
    assert memory.bytes_per_device(steady.opt_state) == 8 * elements + COUNTS


def test_fsdp_holds_fewer_param_bytes_than_data_parallel(tmp_path):
    sizes = {}
    for mesh in ("fsdp=8", "data=8", "fsdp=4,tensor=2"):
        c, model_config, m = small_config(tmp_path / mesh, mesh=mesh)
        state, _ = _train_state(c, state_lib.ModelDef.create(model_config, jnp.float32), m)
        sizes[mesh] = memory.bytes_per_device(state.params)
    assert sizes["fsdp=8"] < sizes["fsdp=4,tensor=2"] < sizes["data=8"]


def batch_bytes_per_device(rows, update):
    """Hand count of one device's share of the learner batch (rows split over 8 devices)."""
    r, t = rows // 8, PROMPT_BUCKET + NEW
    row_arrays = 5 if update else 4  # ids, mask, loss mask, rollout logprobs (+ old logprobs): [r, T] x 4 B
    return (
        row_arrays * r * t * 4
        + r * 3 * t * 4  # position_ids
        + (r * 4 if update else 0)  # advantages
        + r * PATCHES * PATCH_DIM * 4
        + r * PATCHES * 2 * 4
        + 2 * r * PATCHES * 4  # pixels, hw, frame, window
        + r * PATCHES // 4 * 4
    )  # feature_index: one per merged unit


def test_update_step_accounting_matches_the_hand_count(tmp_path):
    c, model_config, mesh = small_config(tmp_path)
    plan = memory.plan_memory(c, model_config, mesh, phases=("update",))
    update = plan.phase("update")
    state = update.params + update.optimizer + 4  # + the int32 step
    assert update.batch == batch_bytes_per_device(PROMPTS * N, update=True)
    # XLA's own argument and donation accounting agree with the shapes: state + batch in, state aliased.
    assert update.arguments == state + update.batch
    assert update.aliased == state
    assert update.resident == 0
    assert update.peak == update.arguments + update.outputs - update.aliased + update.temp + update.code
    assert update.temp > 0 and update.largest


def test_logprob_temporaries_grow_with_the_batch(tmp_path):
    temps = {}
    for prompts in (PROMPTS, 2 * PROMPTS):
        c, model_config, mesh = small_config(tmp_path / str(prompts), **{"data.prompts_per_step": prompts})
        plan = memory.plan_memory(c, model_config, mesh, phases=("logprobs",))
        p = plan.phase("logprobs")
        assert p.batch == batch_bytes_per_device(prompts * N, update=False)
        assert p.resident == p.optimizer + 4  # the optimizer state stays on the device during the pass
        temps[prompts] = p.temp
    assert temps[2 * PROMPTS] > temps[PROMPTS]


def test_rollout_kv_cache_is_the_hand_count_and_inside_temp(tmp_path):
    c, model_config, mesh = small_config(tmp_path)
    rollout = memory.plan_memory(c, model_config, mesh, phases=("rollout",)).phase("rollout")
    # k and v: [2 layers, rows / 8 devices, slots, 2 kv heads, 16 head dim] fp32, the prompt cache
    # (8 prompts, 64 slots: once per prompt) and the response cache (64 sequences, 4 slots).
    assert rollout.kv_cache == 2 * 2 * (PROMPTS // 8 * PROMPT_BUCKET + PROMPTS * N // 8 * NEW) * 2 * 16 * 4
    assert rollout.temp > rollout.kv_cache
    # prompts: ids, mask, deltas and 3 position rows, and one image per prompt, on 1 of 8 devices.
    r = PROMPTS // 8
    assert rollout.batch == (
        2 * r * PROMPT_BUCKET * 4
        + r * 4
        + 3 * r * PROMPT_BUCKET * 4
        + r * PATCHES * (PATCH_DIM + 2 + 1 + 1) * 4
        + r * PATCHES // 4 * 4
    )
    assert rollout.peak >= rollout.params + rollout.optimizer + rollout.batch + rollout.kv_cache


def test_verdict_flips_at_the_peak():
    gib = accelerators.GiB
    assert accelerators.verdict(10 * gib, "v5e").fits
    assert accelerators.verdict(10 * gib, "v5e").headroom_bytes == 6 * gib
    assert not accelerators.verdict(17 * gib, "v5e").fits
    assert str(accelerators.verdict(17 * gib, "v5e")) == "does not fit (over by 1.00 GiB)"
    assert str(accelerators.verdict(90 * gib, "v5p")) == "fits (headroom 5.00 GiB)"
    peak = 123_456_789
    assert accelerators.verdict(peak, "H100", hbm=peak).fits
    assert not accelerators.verdict(peak, "H100", hbm=peak - 1).fits
    assert accelerators.verdict(80 * gib, "H100").fits and not accelerators.verdict(80 * gib + 1, "H100").fits


def test_a_program_the_compiler_refuses_is_planned_from_its_error():
    """libtpu will not compile what exceeds HBM; the plan takes the temporaries its error names."""

    class Refused:
        def compile(self):
            raise jax.errors.JaxRuntimeError(
                "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
                "(160.58G) exceeds available HBM (95.74G)."
            )

    stats = memory._compiled_memory(Refused(), argument_bytes=1234)
    assert stats["temp"] == int(160.58 * 2**30) and stats["arguments"] == 1234
    assert stats["refused"].startswith("RESOURCE_EXHAUSTED")

    class Broken:
        def compile(self):
            raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        memory._compiled_memory(Broken(), argument_bytes=0)


def test_mesh_flag_and_device_errors():
    assert memory.parse_mesh("data=1,fsdp=32,tensor=1") == {"data": 1, "fsdp": 32, "tensor": 1}
    assert memory.parse_mesh("fsdp=4,tensor=2") == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(memory.PlanError, match="AXIS=N"):
        memory.parse_mesh("fsdp=0")
    with pytest.raises(memory.PlanError, match="AXIS=N"):
        memory.parse_mesh("pipeline=2")
    jax.devices()  # this process's backend is up with conftest's 8 devices
    memory.use_fake_cpu_devices(8)  # enough: nothing to do
    with pytest.raises(memory.PlanError, match="fresh process"):
        memory.use_fake_cpu_devices(32)


def _cli(tmp_path, *args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")  # the CLI must override it
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pr1.bench.memory",
            f"--config=configs/debug.py:{tmp_path}",
            "--config.data.prompts_per_step=8",
            "--config.data.max_prompt_length=64",
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prints_the_table_and_verdicts(tmp_path):
    out = _cli(tmp_path, "--mesh=data=1,fsdp=8,tensor=1", "--accelerator=v5e", "--phase=logprobs")
    assert out.returncode == 0, out.stderr
    assert "compiling logprobs" in out.stdout
    assert "(8 devices), 244,640 parameters" in out.stdout
    for row in ("params", "optimizer state", "batch inputs", "XLA temp", "peak estimate"):
        assert row in out.stdout
    assert "v5e" in out.stdout and "logprobs fits (headroom" in out.stdout and "H100" not in out.stdout

    bad = _cli(tmp_path, "--mesh=fsdp=8", "--config.learner.micro_batches=16")
    assert bad.returncode == 2
    assert "bad config: learner.micro_batches" in bad.stderr

    typo = _cli(tmp_path, "--mesh=fsdp=8", "--config.learner.micro_batchez=2")
    assert typo.returncode == 2
    assert "bad config override --config.learner.micro_batchez: the config has no key" in typo.stderr


@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
def test_vision_tower_temporaries_grow_linearly_in_rows(implementation):
    """Each image attends only to itself: doubling a micro-batch's rows (1,024 patch slots each, 7B
    vision widths, one windowed + one full-attention block, bf16) at most ~doubles the compiled
    temporaries. (Attending all rows as one block-diagonal sequence grew them 4x per doubling.)"""
    import dataclasses

    from flax import nnx

    from pr1.models.config import Qwen25VLConfig
    from pr1.models.vision import VisionTower, layout_shapes

    cfg = Qwen25VLConfig.from_hf_dict(qwen2_5_vl_7b_hf_config()).vision
    cfg = dataclasses.replace(cfg, depth=2, fullatt_block_indexes=(1,))
    graphdef, state = nnx.split(
        nnx.eval_shape(
            lambda: VisionTower(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), attention=implementation)
        )
    )

    def temporaries(rows):
        shapes = layout_shapes(rows, 1024, cfg)
        layout = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items() if k != "pixel_values"}
        pixels = jax.ShapeDtypeStruct(shapes["pixel_values"][0], jnp.bfloat16)
        fwd = jax.jit(lambda st, pix, lay: nnx.merge(graphdef, st)(pix, lay))
        return fwd.lower(state, pixels, layout).compile().memory_analysis().temp_size_in_bytes

    two, four = temporaries(2), temporaries(4)
    assert four <= 2.3 * two, (two, four)
