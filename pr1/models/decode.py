"""Cached decoding for n samples per prompt without n copies of the prompt's keys and values.

The sampler keeps two caches per layer:
  prompt cache   k, v [layers, P, Tp, kv_heads, head_dim]: one per prompt, written once by the prefill
                 (`Qwen25VL.__call__` with a cache of exactly Tp slots, so the prefill attends over the
                 prompt length only);
  response cache k, v [layers, P·n, M, kv_heads, head_dim]: one per sample, written in place at the
                 decode step's slot (dynamic_update_slice into the loop-carried buffer).
A decode query of sample s of prompt p attends to prompt p's keys (read through a [P, n, ...] view of
the queries, never repeated) and to its own response keys, under one softmax
(`attention.shared_prefix_attention`). Rows p·n .. p·n+n-1 are prompt p's samples. With blockwise
attention a step reads only the response-cache blocks that hold filled slots (`attention.DECODE_BLOCK`
slots each), so early steps of a long response do not read the whole cache.
"""

from __future__ import annotations

import jax

from pr1.models import attention as attention_lib
from pr1.models.attention import resolve, shared_prefix_attention
from pr1.models.rope import mrope_cos_sin


def decode_step(
    model, tokens, position_ids, prompt_cache: dict, prompt_segment_ids, response_cache: dict, step, n: int
):
    """One decode step of every sample: final hidden states [P·n, hidden] and the response cache with
    this step's keys/values written at slot `step`.

    tokens [P·n] (the previous step's tokens); position_ids [3, P·n, 1]; prompt_segment_ids [P, Tp]
    (0 real, -1 padding); `step` (traced int32): the response slot this token takes, and the number of
    response slots filled before it.
    """
    t = model.config.text
    x = model.embed_tokens(tokens[:, None])
    cos, sin = mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section)
    # The blockwise path reads only the response blocks with filled slots; the dense one (xla, and the
    # kernels' short-length fallback) reads them all, masked.
    block = attention_lib.DECODE_BLOCK if resolve(model.config.attention) == "blockwise" else None
    k_all, v_all = response_cache["k"], response_cache["v"]
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = attn.project(h, cos, sin)
        k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], (i, 0, step, 0, 0))
        v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], (i, 0, step, 0, 0))
        out = shared_prefix_attention(
            q,
            prompt_cache["k"][i],
            prompt_cache["v"][i],
            prompt_segment_ids,
            k_all[i],
            v_all[i],
            step + 1,  # this step's slot included
            n=n,
            block=block,
        )
        x = x + attn.o_proj(out.reshape(out.shape[0], 1, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.norm(x)[:, 0], {"k": k_all, "v": v_all}
