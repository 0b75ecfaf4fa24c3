"""Qwen2.5-VL as a Flax NNX module: the vision tower feeding a Qwen2 decoder with multimodal RoPE.

`Qwen25VL.__call__` is the one forward used by rollouts (prefill and cached decode) and the learner
(full-sequence logprobs). Image features replace the `<|image_pad|>` embeddings in order of
appearance, row by row through the batch. Position ids are always given (computed on the host by
`pr1.models.rope.rope_index`), so the forward is a pure function of its array arguments.

Attention goes through `pr1.models.attention` (`config.attention` picks the implementation), with
segment ids (-1 = padding) instead of a dense mask, so no [B, heads, T, T] array exists unless the
'xla' implementation is chosen.

KV cache: a dict of arrays `{"k", "v"}` shaped [layers, B, S, kv_heads, head_dim] made by
`init_cache`. With a cache, the new keys/values are written in place (dynamic_update_slice into the
stacked array, so a donated or loop-carried buffer is updated without a copy) at slots `cache_index
... cache_index + T`, and `attention_mask` is the [B, S] validity mask of all slots (0 for left
padding and unwritten slots); a query at slot p sees keys at slots <= p that are valid.
The sampler's shared-prompt decoding (`prefill_kv`, `decode_step`) lives in `pr1.models.decode`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pr1.models.attention import attention
from pr1.models.config import Qwen25VLConfig, TextConfig
from pr1.models.layers import Embed, Linear, RMSNorm, activation, apply_rotary, rematerialized
from pr1.models.rope import mrope_cos_sin
from pr1.models.vision import VisionTower, vision_layout


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs, attention: str = "auto"):
        d, h, kvh = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, d
        self.attention = attention
        self.q_proj = Linear(
            cfg.hidden_size, h * d, use_bias=True, axes=("embed", "q_heads"), dtype=dtype, rngs=rngs
        )
        self.k_proj = Linear(
            cfg.hidden_size, kvh * d, use_bias=True, axes=("embed", "kv_heads"), dtype=dtype, rngs=rngs
        )
        self.v_proj = Linear(
            cfg.hidden_size, kvh * d, use_bias=True, axes=("embed", "kv_heads"), dtype=dtype, rngs=rngs
        )
        self.o_proj = Linear(
            h * d, cfg.hidden_size, use_bias=False, axes=("q_heads", "embed"), dtype=dtype, rngs=rngs
        )

    def project(self, x, cos, sin):
        """Rotated q [B, T, H, D] and k, v [B, T, KVH, D] of x."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        # The reference casts cos/sin to the activation dtype before rotating (matters in bf16).
        c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
        return apply_rotary(q, c, s), apply_rotary(k, c, s), v

    def __call__(self, x, cos, sin, mask, layer_cache=None, cache_index=None):
        """`mask`: (q_segment_ids, kv_segment_ids) with -1 = padding. `layer_cache`: (k_all, v_all,
        layer) — the stacked cache arrays, updated in place at this layer's slots."""
        b, t, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        q_seg, kv_seg = mask
        new_cache, offset = None, 0
        if layer_cache is not None:
            k_all, v_all, i = layer_cache
            k_all = jax.lax.dynamic_update_slice(
                k_all, k.astype(k_all.dtype)[None], (i, 0, cache_index, 0, 0)
            )
            v_all = jax.lax.dynamic_update_slice(
                v_all, v.astype(v_all.dtype)[None], (i, 0, cache_index, 0, 0)
            )
            k, v, new_cache, offset = k_all[i], v_all[i], (k_all, v_all), cache_index
        out = attention(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            causal=True,
            q_segment_ids=q_seg,
            kv_segment_ids=kv_seg,
            q_offset=offset,
            implementation=self.attention,
            # Without a cache a row is left-padded prompt + right-padded response: one real run.
            contiguous=layer_cache is None,
        )
        return self.o_proj(out.reshape(b, t, -1)), new_cache


class MLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = Linear(
            cfg.hidden_size,
            cfg.intermediate_size,
            use_bias=False,
            axes=("embed", "mlp"),
            dtype=dtype,
            rngs=rngs,
        )
        self.up_proj = Linear(
            cfg.hidden_size,
            cfg.intermediate_size,
            use_bias=False,
            axes=("embed", "mlp"),
            dtype=dtype,
            rngs=rngs,
        )
        self.down_proj = Linear(
            cfg.intermediate_size,
            cfg.hidden_size,
            use_bias=False,
            axes=("mlp", "embed"),
            dtype=dtype,
            rngs=rngs,
        )
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs, attention: str = "auto"):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed", dtype=dtype)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed", dtype=dtype
        )
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs, attention=attention)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, layer_cache=None, cache_index=None):
        h, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, layer_cache, cache_index)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), new_cache


