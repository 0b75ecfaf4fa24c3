"""The Qwen2.5-VL vision tower: patch embedding, 2D rotary, window/full attention blocks, patch merger.

Patches arrive flattened (rows of C·T·P·P values, already in 2×2 merge-block order, as the
processor emits them). transformers permutes merged units into window order, runs the blocks on
packed variable-length windows and restores the order after the merger; attention inside a window
does not depend on token order, so here every patch keeps its place and a block-diagonal mask built
from segment ids (window id, or image id for the full-attention blocks) gives the same result.
Partial windows at the right and bottom borders simply have fewer members.

The segment ids depend on the image sizes, so `vision_layout` computes them on the host; the jitted
forward takes them as arrays, which keeps every shape static for a given patch count.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from pr1.models.config import VisionConfig
from pr1.models.layers import Linear, RMSNorm, activation, apply_rotary, dot_product_attention, rematerialized
from pr1.models.rope import vision_cos_sin


def vision_layout(grid_thw: np.ndarray, config: VisionConfig) -> dict[str, np.ndarray]:
    """Per-patch metadata for a concatenation of images/frames with grids `[n, 3]` (T, H, W patches).

    Returns `hw_position_ids` [N, 2] (row, column of each patch, in merge-block order),
    `frame_ids` [N] (the segment each full-attention block attends within: one per image frame) and
    `window_ids` [N] (the 112-px window of each patch, numbered globally).
    """
    grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    m = config.spatial_merge_size
    units_per_window = config.window_size // m // config.patch_size
    hw, frames, windows = [], [], []
    frame_base = window_base = 0
    for t, h, w in grid_thw:
        if h % m or w % m:
            raise ValueError(f"image grid {(t, h, w)} is not divisible by spatial_merge_size {m}")
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        # merge-block order: (block row, block col, row within block, col within block)
        order = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        hpos, wpos = order(hh), order(ww)
        n_win_w = -(-(w // m) // units_per_window)
        n_win_h = -(-(h // m) // units_per_window)
        win = (hpos // m // units_per_window) * n_win_w + (wpos // m // units_per_window)
        for f in range(t):
            hw.append(np.stack([hpos, wpos], axis=-1))
            frames.append(np.full(h * w, frame_base + f))
            windows.append(win + window_base + f * n_win_h * n_win_w)
        frame_base += t
        window_base += t * n_win_h * n_win_w
    if not hw:
        return {"hw_position_ids": np.zeros((0, 2), np.int32), "frame_ids": np.zeros((0,), np.int32),
                "window_ids": np.zeros((0,), np.int32)}
    return {
        "hw_position_ids": np.concatenate(hw).astype(np.int32),
        "frame_ids": np.concatenate(frames).astype(np.int32),
        "window_ids": np.concatenate(windows).astype(np.int32),
    }


def batched_vision_inputs(pixel_values: list, grids: list, config: VisionConfig, num_patches: int) -> dict[str, np.ndarray]:
    """Per-row vision inputs padded to `num_patches` patches per sequence, for batches that are split
    into micro-batches or sharded by row (the learner, the sampler).

    `pixel_values[b]` is row b's patches [N_b, C·T·P·P] (all its images concatenated) or None, and
    `grids[b]` its image grids [n_b, 3]. Returns `pixel_values` [B, num_patches, C·T·P·P] and the
    `vision_layout` arrays with a leading batch axis; padding patches get segment id -1, so they never
    attend to (or are attended by) a real patch, and their merged features are never gathered.
    """
    unit = config.spatial_merge_size ** 2
    if num_patches % unit:
        raise ValueError(f"num_patches {num_patches} must be a multiple of {unit} (spatial merge block)")
    b = len(pixel_values)
    out = {
        "pixel_values": np.zeros((b, num_patches, config.patch_dim), np.float32),
        "hw_position_ids": np.zeros((b, num_patches, 2), np.int32),
        "frame_ids": np.full((b, num_patches), -1, np.int32),
        "window_ids": np.full((b, num_patches), -1, np.int32),
    }
    for row, (pix, grid) in enumerate(zip(pixel_values, grids)):
        if pix is None:
            continue
        n = len(pix)
        if n > num_patches:
            raise ValueError(f"row {row} has {n} image patches, more than the bucket's {num_patches}")
        layout = vision_layout(grid, config)
        out["pixel_values"][row, :n] = pix
        for key in ("hw_position_ids", "frame_ids", "window_ids"):
            out[key][row, :n] = layout[key]
    return out


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, use_bias=True, axes=("vit_embed", "vit_qkv"), dtype=dtype, rngs=rngs)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, use_bias=True, axes=("vit_heads", "vit_embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, segment_ids):
        n, dim = x.shape
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        # The reference rotates q and k in fp32 whatever the parameter dtype.
        c, s = cos[:, None, :], sin[:, None, :]
        q = apply_rotary(q.astype(jnp.float32), c, s).astype(x.dtype)
        k = apply_rotary(k.astype(jnp.float32), c, s).astype(x.dtype)
        allowed = (segment_ids[:, None] == segment_ids[None, :])[None]
        out = dot_product_attention(q[None], k[None], v[None], allowed)[0]
        return self.proj(out.reshape(n, dim))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, use_bias=True, axes=("vit_embed", "vit_mlp"), dtype=dtype, rngs=rngs)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, use_bias=True, axes=("vit_embed", "vit_mlp"), dtype=dtype, rngs=rngs)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, use_bias=True, axes=("vit_mlp", "vit_embed"), dtype=dtype, rngs=rngs)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="vit_embed", dtype=dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="vit_embed", dtype=dtype)
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = VisionMLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, segment_ids):
        x = x + self.attn(self.norm1(x), cos, sin, segment_ids)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm per patch, concatenate each 2×2 block, Linear → exact GELU → Linear to the LM width."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="vit_embed", dtype=dtype)
        self.fc1 = Linear(merged, merged, use_bias=True, axes=("vit_merged", "vit_merged_out"), dtype=dtype, rngs=rngs)
        self.fc2 = Linear(merged, cfg.out_hidden_size, use_bias=True, axes=("vit_merged_out", "embed"), dtype=dtype, rngs=rngs)
        self.merged = merged

    def __call__(self, x):
        x = self.ln_q(x).reshape(-1, self.merged)
        # nn.GELU() in the reference is the exact erf form; JAX's default is the tanh approximation.
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class PatchEmbed(nnx.Module):
    """The Conv3d with kernel = stride = (T, P, P) over pre-flattened patches is a single matmul."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.proj = Linear(cfg.patch_dim, cfg.hidden_size, use_bias=False, axes=("vit_patch", "vit_embed"), dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values):
        return self.proj(pixel_values.astype(self.proj.kernel.dtype))


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values, layout: dict, remat_policy=None) -> jnp.ndarray:
        """pixel_values [N, C·T·P·P] → merged image features [N / merge², out_hidden_size].

        `remat_policy`: rematerialize each block in the backward pass (see `layers.rematerialized`).
        """
        x = self.patch_embed(pixel_values)
        cos, sin = vision_cos_sin(jnp.asarray(layout["hw_position_ids"]), self.cfg.head_dim, self.cfg.rope_theta)
        frame_ids, window_ids = jnp.asarray(layout["frame_ids"]), jnp.asarray(layout["window_ids"])
        full = set(self.cfg.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            run = block if remat_policy is None else rematerialized(block, remat_policy)
            x = run(x, cos, sin, frame_ids if i in full else window_ids)
        return self.merger(x)
