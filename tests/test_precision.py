"""Training as the release does: fp32 master weights and moments, bf16 compute, the release's loss scope.

The recipe's numbers on the tiny model: lr 1e-6 on sigma=0.02 weights. In bf16 such an update is far
below one ulp (2^-8 relative), so bf16 masters never change; fp32 masters must, and must change the
way optax's AdamW on fp32 params moves them given the gradients of the bf16-compute loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pr1 import sharding
from pr1.models.config import Qwen25VLConfig
from pr1.models.model_def import ModelDef
from pr1.models.tiny import write_tiny_checkpoint
from pr1.models.vision import LAYOUT_KEYS
from pr1.rl import grpo
from pr1.train import state as state_lib
from pr1.train import step as step_lib
from pr1.train.checkpoint import Checkpointer
from tests.test_learner import SGD, make_batch, run_update

B = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("precision") / "ckpt", seed=5)
    return path, Qwen25VLConfig.from_dir(path)


@pytest.fixture(scope="module")
def batch(tiny):
    """Responses that use every regular token of the tiny vocabulary (0..499), so every row of the
    untied input embedding gets a gradient: only never-seen special-token rows may stay put."""
    path, config = tiny
    tokens = np.resize(np.random.default_rng(3).permutation(500), B * 64).reshape(B, 64)
    return make_batch(path, config, seed=2, responses=tokens)


def recipe_optim():
    cfg = state_lib.optimizer_config()  # the recipe's AdamW: lr 1e-6, betas (0.9, 0.999), wd 1e-3
    cfg.warmup_ratio = 0.0  # the recipe warms up from lr 0; the first update must move something
    return cfg


def single_mesh():
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def setup(tiny, batch, mesh, param_dtype=jnp.float32, compute_dtype=jnp.bfloat16, learner=None):
    path, config = tiny
    model_def = ModelDef.create(config, dtype=param_dtype, compute_dtype=compute_dtype)
    params = state_lib.load_params(path, model_def, mesh)
    cfg = step_lib.learner_config()
    cfg.update(learner or {})
    old = step_lib.make_logprob_step(model_def, cfg, model_def.param_shardings(mesh), mesh)(params, batch)
    full = dict(batch, old_logprobs=np.asarray(old))
    tx = state_lib.make_optimizer(recipe_optim(), total_steps=275, params=params)
    state, shardings = state_lib.create_train_state(params, tx, model_def, mesh)
    update = step_lib.make_update_step(model_def, tx, cfg, shardings, mesh)
    return model_def, params, full, state, update


def changed_fraction(new, old):
    pairs = zip(jax.tree.leaves(jax.device_get(new)), jax.tree.leaves(jax.device_get(old)))
    changed = total = 0
    for a, b in pairs:
        changed += int((np.asarray(a) != np.asarray(b)).sum())
        total += a.size
    return changed / total


def test_one_recipe_update_moves_fp32_masters_as_optax_does(tiny, batch):
    mesh = single_mesh()
    model_def, params, full, state, update = setup(tiny, batch, mesh)
    before = jax.device_get(params)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(before))
    new, metrics = update(state, full)
    assert bool(metrics["finite"])
    new_params = jax.device_get(new.params)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(new_params))
    assert changed_fraction(new_params, before) > 0.99

    # Independent reference: optax's own AdamW on the fp32 params, with the gradient of the GRPO loss
    # of a bf16 forward written here from the public model call (logits -> token logprobs -> loss).
    ids = jnp.asarray(full["input_ids"])

    def loss(p):
        model = model_def.bind(jax.tree.map(lambda x: x.astype(jnp.bfloat16), p))
        layout = {k: full[k] for k in LAYOUT_KEYS}
        logits = model(
            ids,
            position_ids=jnp.swapaxes(full["position_ids"], 0, 1),
            attention_mask=full["attention_mask"],
            pixel_values=full["pixel_values"],
            vision_layout_arrays=layout,
        )
        logp = jnp.pad(grpo.token_logprobs(logits[:, :-1], ids[:, 1:]), ((0, 0), (1, 0)))
        return grpo.grpo_loss(
            logp,
            full["old_logprobs"],
            full["advantages"],
            full["loss_mask"],
            clip_low=0.2,
            clip_high=0.3,
            dual_clip=3.0,
            loss_agg="token-mean",
        )[0]

    grads = jax.jit(jax.grad(loss))(params)
    o = recipe_optim()
    ref_tx = optax.chain(
        optax.clip_by_global_norm(o.max_grad_norm),
        optax.adamw(o.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
    )
    ref = jax.device_get(optax.apply_updates(params, ref_tx.update(grads, ref_tx.init(params), params)[0]))
    # Adam's first step is lr * g / (|g| + eps) ~ +-1e-6 per element: compare the updates themselves.
    # Two bf16 forwards of different program structure round differently, so an element whose
    # gradient is ~eps may flip; allow 0.1% of elements to differ by up to the 2e-6 such a flip costs.
    got = np.concatenate(
        [(a - b).ravel() for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(before))]
    )
    want = np.concatenate([(a - b).ravel() for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(before))])
    close = np.abs(got - want) <= 1e-8 + 0.01 * np.abs(want)
    assert close.mean() > 0.999, f"{(~close).sum()} of {close.size} updates differ from optax's"
    assert np.abs(got - want).max() <= 2.1e-6
    assert np.abs(got).max() > 5e-7  # a real step of ~lr, not a no-op that matches a no-op


def test_bf16_masters_lose_the_recipe_update(tiny, batch):
    """Why masters are fp32: the same update on bf16 params leaves almost every element unchanged."""
    mesh = single_mesh()
    _, params, full, state, update = setup(tiny, batch, mesh, param_dtype=jnp.bfloat16)
    new, _ = update(state, full)
    assert changed_fraction(new.params, params) < 0.5


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_optimizer_state_keeps_fp32_dtypes_and_update_compiles_once(tiny, batch, param_dtype):
    mesh = single_mesh()
    _, _, full, state, update = setup(tiny, batch, mesh, param_dtype=param_dtype)
    dtypes = lambda s: [str(x.dtype) for x in jax.tree.leaves(s.opt_state)]  # noqa: E731
    first = dtypes(state)
    floats = [d for d in first if d.startswith(("float", "bfloat"))]
    assert floats and all(d == "float32" for d in floats), first
    for _ in range(3):
        state, _ = update(state, full)
        assert dtypes(state) == first
        assert all(x.dtype == param_dtype for x in jax.tree.leaves(state.params))
    assert update._cache_size() == 1


def test_bf16_compute_resume_is_bit_identical(tiny, batch, tmp_path):
    """Killed after step 3 (its checkpoint is all that survives), restored into fresh shardings,
    run to step 6: master params AND moments equal six uninterrupted steps bit for bit."""
    mesh = sharding.make_mesh(1, 4, 2)
    _, _, full, state, update = setup(tiny, batch, mesh)
    for _ in range(6):
        state, _ = update(state, full)
    uninterrupted = jax.device_get((state.params, state.opt_state))

    _, _, _, state, update = setup(tiny, batch, mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        for _ in range(3):
            state, _ = update(state, full)
        ckpt.save(3, state, {"step": 3})
        ckpt.wait()
    del state
    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        state, _ = ckpt.restore(abstract)
        assert ckpt.upcast == []
    for _ in range(3):
        state, _ = update(state, full)
    resumed = jax.device_get((state.params, state.opt_state))
    assert jax.tree.structure(resumed) == jax.tree.structure(uninterrupted)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_old_bf16_checkpoint_is_upcast_and_fp32_into_bf16_is_refused(tmp_path):
    mesh = single_mesh()
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    values = np.random.default_rng(0).standard_normal(8).astype(np.float32)
    old = {"params": {"w": jax.device_put(jnp.asarray(values, jnp.bfloat16), sh)}, "step": jnp.int32(3)}
    with Checkpointer(str(tmp_path / "old")) as ckpt:
        ckpt.save(3, old, {})
        ckpt.wait()
    want = {
        "params": {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sh)},
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sh),
    }
    with Checkpointer(str(tmp_path / "old")) as ckpt:
        state, _ = ckpt.restore(want)
        assert ckpt.upcast == ["params/w"]
    assert state["params"]["w"].dtype == jnp.float32
    np.testing.assert_array_equal(
        np.asarray(state["params"]["w"]), np.asarray(old["params"]["w"], np.float32)
    )

    new = {"params": {"w": jax.device_put(jnp.asarray(values), sh)}, "step": jnp.int32(3)}
    with Checkpointer(str(tmp_path / "new")) as ckpt:
        ckpt.save(3, new, {})
        ckpt.wait()
    narrow = {
        "params": {"w": jax.ShapeDtypeStruct((8,), jnp.bfloat16, sharding=sh)},
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sh),
    }
    with Checkpointer(str(tmp_path / "new")) as ckpt:
        with pytest.raises(
            ValueError, match=r"params/w is stored as float32 but this run keeps it as bfloat16"
        ):
            ckpt.restore(narrow)


def _np_chunk_loss(new_logp, old_logp, adv, mask, chunk):
    """The release's scope from its definition: a token-mean per chunk of `chunk` responses, then the mean."""
    r = np.exp(new_logp - old_logp)
    a = np.repeat(adv[:, None], r.shape[1], 1)
    tok = np.maximum(-a * r, -a * np.clip(r, 0.8, 1.3))
    tok = np.where(a < 0, np.minimum(tok, -a * 3.0), tok)
    m = mask.astype(bool)
    means = [
        np.where(m[i : i + chunk], tok[i : i + chunk], 0).sum() / m[i : i + chunk].sum()
        for i in range(0, len(m), chunk)
        if m[i : i + chunk].any()
    ]
    return np.mean(means)