class Qwen25VL(nnx.Module):
    """Qwen2.5-VL for conditional generation. `dtype` is the parameter and activation dtype."""

    def __init__(self, config: Qwen25VLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        t = config.text
        self.config = config
        self.dtype = dtype
        self.visual = VisionTower(config.vision, dtype=dtype, rngs=rngs, attention=config.attention)
        self.embed_tokens = Embed(t.vocab_size, t.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [
                DecoderLayer(t, dtype=dtype, rngs=rngs, attention=config.attention)
                for _ in range(t.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, axis_name="embed", dtype=dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(
                t.hidden_size, t.vocab_size, use_bias=False, axes=("embed", "vocab"), dtype=dtype, rngs=rngs
            )
        )

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

    def embed(
        self,
        input_ids,
        pixel_values=None,
        image_grid_thw=None,
        vision_layout_arrays=None,
        remat_policy=None,
        image_mask=None,
    ):
        """Token embeddings with the image features put in place of the image-pad tokens."""
        emb = self.embed_tokens(input_ids)
        if pixel_values is None:
            return emb
        if vision_layout_arrays is None:
            if image_grid_thw is None or isinstance(image_grid_thw, jax.core.Tracer):
                raise ValueError(
                    "with pixel_values, pass image_grid_thw as a concrete array, or the "
                    "precomputed vision_layout_arrays when calling under jit"
                )
            grid = np.asarray(image_grid_thw)
            n_feats = int((grid.prod(-1) // self.config.vision.spatial_merge_size**2).sum())
            if not isinstance(input_ids, jax.core.Tracer):
                n_tokens = int((np.asarray(input_ids) == self.config.image_token_id).sum())
                if n_tokens != n_feats:
                    raise ValueError(
                        f"the prompt holds {n_tokens} image-pad tokens but image_grid_thw "
                        f"describes {n_feats} image features"
                    )
            vision_layout_arrays = vision_layout(grid, self.config.vision)
        mask = (
            input_ids == self.config.image_token_id if image_mask is None else jnp.asarray(image_mask, bool)
        )
        if pixel_values.ndim == 3:
            return self._embed_rows(emb, mask, pixel_values, vision_layout_arrays, remat_policy)
        feats = self.visual(pixel_values, vision_layout_arrays, remat_policy).astype(emb.dtype)
        flat_mask = mask.reshape(-1)
        idx = jnp.clip(jnp.cumsum(flat_mask) - 1, 0, feats.shape[0] - 1)
        flat = jnp.where(flat_mask[:, None], feats[idx], emb.reshape(-1, emb.shape[-1]))
        return flat.reshape(emb.shape)

    def _embed_rows(self, emb, mask, pixel_values, layout, remat_policy=None):
        """Per-row images ([B, S, C·T·P·P] from `vision.batched_vision_inputs`): row b's features go to
        row b's image-pad tokens, so rows can be split into micro-batches or sharded independently."""
        if layout is None:
            raise ValueError(
                "per-row pixel_values [B, S, D] need vision_layout_arrays from batched_vision_inputs"
            )
        feats = self.visual(pixel_values, layout, remat_policy).astype(emb.dtype)  # [B, S / merge², dim]
        idx = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, feats.shape[1] - 1)
        gathered = jnp.take_along_axis(feats, idx[..., None], axis=1)
        return jnp.where(mask[..., None], gathered, emb)

    def __call__(
        self,
        input_ids,
        *,
        position_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        vision_layout_arrays=None,
        cache=None,
        cache_index=None,
        return_hidden=False,
        remat_policy=None,
        image_mask=None,
    ):
        """Logits [B, T, vocab]; with `cache`, returns (logits, new_cache).

        input_ids [B, T]; position_ids [3, B, T] (or [B, T] for text-only); attention_mask [B, T]
        (1 = real token, one contiguous run per row: padding only before and after it, which the
        cudnn attention turns into sequence lengths) without a cache, [B, S] over cache slots with
        one. `remat_policy` (a jax.checkpoint policy, or `remat_everything`) rematerializes each
        decoder layer and vision block in the backward pass, so training keeps one residual per
        layer instead of all of a layer's activations. `image_mask` [B, T] (default: every image-pad
        token) says which positions
        take image features: the learner limits it to the prompt, since a response may sample the
        image-pad token and the sampler embedded that as a plain token.
        """
        t = self.config.text
        b, length = input_ids.shape
        x = self.embed(
            input_ids,
            pixel_values,
            image_grid_thw,
            vision_layout_arrays,
            remat_policy=remat_policy,
            image_mask=image_mask,
        )
        position_ids = jnp.asarray(position_ids)
        if position_ids.ndim == 2:
            position_ids = jnp.broadcast_to(position_ids[None], (3,) + position_ids.shape)
        cos, sin = mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section)

        if cache is None:
            seg = (
                jnp.zeros((b, length), jnp.int32)
                if attention_mask is None
                else jnp.where(jnp.asarray(attention_mask).astype(bool), 0, -1)
            )
            mask = (seg, seg)
        else:
            if cache_index is None or attention_mask is None:
                raise ValueError(
                    "a cached forward needs cache_index and the [B, S] attention_mask over cache slots"
                )
            # Queries are real; a left-padding query sees no valid key at or before its slot (zeros).
            mask = (
                jnp.zeros((b, length), jnp.int32),
                jnp.where(jnp.asarray(attention_mask).astype(bool), 0, -1),
            )

        k_all, v_all = (None, None) if cache is None else (cache["k"], cache["v"])
        for i, layer in enumerate(self.layers):
            if remat_policy is not None and cache is None:
                x, _ = rematerialized(layer, remat_policy)(x, cos, sin, mask)
            elif cache is None:
                x, _ = layer(x, cos, sin, mask)
            else:
                x, (k_all, v_all) = layer(x, cos, sin, mask, (k_all, v_all, i), cache_index)
        h = self.norm(x)
        out = h if return_hidden else self.logits(h)
        if cache is None:
            return out
        return out, {"k": k_all, "v": v_all}
