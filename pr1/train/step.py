"""The learner's jitted steps: micro-batched logprobs and the GRPO update, with explicit shardings.

Batch layout (every array has the sequence axis first, so one rule shards and splits them all):
  input_ids [B, T] int32          prompt (left-padded) + response (right-padded)
  attention_mask [B, T]           1 on real tokens
  position_ids [B, 3, T]          MRoPE rows from `rope_index` (sequence axis first, unlike the model)
  loss_mask [B, T]                1 on response tokens that are trained on; token t is predicted at t-1
  old_logprobs [B, T]             behaviour-policy logprobs at the same positions
  advantages [B]                  one per response (GRPO)
  optional: ref_logprobs [B, T], rollout_logprobs [B, T] (for truncated importance sampling), and
  images from `vision.batched_vision_inputs`: pixel_values [I, P, D], hw_position_ids [I, P, 2],
  frame_ids [I, P], window_ids [I, P], feature_index [I, P / 4], either per row (I = B) or once per
  prompt with image_index [B] (row b uses image entry image_index[b]; `pr1.train.batch`). Shared
  images are not split into micro-batches: every micro-batch gathers its own rows' images on the
  device (`vision.rows_of_images`), so the device holds the same pixels per micro-batch either way.
B is sharded over the ('data', 'fsdp') mesh axes. Micro-batch j takes rows j, j+k, j+2k, ... so every
device keeps working on its own rows, and the token-mean loss is normalized by the whole batch's
token count, which makes k micro-batches exactly one big batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from pr1 import sharding as sharding_lib
from pr1.models.attention import in_mesh
from pr1.models.model_def import ModelDef
from pr1.models.vision import IMAGE_KEYS, LAYOUT_KEYS, rows_of_images
from pr1.rl import grpo
from pr1.train.state import TrainState

_VISION_KEYS = LAYOUT_KEYS
# learner.remat: what the backward pass keeps of each layer (the rest is recomputed).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm that is NaN or inf; the update was not applied."""


def learner_config() -> ml_collections.ConfigDict:
    """The paper's objective: clip 0.2/0.3, dual clip 3, token-mean, no KL, temperature 1."""
    return ml_collections.ConfigDict(
        {
            "clip_low": 0.2,
            "clip_high": 0.3,
            "dual_clip": 3.0,
            # token-mean: one token-mean over the whole mini-batch. chunk-token-mean: the release's scope,
            # the token-mean within each chunk of loss_chunk_responses responses, then the mean over chunks.
            "loss_agg": "token-mean",
            "loss_chunk_responses": 8,
            "kl_coef": 0.0,
            "kl_kind": "k3",
            "tis_cap": ml_collections.config_dict.placeholder(float),
            "temperature": 1.0,
            # Gradient-accumulation micro-batches per mini-batch; 0: derived from the mesh, one response per
            # batch device (data x fsdp) per micro-batch, so a recipe fits any mesh size unchanged.
            "micro_batches": 1,
            # Per-layer rematerialization in the backward pass: none | full (keep only each layer's
            # input) | dots (also keep the weight matmuls' outputs; recompute attention and elementwise).
            "remat": "none",
            # Positions per chunk of the vocab projection + logprob (0: all at once). With a 152k
            # vocabulary the [B, T, V] fp32 logits dominate memory; chunks are recomputed in backward.
            "logprob_chunk": 0,
            "horizon": ml_collections.config_dict.placeholder(
                int
            ),  # Dr.GRPO normalizer (max response length)
        }
    )


def check_learner_config(cfg: ml_collections.ConfigDict) -> None:
    """The learner section's own checks (`validate_config` adds those that span sections); raises
    ValueError('learner.<key>: <why>')."""

    def need(cond: bool, key: str, message: str) -> None:
        if not cond:
            raise ValueError(f"learner.{key}: {message}")

    modes, kinds = grpo.LOSS_AGG_MODES, grpo.KL_KINDS
    need(cfg.loss_agg in modes, "loss_agg", f"must be one of {modes}, got {cfg.loss_agg!r}")
    need(cfg.kl_kind in kinds, "kl_kind", f"must be one of {kinds}, got {cfg.kl_kind!r}")
    need(
        cfg.kl_coef == 0, "kl_coef", "a KL term needs a reference model, which pr1 does not build yet; use 0"
    )
    need(cfg.clip_low >= 0 and cfg.clip_high >= 0, "clip_low/clip_high", "must be >= 0")
    need(
        cfg.dual_clip is None or cfg.dual_clip > 1, "dual_clip", f"must be > 1 (or None), got {cfg.dual_clip}"
    )
    need(
        cfg.remat in REMAT_POLICIES,
        "remat",
        f"must be one of {sorted(REMAT_POLICIES)}, got {cfg.remat!r}",
    )
    need(
        cfg.micro_batches >= 0,
        "micro_batches",
        f"must be >= 1, or 0 (one response per batch device per micro-batch), got {cfg.micro_batches}",
    )
    if cfg.loss_agg == "chunk-token-mean":
        need(
            isinstance(cfg.loss_chunk_responses, int) and cfg.loss_chunk_responses >= 1,
            "loss_chunk_responses",
            f"must be an int >= 1 for loss_agg='chunk-token-mean', got {cfg.loss_chunk_responses!r}",
        )
    if cfg.loss_agg == "seq-mean-token-sum-norm":
        # Batches are prompt+response padded to a bucket; the Dr.GRPO constant must be the response
        # budget, not that bucket length, or the loss scale would change with the prompt bucket.
        need(
            cfg.horizon is not None,
            "horizon",
            "required by seq-mean-token-sum-norm (e.g. rollout.max_new_tokens)",
        )


