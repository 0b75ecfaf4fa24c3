"""Qwen2.5-VL as a Flax NNX module: the vision tower feeding a Qwen2 decoder with multimodal RoPE.

`Qwen25VL.__call__` is the one forward used by rollouts (prefill and cached decode) and the learner
(full-sequence logprobs). Image features replace the `<|image_pad|>` embeddings in order of
appearance, row by row through the batch. Position ids are always given (computed on the host by
`pr1.models.rope.rope_index`), so the forward is a pure function of its array arguments.

KV cache: a dict of arrays `{"k", "v"}` shaped [layers, B, S, kv_heads, head_dim] made by
`init_cache`. With a cache, the new keys/values are written at slots `cache_index ...
cache_index + T` and `attention_mask` is the [B, S] validity mask of all slots (0 for left padding
and unwritten slots); a query at slot p sees keys at slots <= p that are valid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pr1.models.config import Qwen25VLConfig, TextConfig
from pr1.models.layers import (Embed, Linear, RMSNorm, activation, apply_rotary, dot_product_attention,
                               rematerialized)
from pr1.models.rope import mrope_cos_sin
from pr1.models.vision import VisionTower, vision_layout


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        d, h, kvh = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, d
        self.q_proj = Linear(cfg.hidden_size, h * d, use_bias=True, axes=("embed", "q_heads"), dtype=dtype, rngs=rngs)
        self.k_proj = Linear(cfg.hidden_size, kvh * d, use_bias=True, axes=("embed", "kv_heads"), dtype=dtype, rngs=rngs)
        self.v_proj = Linear(cfg.hidden_size, kvh * d, use_bias=True, axes=("embed", "kv_heads"), dtype=dtype, rngs=rngs)
        self.o_proj = Linear(h * d, cfg.hidden_size, use_bias=False, axes=("q_heads", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, allowed, layer_cache=None, cache_index=None):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        # The reference casts cos/sin to the activation dtype before rotating (matters in bf16).
        c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
        q, k = apply_rotary(q, c, s), apply_rotary(k, c, s)
        new_cache = None
        if layer_cache is not None:
            ck, cv = layer_cache
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
            k, v, new_cache = ck, cv, (ck, cv)
        out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), allowed)
        return self.o_proj(out.reshape(b, t, -1)), new_cache


class MLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, use_bias=False, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, use_bias=False, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, use_bias=False, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed", dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed", dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, allowed, layer_cache=None, cache_index=None):
        h, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, allowed, layer_cache, cache_index)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), new_cache


class Qwen25VL(nnx.Module):
    """Qwen2.5-VL for conditional generation. `dtype` is the parameter and activation dtype."""

    def __init__(self, config: Qwen25VLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        t = config.text
        self.config = config
        self.dtype = dtype
        self.visual = VisionTower(config.vision, dtype=dtype, rngs=rngs)
        self.embed_tokens = Embed(t.vocab_size, t.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(t, dtype=dtype, rngs=rngs) for _ in range(t.num_hidden_layers)])
        self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, axis_name="embed", dtype=dtype)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            t.hidden_size, t.vocab_size, use_bias=False, axes=("embed", "vocab"), dtype=dtype, rngs=rngs)

    def init_cache(self, batch: int, max_length: int, dtype=None) -> dict:
        t = self.config.text
        shape = (t.num_hidden_layers, batch, max_length, t.num_key_value_heads, t.head_dim)
        dtype = dtype or self.dtype
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def logits(self, h):
        """The LM-head projection of hidden states, accumulated and returned in fp32.

        With bf16 compute, bf16 logits would round each logit by up to ~0.03 at typical magnitudes;
        the learner and the sampler both project here, so their logprobs agree and on-policy
        importance ratios stay 1.
        """
        w = self.embed_tokens.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]
        return jnp.matmul(h, w, preferred_element_type=jnp.float32)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, vision_layout_arrays=None, remat_policy=None,
              image_mask=None):
        """Token embeddings with the image features put in place of the image-pad tokens."""
        emb = self.embed_tokens(input_ids)
        if pixel_values is None:
            return emb
        if vision_layout_arrays is None:
            if image_grid_thw is None or isinstance(image_grid_thw, jax.core.Tracer):
                raise ValueError("with pixel_values, pass image_grid_thw as a concrete array, or the "
                                 "precomputed vision_layout_arrays when calling under jit")
            grid = np.asarray(image_grid_thw)
            n_feats = int((grid.prod(-1) // self.config.vision.spatial_merge_size ** 2).sum())
            if not isinstance(input_ids, jax.core.Tracer):
                n_tokens = int((np.asarray(input_ids) == self.config.image_token_id).sum())
                if n_tokens != n_feats:
                    raise ValueError(f"the prompt holds {n_tokens} image-pad tokens but image_grid_thw "
                                     f"describes {n_feats} image features")
            vision_layout_arrays = vision_layout(grid, self.config.vision)
        mask = input_ids == self.config.image_token_id if image_mask is None else jnp.asarray(image_mask, bool)
        if pixel_values.ndim == 3:
            return self._embed_rows(emb, mask, pixel_values, vision_layout_arrays, remat_policy)
        feats = self.visual(pixel_values, vision_layout_arrays, remat_policy).astype(emb.dtype)
        flat_mask = mask.reshape(-1)
        idx = jnp.clip(jnp.cumsum(flat_mask) - 1, 0, feats.shape[0] - 1)
        flat = jnp.where(flat_mask[:, None], feats[idx], emb.reshape(-1, emb.shape[-1]))
        return flat.reshape(emb.shape)

    def _embed_rows(self, emb, mask, pixel_values, layout, remat_policy=None):
        """Per-row images ([B, P, C·T·P·P] from `vision.batched_vision_inputs`): row b's features go to
        row b's image-pad tokens, so rows can be split into micro-batches or sharded independently."""
        if layout is None:
            raise ValueError("per-row pixel_values [B, P, D] need vision_layout_arrays from batched_vision_inputs")
        b, p, _ = pixel_values.shape
        # Segment ids are made unique per row so one dense vision pass serves the whole batch.
        offset = (jnp.arange(b, dtype=jnp.int32) * p)[:, None]
        shift = lambda ids: jnp.where(ids >= 0, ids + offset, -1).reshape(-1)
        flat_layout = {"hw_position_ids": layout["hw_position_ids"].reshape(-1, 2),
                       "frame_ids": shift(layout["frame_ids"]), "window_ids": shift(layout["window_ids"])}
        feats = self.visual(pixel_values.reshape(b * p, -1), flat_layout, remat_policy).astype(emb.dtype)
        feats = feats.reshape(b, -1, feats.shape[-1])
        idx = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, feats.shape[1] - 1)
        gathered = jnp.take_along_axis(feats, idx[..., None], axis=1)
        return jnp.where(mask[..., None], gathered, emb)

    def __call__(self, input_ids, *, position_ids, attention_mask=None, pixel_values=None,
                 image_grid_thw=None, vision_layout_arrays=None, cache=None, cache_index=None,
                 return_hidden=False, remat_policy=None, image_mask=None):
        """Logits [B, T, vocab]; with `cache`, returns (logits, new_cache).

        input_ids [B, T]; position_ids [3, B, T] (or [B, T] for text-only); attention_mask [B, T]
        (1 = real token) without a cache, [B, S] over cache slots with one. `remat_policy` (a
        jax.checkpoint policy, or `remat_everything`) rematerializes each decoder layer and vision
        block in the backward pass, so training keeps one residual per layer instead of all of a
        layer's activations. `image_mask` [B, T] (default: every image-pad token) says which positions
        take image features: the learner limits it to the prompt, since a response may sample the
        image-pad token and the sampler embedded that as a plain token.
        """
        t = self.config.text
        b, length = input_ids.shape
        x = self.embed(input_ids, pixel_values, image_grid_thw, vision_layout_arrays, remat_policy=remat_policy,
                       image_mask=image_mask)
        position_ids = jnp.asarray(position_ids)
        if position_ids.ndim == 2:
            position_ids = jnp.broadcast_to(position_ids[None], (3,) + position_ids.shape)
        cos, sin = mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section)

        if cache is None:
            key_valid = jnp.ones((b, length), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
            causal = jnp.tril(jnp.ones((length, length), bool))
            allowed = causal[None] & key_valid[:, None, :]
        else:
            if cache_index is None or attention_mask is None:
                raise ValueError("a cached forward needs cache_index and the [B, S] attention_mask over cache slots")
            slots = cache["k"].shape[2]
            q_slot = cache_index + jnp.arange(length)
            allowed = (jnp.arange(slots)[None, :] <= q_slot[:, None])[None] & jnp.asarray(attention_mask).astype(bool)[:, None, :]

        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache["k"][i], cache["v"][i])
            if remat_policy is not None and cache is None:
                x, lc = rematerialized(layer, remat_policy)(x, cos, sin, allowed)
            else:
                x, lc = layer(x, cos, sin, allowed, layer_cache, cache_index)
            if lc is not None:
                new_k.append(lc[0])
                new_v.append(lc[1])
        h = self.norm(x)
        out = h if return_hidden else self.logits(h)
        if cache is None:
            return out
        return out, {"k": jnp.stack(new_k), "v": jnp.stack(new_v)}
