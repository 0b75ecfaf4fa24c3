"""Building blocks shared by the vision tower and the decoder: Linear, RMSNorm, embedding, attention.

Every parameter carries `logical_axes` metadata (e.g. ('embed', 'mlp')) instead of a mesh sharding,
so `pr1.sharding` maps them onto any mesh from config rules; nothing here knows about devices.
Parameter names (`kernel`, `bias`, `scale`, `embedding`) are what `pr1.models.hf` maps to and from
the Hugging Face tensor names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pr1.models.rope import rotate_half

_INIT_STD = 0.02


def _normal(rngs: nnx.Rngs, shape, dtype):
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * _INIT_STD).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel stored [in, out] (the transpose of torch's weight)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        axes: tuple[str, str],
        dtype,
        rngs: nnx.Rngs,
    ):
        self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), dtype), logical_axes=axes)
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), dtype), logical_axes=(axes[1],)) if use_bias else None
        )

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class RMSNorm(nnx.Module):
    """RMSNorm as transformers does it: normalize in fp32, cast back, then scale by the weight."""

    def __init__(self, dim: int, *, eps: float, axis_name: str, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype), logical_axes=(axis_name,))
        self.eps = eps

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * x32.astype(x.dtype)


class Embed(nnx.Module):
    def __init__(self, num: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_normal(rngs, (num, dim), dtype), logical_axes=("vocab", "embed"))

    def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, h: jnp.ndarray) -> jnp.ndarray:
        """Logits against the embedding matrix (tied input/output embeddings)."""
        return h @ self.embedding[...].T


def activation(name: str):
    if name == "silu":
        return jax.nn.silu
    if name in ("gelu", "gelu_pytorch_exact"):
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unsupported hidden_act {name!r}")


def rematerialized(module: nnx.Module, policy):
    """`module`'s call under jax.checkpoint: its activations are recomputed in the backward pass.

    The module is split into (graph, state) so the parameters enter the checkpointed function as
    arguments (gradients flow to them) instead of as closed-over constants. `policy` is a
    jax.checkpoint_policies policy saying which intermediates may still be kept.
    """
    graphdef, state = nnx.split(module)

    def run(state, *args):
        return nnx.merge(graphdef, state)(*args)

    checkpointed = jax.checkpoint(run, policy=policy)
    return lambda *args: checkpointed(state, *args)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """NeoX (rotate-half) rotary; x [..., T, heads, D], cos/sin broadcast over heads."""
    return x * cos + rotate_half(x) * sin


def dot_product_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, allowed: jnp.ndarray
) -> jnp.ndarray:
    """Softmax attention as the reference's eager path computes it.

    q [B, Tq, H, D], k/v [B, Tk, KVH, D] (grouped-query: H is a multiple of KVH), allowed
    [B, Tq, Tk] or broadcastable. Scores are formed in the input dtype, the softmax runs in fp32
    (a non-fp32 softmax costs accuracy measurably), probabilities are cast back before the value
    product. A row with nothing allowed (a padding query) yields zeros instead of NaN.
    """
    b, tq, h, d = q.shape
    kvh = k.shape[2]
    groups = h // kvh
    q = q.reshape(b, tq, kvh, groups, d)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k) * jnp.asarray(d**-0.5, q.dtype)
    scores = scores.astype(jnp.float32)
    mask = allowed[:, None, None, :, :]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask, probs, 0.0).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
    return out.reshape(b, tq, h, d)
