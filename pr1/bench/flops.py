"""FLOP counts of Qwen2.5-VL and a measured matmul peak, the two halves of every MFU figure.

Convention (PaLM, appendix B): a forward pass costs 2 FLOPs per weight-matmul parameter per token
plus 4·T·heads·head_dim per token per layer for attention (QKᵀ and AV over the full context T,
causality not discounted); a training step costs 3x its forward. Embedding lookups, norms, rotary
and softmax are not counted. The vision tower counts each patch against its attention segment
(window or whole image) only, which is the useful work; our dense masked kernel does more.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pr1.models.config import Qwen25VLConfig


def text_matmul_params(config: Qwen25VLConfig) -> int:
    """Weight-matmul parameters a text token goes through (decoder layers and the LM head)."""
    t = config.text
    q = t.num_attention_heads * t.head_dim
    kv = t.num_key_value_heads * t.head_dim
    per_layer = t.hidden_size * (q + 2 * kv) + q * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
    return t.num_hidden_layers * per_layer + t.hidden_size * t.vocab_size


def vision_matmul_params_per_patch(config: Qwen25VLConfig) -> float:
    """Weight-matmul parameters per input patch: patch embed, blocks, and the merger's share."""
    v = config.vision
    patch_in = v.in_channels * v.temporal_patch_size * v.patch_size**2
    block = 4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size
    merged = v.hidden_size * v.spatial_merge_size**2
    merger = (merged * merged + merged * v.out_hidden_size) / v.spatial_merge_size**2
    return patch_in * v.hidden_size + v.depth * block + merger


def forward_flops(
    config: Qwen25VLConfig, seq_lengths, image_patches=(), window_patches: int | None = None
) -> float:
    """Forward FLOPs of sequences of `seq_lengths` tokens and images of `image_patches` patches each."""
    t, v = config.text, config.vision
    flops = 0.0
    for length in seq_lengths:
        flops += 2 * text_matmul_params(config) * length
        flops += t.num_hidden_layers * 4 * length * length * t.num_attention_heads * t.head_dim
    window = window_patches or (v.window_size // v.patch_size) ** 2
    full = len(v.fullatt_block_indexes)
    for patches in image_patches:
        flops += 2 * vision_matmul_params_per_patch(config) * patches
        segment = [(patches if i < full else min(window, patches)) for i in range(v.depth)]
        flops += sum(4 * patches * s * v.hidden_size for s in segment)
    return flops


def train_flops(config: Qwen25VLConfig, seq_lengths, image_patches=()) -> float:
    """A training step (forward + backward) of the same sequences: 3x the forward."""
    return 3 * forward_flops(config, seq_lengths, image_patches)


def matmul_peak_probe(devices, dtype, n: int = 2048, repeats: int = 8):
    """A compiled, warmed-up probe: each call runs one chain of `repeats` dependent n x n matmuls in
    `dtype` per device, all devices at once, and returns its achieved FLOP/s.

    The physical bound MFU is quoted against on this machine; the chain amortizes dispatch. Values
    are kept O(1) so bf16 does not overflow. A probe lets a benchmark interleave bound and workload.
    """
    devices = list(devices)
    mesh = Mesh(np.array(devices), ("d",))
    sharding = NamedSharding(mesh, PartitionSpec("d"))
    key = jax.random.key(0)
    a = jax.device_put(jax.random.normal(key, (len(devices), n, n), dtype) / np.sqrt(n), sharding)
    b = jax.device_put(
        jax.random.normal(jax.random.fold_in(key, 1), (len(devices), n, n), dtype) / np.sqrt(n), sharding
    )

    @jax.jit
    def chain(a, b):
        return jax.lax.fori_loop(0, repeats, lambda _, x: jnp.einsum("dij,djk->dik", x, b), a)

    chain(a, b).block_until_ready()
    work = 2 * n**3 * repeats * len(devices)

    def probe() -> float:
        start = time.perf_counter()
        chain(a, b).block_until_ready()
        return work / (time.perf_counter() - start)

    return probe


def measured_matmul_peak(devices, dtype, n: int = 2048, repeats: int = 8, trials: int = 3) -> float:
    """Best achieved FLOP/s of `trials` calls of `matmul_peak_probe`."""
    probe = matmul_peak_probe(devices, dtype, n, repeats)
    return max(probe() for _ in range(trials))