def test_release_loss_scope_is_independent_of_mesh_and_micro_batches(tiny):
    """chunk-token-mean with chunks of 2 responses: the same loss and update on one device, on 8, and
    in 4 micro-batches (whose strided rows cut across the chunks), and the loss equals its definition."""
    path, config = tiny
    batch = make_batch(path, config)
    learner = dict(loss_agg="chunk-token-mean", loss_chunk_responses=2)
    one = run_update(path, config, batch, single_mesh(), tx=SGD, **learner)
    params, metrics, old_clean = one
    noisy = (
        old_clean
        + np.random.default_rng(1).normal(0, 1.2, old_clean.shape).astype(np.float32) * batch["loss_mask"]
    )
    want = _np_chunk_loss(old_clean, noisy, batch["advantages"], batch["loss_mask"], 2)
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    token_mean = run_update(path, config, batch, single_mesh(), tx=SGD)[1]["loss"]
    assert abs(float(token_mean) - float(want)) > 1e-3  # the two scopes really differ on this batch
    for mesh, k in ((sharding.make_mesh(8, 1, 1), 1), (single_mesh(), 4), (sharding.make_mesh(2, 2, 2), 2)):
        p, m, _ = run_update(path, config, batch, mesh, micro_batches=k, tx=SGD, **learner)
        np.testing.assert_allclose(m["loss"], metrics["loss"], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p, params)