def check_batch_rows(rows: dict[str, int], mesh: Mesh) -> None:
    """Every batch array's rows (key -> count) must divide over the batch devices of `mesh`."""
    for key, count in rows.items():
        sharding_lib.batch_sharding(mesh, count, what=f"batch['{key}']")


def shared_images(batch: dict) -> dict:
    """The batch's image arrays stored once per prompt (rows index them by `image_index`), which are
    passed whole to every micro-batch instead of being split by row; {} for per-row images."""
    if "image_index" not in batch:
        return {}
    return {k: batch[k] for k in IMAGE_KEYS if k in batch}


def _row_arrays(batch: dict) -> dict:
    shared = shared_images(batch)
    return {k: v for k, v in batch.items() if k not in shared}


def _split(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] → [k, B/k, ...] with micro-batch j = rows j, j+k, ... (keeps rows on their device)."""
    return jnp.moveaxis(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 1, 0)


def _unsplit(x: jax.Array) -> jax.Array:
    return jnp.moveaxis(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _forward_logprobs(
    model_def: ModelDef,
    params,
    mb: dict,
    temperature: float,
    entropy: bool,
    remat_policy=None,
    chunk: int = 0,
):
    """Per-token logprobs [B, T] (and entropies) of mb's tokens; position 0 is never predicted (0)."""
    # The master params (fp32) are cast to the compute dtype here, inside the program: activations
    # and matmuls run in it, the gradient of the cast returns to the masters in fp32.
    model = model_def.bind(model_def.compute_params(params))
    if "image_index" in mb:  # images stored once per prompt: this micro-batch's rows' images
        mb = dict(mb, **rows_of_images(mb, mb["image_index"]))
    pixel_values = mb.get("pixel_values")
    layout = {k: mb[k] for k in _VISION_KEYS} if pixel_values is not None else None
    # Image features go to the prompt's image-pad tokens only: one the policy sampled in its response
    # was a plain token to the sampler, and must be one here too.
    image_mask = (mb["input_ids"] == model.config.image_token_id) & (mb["loss_mask"] == 0)
    hidden = model(
        mb["input_ids"],
        position_ids=jnp.swapaxes(mb["position_ids"], 0, 1),
        attention_mask=mb["attention_mask"],
        pixel_values=pixel_values,
        vision_layout_arrays=layout,
        return_hidden=True,
        remat_policy=remat_policy,
        image_mask=image_mask,
    )
    head = model.logits  # fp32 accumulation and output, as in the sampler
    targets = mb["input_ids"][:, 1:]

    def logprobs_of(h, tgt):
        logits = head(h)
        return (
            grpo.token_logprobs(logits, tgt, temperature),
            grpo.token_entropy(logits, temperature) if entropy else jnp.zeros(tgt.shape, jnp.float32),
        )

    h = hidden[:, :-1]
    if chunk <= 0 or chunk >= h.shape[1]:
        lp, ent = logprobs_of(h, targets)
    else:
        b, t, d = h.shape
        n = -(-t // chunk)
        pad = n * chunk - t
        hc = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
        tc = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
        # Checkpointed so the backward keeps one chunk's logits at a time, not all of them.
        lp, ent = jax.lax.map(lambda xs: jax.checkpoint(logprobs_of)(*xs), (hc, tc))
        lp, ent = (x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t] for x in (lp, ent))

    def pad0(x):
        return jnp.pad(x, ((0, 0), (1, 0)))

    return pad0(lp), (pad0(ent) if entropy else None)


