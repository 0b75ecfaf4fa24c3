"""The GRPO learner: sharded update = single-device update, exact gradient accumulation, NaN guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from pr1 import sharding
from pr1.data.processor import Processor
from pr1.models.config import Qwen25VLConfig
from pr1.models.model_def import ModelDef
from pr1.models.rope import rope_index
from pr1.models.tiny import write_tiny_checkpoint
from pr1.models.vision import batched_vision_inputs
from pr1.train import state as state_lib
from pr1.train import step as step_lib

B, RESPONSE = 8, 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("learner") / "ckpt", seed=5)
    return path, Qwen25VLConfig.from_dir(path)


def make_batch(path, config, seed=0, responses=None):
    """B sequences: half with an image, ragged responses right-padded, ragged prompts left-padded.
    `responses` [B, R] replaces the random response tokens (then every response is R tokens long)."""
    rng = np.random.default_rng(seed)
    processor = Processor.from_dir(path)
    images = [
        [Image.fromarray(rng.integers(0, 255, (56 + 28 * (i % 3), 84, 3), np.uint8))] if i % 2 == 0 else None
        for i in range(B)
    ]
    questions = [f"What is the value of x in figure {i}?" + " and why" * (i % 3) for i in range(B)]
    p = processor(questions, images)
    lengths = rng.integers(3, RESPONSE + 1, B)
    response = rng.integers(0, 400, (B, RESPONSE)).astype(np.int32)
    if responses is not None:
        response = np.asarray(responses, np.int32)
        lengths = np.full(B, response.shape[1])
    response_mask = (np.arange(response.shape[1])[None] < lengths[:, None]).astype(np.int32)
    ids = np.concatenate([p["input_ids"], response * response_mask], axis=1)
    mask = np.concatenate([p["attention_mask"], response_mask], axis=1)
    pos, _ = rope_index(config, ids, p["image_grid_thw"], mask)
    # The processor concatenates the batch's images in row order; give each row back its own.
    pixels, grids, start, image = [], [], 0, 0
    for row_images in images:
        if row_images is None:
            pixels.append(None)
            grids.append(None)
            continue
        grid = p["image_grid_thw"][image : image + 1]
        n = int(grid.prod())
        pixels.append(p["pixel_values"][start : start + n])
        grids.append(grid)
        start, image = start + n, image + 1
    vision = batched_vision_inputs(pixels, grids, config.vision, num_patches=64)
    batch = {
        "input_ids": ids.astype(np.int32),
        "attention_mask": mask.astype(np.int32),
        "position_ids": np.swapaxes(pos, 0, 1).astype(np.int32),
        "loss_mask": np.concatenate([np.zeros_like(p["attention_mask"]), response_mask], axis=1).astype(
            np.int32
        ),
        "advantages": rng.standard_normal(B).astype(np.float32),
        **vision,
    }
    return batch


def optim_cfg(**kw):
    cfg = state_lib.optimizer_config()
    cfg.learning_rate, cfg.warmup_ratio = 1e-3, 0.0
    cfg.update(kw)
    return cfg


def run_update(
    path, config, batch, mesh, *, micro_batches=1, optim=None, tx=None, old_noise_seed=1, **learner
):
    model_def = ModelDef.create(config, dtype=jnp.float32)
    params = state_lib.load_params(path, model_def, mesh)
    cfg = step_lib.learner_config()
    cfg.micro_batches = micro_batches
    cfg.update(learner)
    logprob_step = step_lib.make_logprob_step(model_def, cfg, model_def.param_shardings(mesh), mesh)
    old = np.asarray(logprob_step(params, batch))
    # Perturb the behaviour logprobs so ratios leave 1 and every clip branch is exercised.
    noise = np.random.default_rng(old_noise_seed).normal(0, 1.2, old.shape).astype(np.float32)
    full = dict(batch, old_logprobs=old + noise * batch["loss_mask"])
    tx = tx or state_lib.make_optimizer(optim or optim_cfg(), total_steps=10, params=params)
    state, shardings = state_lib.create_train_state(params, tx, model_def, mesh)
    update = step_lib.make_update_step(model_def, tx, cfg, shardings, mesh)
    new, metrics = update(state, full)
    return jax.device_get(new.params), jax.device_get(metrics), old


# Equivalence is checked with plain SGD (new = p - g): Adam's first step g/(|g|+eps) turns the
# last-bit noise of gradients that are ~1e-9 (zero-initialised biases) into visible parameter
# differences, which says nothing about sharding. The Adam path is exercised separately.
SGD = optax.sgd(1.0)


@pytest.fixture(scope="module")
def reference(tiny):
    path, config = tiny
    batch = make_batch(path, config)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return batch, run_update(path, config, batch, mesh, tx=SGD)


def _assert_same(got, want, rtol=1e-5):
    (gp, gm, gold), (wp, wm, wold) = got, want
    np.testing.assert_allclose(gold, wold, rtol=1e-5, atol=1e-6)
    for name in ("loss", "grad_norm", "pg_clipfrac", "entropy"):
        np.testing.assert_allclose(gm[name], wm[name], rtol=rtol, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-7), gp, wp)


def test_reference_step_is_meaningful(reference):
    batch, (params, metrics, old) = reference
    assert bool(metrics["finite"]) and metrics["grad_norm"] > 0
    assert 0 < metrics["pg_clipfrac"] < 1 and metrics["pg_clipfrac_dual"] > 0
    assert metrics["tokens"] == batch["loss_mask"].sum()
    assert np.isfinite(old[batch["loss_mask"] == 1]).all() and (old[batch["loss_mask"] == 1] < 0).all()


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_update_equals_single_device(tiny, reference, shape):
    path, config = tiny
    batch, want = reference
    mesh = sharding.make_mesh(*shape)
    _assert_same(run_update(path, config, batch, mesh, tx=SGD), want)


def test_micro_batches_equal_one_big_batch(tiny, reference):
    path, config = tiny
    batch, want = reference
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _assert_same(run_update(path, config, batch, mesh, micro_batches=4, tx=SGD), want)


@pytest.mark.parametrize("learner", [{"remat": "full"}, {"remat": "dots", "logprob_chunk": 7}])
def test_remat_and_chunked_logprobs_change_nothing(tiny, reference, learner):
    """Per-layer remat and chunked vocab projection are memory trades only: same update."""
    path, config = tiny
    batch, want = reference
    mesh = sharding.make_mesh(2, 1, 1, devices=jax.devices()[:2])
    _assert_same(run_update(path, config, batch, mesh, tx=SGD, micro_batches=2, **learner), want)


def test_remat_really_recomputes(tiny, reference):
    """The remat option reaches the compiled backward: its HLO holds rematerialized computations."""
    path, config = tiny
    batch, _ = reference
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model_def = ModelDef.create(config, dtype=jnp.float32)
    params = state_lib.init_params(model_def, mesh)
    full = dict(batch, old_logprobs=np.zeros(batch["input_ids"].shape, np.float32))
    state, shardings = state_lib.create_train_state(params, SGD, model_def, mesh)
    matmuls = {}
    for remat in ("none", "dots", "full"):
        cfg = step_lib.learner_config()
        cfg.remat = remat
        update = step_lib.make_update_step(model_def, SGD, cfg, shardings, mesh)
        matmuls[remat] = str(jax.make_jaxpr(update)(state, full)).count("dot_general[")
    # "full" recomputes every forward matmul of every layer in the backward pass; "dots" keeps the
    # weight matmuls and recomputes only attention's (batched) ones.
    assert matmuls["none"] < matmuls["dots"] < matmuls["full"], matmuls


def test_adamw_step_and_frozen_vision_tower(tiny, reference):
    path, config = tiny
    batch, _ = reference
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    params, metrics, _ = run_update(path, config, batch, mesh, optim=optim_cfg(freeze_vision_tower=True))
    assert bool(metrics["finite"])
    before = jax.device_get(state_lib.load_params(path, ModelDef.create(config, jnp.float32), mesh))
    jax.tree.map(np.testing.assert_array_equal, params["visual"], before["visual"])
    assert not np.array_equal(
        params["layers"][0]["mlp"]["up_proj"]["kernel"], before["layers"][0]["mlp"]["up_proj"]["kernel"]
    )


def test_nan_loss_keeps_state_and_raises(tiny, reference):
    path, config = tiny
    batch, _ = reference
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model_def = ModelDef.create(config, dtype=jnp.float32)
    params = state_lib.load_params(path, model_def, mesh)
    bad = dict(
        batch,
        old_logprobs=np.zeros(batch["input_ids"].shape, np.float32),
        advantages=np.full(B, np.nan, np.float32),
    )
    tx = state_lib.make_optimizer(optim_cfg(), total_steps=10)
    state, shardings = state_lib.create_train_state(params, tx, model_def, mesh)
    before = jax.device_get(state.params)
    update = step_lib.make_update_step(model_def, tx, step_lib.learner_config(), shardings, mesh)
    new, metrics = update(state, bad)
    assert not bool(metrics["finite"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new.params), before)
    assert int(new.step) == 0
    with pytest.raises(step_lib.NonFiniteError, match="step 7: loss=nan"):
        step_lib.check_finite(metrics, step=7)


def test_indivisible_batch_is_an_error(tiny, reference):
    batch, _ = reference
    mesh = sharding.make_mesh(data=4, fsdp=1, tensor=2)
    odd = {k: v[:6] for k, v in batch.items()}
    with pytest.raises(
        ValueError, match=r"batch\['input_ids'\] has 6 rows, which does not divide the 4 devices"
    ):
        step_lib.check_batch_rows({k: v.shape[0] for k, v in odd.items()}, mesh)


def test_optimizer_state_is_born_sharded_like_params(tiny):
    path, config = tiny
    mesh = sharding.make_mesh(1, 4, 2)
    model_def = ModelDef.create(config, dtype=jnp.float32)
    params = state_lib.load_params(path, model_def, mesh)
    for freeze in (False, True):
        tx = state_lib.make_optimizer(optim_cfg(freeze_vision_tower=freeze), total_steps=10, params=params)
        state, _ = state_lib.create_train_state(params, tx, model_def, mesh)
        kernels = [
            leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
            if "up_proj" in jax.tree_util.keystr(p) and "layers" in jax.tree_util.keystr(p) and leaf.ndim == 2
        ]
        assert kernels, "no Adam moments found for the decoder MLP"
        for leaf in kernels:
            assert leaf.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_resume_after_step_3_equals_uninterrupted_run(tiny, reference, tmp_path):
    """Checkpoint after step 3, drop everything, restore into fresh shardings, run to step 6: the
    parameters are bit-identical to six uninterrupted steps (AdamW state and step count included)."""
    from pr1.train.checkpoint import Checkpointer

    path, config = tiny
    batch, _ = reference
    mesh = sharding.make_mesh(1, 4, 2)
    model_def = ModelDef.create(config, dtype=jnp.float32)
    cfg = step_lib.learner_config()
    full = dict(batch, old_logprobs=np.where(batch["loss_mask"] == 1, -5.0, 0.0).astype(np.float32))

    def fresh():
        params = state_lib.load_params(path, model_def, mesh)
        tx = state_lib.make_optimizer(optim_cfg(warmup_ratio=0.2), total_steps=6, params=params)
        state, shardings = state_lib.create_train_state(params, tx, model_def, mesh)
        return state, shardings, step_lib.make_update_step(model_def, tx, cfg, shardings, mesh)

    state, _, update = fresh()
    for _ in range(6):
        state, _ = update(state, full)
    uninterrupted = jax.device_get(state.params)

    state, shardings, update = fresh()
    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        for i in range(3):
            state, _ = update(state, full)
        ckpt.save(3, state, {"data": {"epoch": 0, "index": 3}})
        ckpt.wait()
    del state

    _, shardings, update = fresh()
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(lambda: fresh()[0]),
        shardings,
    )
    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        assert ckpt.latest_step() == 3
        state, host = ckpt.restore(abstract)
    assert host == {"data": {"epoch": 0, "index": 3}} and int(state.step) == 3
    for _ in range(3):
        state, _ = update(state, full)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), uninterrupted)