def micro_batch_count(cfg: ml_collections.ConfigDict, rows: int, mesh: Mesh) -> int:
    """learner.micro_batches, or (0) one response per batch device per micro-batch on `mesh`."""
    if cfg.micro_batches > 0:
        return cfg.micro_batches
    return max(rows // sharding_lib.batch_devices(mesh), 1)


def _check_micro_batches(batch_rows: int, k: int):
    if k < 1 or batch_rows % k:
        raise ValueError(f"learner.micro_batches={k} must divide the batch of {batch_rows} sequences")


def make_logprob_step(model_def: ModelDef, cfg: ml_collections.ConfigDict, param_shardings, mesh: Mesh):
    """jit(params, batch) -> logprobs [B, T] (old or reference policy), in micro-batches.

    One jitted function for every batch shape: jit compiles once per (prompt, patch, response)
    bucket, and the micro-batch count follows the batch's rows at trace time.
    """
    check_learner_config(cfg)

    def step(params, batch):
        check_batch_rows({key: x.shape[0] for key, x in batch.items()}, mesh)
        rows = batch["input_ids"].shape[0]
        k = micro_batch_count(cfg, rows, mesh)
        _check_micro_batches(rows, k)
        shared = shared_images(batch)
        micro = jax.tree.map(lambda x: _split(x, k), _row_arrays(batch))
        lps = jax.lax.map(
            lambda mb: _forward_logprobs(
                model_def, params, dict(mb, **shared), cfg.temperature, False, chunk=cfg.logprob_chunk
            )[0],
            micro,
        )
        return _unsplit(lps)

    # One sharding for every batch key: a pytree prefix of the whole batch dict.
    bsh = sharding_lib.batch_sharding(mesh)
    return jax.jit(in_mesh(step, mesh), in_shardings=(param_shardings, bsh), out_shardings=bsh)


def _reduce_metrics(metrics: dict, tokens: jax.Array) -> dict:
    """Combine per-micro-batch metrics: loss terms add up (global normalizers), extremes take the
    extreme, the rest are token means weighted by each micro-batch's token count."""
    out = {}
    weight = tokens / jnp.maximum(tokens.sum(), 1.0)
    for name, value in metrics.items():
        if name in ("loss", "pg_loss", "kl_loss"):
            out[name] = value.sum()
        elif name.endswith("/max") or name.endswith("_max"):
            # A micro-batch without tokens reports 0 for its extremes; it must not win.
            out[name] = jnp.where(tokens > 0, value, -jnp.inf).max()
        elif name.endswith("/min"):
            out[name] = jnp.where(tokens > 0, value, jnp.inf).min()
        else:
            out[name] = (value * weight).sum()
    return out


def make_update_step(
    model_def: ModelDef,
    tx: optax.GradientTransformation,
    cfg: ml_collections.ConfigDict,
    shardings: TrainState,
    mesh: Mesh,
):
    """jit(state, batch) -> (state, metrics): k micro-batches of gradient accumulation, one optimizer step.

    A non-finite loss or gradient norm leaves the state unchanged (metrics say so; `check_finite`
    turns that into an error on the host). The input state's buffers are donated. One jitted
    function for every batch shape, as in `make_logprob_step`.
    """
    check_learner_config(cfg)
    policy = REMAT_POLICIES[cfg.remat]

    def micro_loss(params, mb, num_tokens, num_sequences):
        # chunk-token-mean's per-row weights were computed on the whole mini-batch and split with the rows.
        logp, ent = _forward_logprobs(model_def, params, mb, cfg.temperature, True, policy, cfg.logprob_chunk)
        return grpo.grpo_loss(
            logp,
            mb["old_logprobs"],
            mb["advantages"],
            mb["loss_mask"],
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip,
            loss_agg=cfg.loss_agg,
            ref_logprobs=mb.get("ref_logprobs"),
            kl_coef=cfg.kl_coef,
            kl_kind=cfg.kl_kind,
            rollout_logprobs=mb.get("rollout_logprobs"),
            tis_cap=cfg.tis_cap,
            entropy=jax.lax.stop_gradient(ent),
            num_tokens=num_tokens,
            num_sequences=num_sequences,
            horizon=cfg.horizon,
            row_weights=mb.get("loss_weights"),
        )

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch: dict):
        check_batch_rows({key: x.shape[0] for key, x in batch.items()}, mesh)
        rows = batch["input_ids"].shape[0]
        k = micro_batch_count(cfg, rows, mesh)
        _check_micro_batches(rows, k)
        num_tokens, num_sequences = grpo.loss_normalizers(batch["loss_mask"])
        if cfg.loss_agg == "chunk-token-mean":
            batch = dict(
                batch, loss_weights=grpo.chunk_token_weights(batch["loss_mask"], cfg.loss_chunk_responses)
            )
        shared = shared_images(batch)
        micro = jax.tree.map(lambda x: _split(x, k), _row_arrays(batch))

        def body(acc, mb):
            (_, metrics), grads = grad_fn(state.params, dict(mb, **shared), num_tokens, num_sequences)
            acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
            metrics["_tokens"] = (mb["loss_mask"] != 0).sum().astype(jnp.float32)
            return acc, metrics

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        grads, metrics = jax.lax.scan(body, zeros, micro)
        tokens = metrics.pop("_tokens")
        metrics = _reduce_metrics(metrics, tokens)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics.update(grad_norm=grad_norm, finite=finite, tokens=tokens.sum())
        return new, metrics

    bsh = sharding_lib.batch_sharding(mesh)
    return jax.jit(
        in_mesh(step, mesh), in_shardings=(shardings, bsh), out_shardings=(shardings, None), donate_argnums=0
    )


def check_finite(metrics: dict, step: int) -> None:
    """Raise NonFiniteError if the update step reported a NaN/inf loss or gradient norm."""
    if not bool(metrics["finite"]):
        raise NonFiniteError(
            f"step {step}: loss={float(metrics['loss'])} grad_norm={float(metrics['grad_norm'])} is not "
            "finite; "
            "the update was not applied and no checkpoint was written for it. Check the batch (rewards, "
            "logprobs) and the learning rate; resume from the last good checkpoint."
        )
