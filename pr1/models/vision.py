"""The Qwen2.5-VL vision tower: patch embedding, 2D rotary, window/full attention blocks, patch merger.

Patches arrive flattened (rows of C·T·P·P values, in 2×2 merge-block order, as the processor emits
them). Every image attends only to itself, at a cost linear in the number of images:
- the host (`vision_layout`) puts the patches into *window order*, as transformers does, but with
  every window in a fixed slot of `window_patches` patches (64 for Qwen2.5-VL: 4×4 merge units of
  2×2 patches), padding slots marked -1; a partial window at the right or bottom border simply has
  padding slots;
- the windowed blocks attend densely within each slot ([windows, 64, 64] scores);
- the full-attention blocks attend within each image frame (segment ids) through the attention
  entry point (`pr1.models.attention`: blockwise/splash/cuDNN, no [P, P] array unless 'xla');
- after the merger, `feature_index` gathers the merged features back into token order.
Attention inside a window or a frame does not depend on the order of its patches, and the rotary
positions travel with the patches, so the result equals the reference's.

The layout depends on the image sizes, so it is computed on the host; the jitted forward takes it as
arrays, which keeps every shape static for a given patch-slot count (`patch_bucket`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pr1.models.attention import attention
from pr1.models.config import VisionConfig
from pr1.models.layers import Linear, RMSNorm, activation, apply_rotary, rematerialized
from pr1.models.rope import vision_cos_sin

# The per-row layout arrays that travel with `pixel_values` (see `batched_vision_inputs`).
LAYOUT_KEYS = ("hw_position_ids", "frame_ids", "window_ids", "feature_index")
# All of an image's arrays: per row, or once per prompt with a row -> image index (`rows_of_images`).
IMAGE_KEYS = ("pixel_values",) + LAYOUT_KEYS
PATCH_BUCKET = (
    256  # patch-slot counts above this are padded to a multiple of it (a multiple of window_patches)
)


def window_patches(config: VisionConfig) -> int:
    """Patches in one attention window's slot (64 for Qwen2.5-VL's 112-px windows of 14-px patches)."""
    return (config.window_size // config.patch_size) ** 2


def _windows(t: int, h: int, w: int, config: VisionConfig) -> tuple[int, int]:
    m = config.spatial_merge_size
    upw = config.window_size // m // config.patch_size
    return -(-(h // m) // upw), -(-(w // m) // upw)


def patch_slots(grid_thw, config: VisionConfig) -> int:
    """Patch slots the images of `grid_thw` [n, 3] take in window order (>= their patch count)."""
    if grid_thw is None:
        return 0
    total = 0
    for t, h, w in np.asarray(grid_thw, np.int64).reshape(-1, 3):
        nh, nw = _windows(t, h, w, config)
        total += int(t) * nh * nw * window_patches(config)
    return total


def patch_bucket(slots: int, minimum: int = PATCH_BUCKET, window: int = 64) -> int:
    """The static patch-slot count a batch is padded to: at least `minimum`, a multiple of PATCH_BUCKET
    (not a power of two: 9,216 slots stay 9,216), or of one `window` slot run for small images
    (tests, the debug mode), so a step compiles for a handful of counts without wasting slots."""
    size = max(int(slots), int(minimum), 1)
    step = PATCH_BUCKET if size > PATCH_BUCKET else window
    return -(-size // step) * step


def vision_layout(
    grid_thw: np.ndarray, config: VisionConfig, num_patches: int | None = None
) -> dict[str, np.ndarray]:
    """The window-ordered slot layout of a concatenation of images/frames with grids `[n, 3]` (T, H, W).

    Slots: `num_patches` (default: `patch_slots(grid_thw)`), each window a run of `window_patches`
    slots. Returns per slot `patch_index` (which input patch, -1 padding), `hw_position_ids` [S, 2]
    (row, column), `frame_ids` (the image frame a full-attention block attends within, -1 padding)
    and `window_ids` (the window, -1 padding); and `feature_index` [S / merge²]: for the k-th merged
    feature in token order, the merge unit (slot // merge²) that computes it.
    """
    grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    m = config.spatial_merge_size
    mm = m * m
    upw = config.window_size // m // config.patch_size
    needed = patch_slots(grid_thw, config)
    slots = needed if num_patches is None else num_patches
    if slots < needed:
        raise ValueError(
            f"the images need {needed} patch slots (window order), more than the bucket's {slots}"
        )
    if slots % window_patches(config):
        raise ValueError(f"num_patches {slots} must be a multiple of {window_patches(config)} (one window)")
    out = {
        "patch_index": np.full(slots, -1, np.int64),
        "hw_position_ids": np.zeros((slots, 2), np.int32),
        "frame_ids": np.full(slots, -1, np.int32),
        "window_ids": np.full(slots, -1, np.int32),
        "feature_index": np.zeros(slots // mm, np.int32),
    }
    slot = patch_base = frame = window = feature = 0
    for t, h, w in grid_thw:
        if h % m or w % m:
            raise ValueError(f"image grid {(t, h, w)} is not divisible by spatial_merge_size {m}")
        gh, gw = h // m, w // m
        nh, nw = _windows(t, h, w, config)
        # Merge units of one frame, padded to whole windows (-1), listed window by window, each
        # window's units in raster order: transformers' window index.
        units = np.full((nh * upw, nw * upw), -1, np.int64)
        units[:gh, :gw] = np.arange(gh * gw).reshape(gh, gw)
        units = units.reshape(nh, upw, nw, upw).transpose(0, 2, 1, 3).reshape(-1)
        win = np.repeat(np.arange(nh * nw), upw * upw)
        real = units >= 0
        for f in range(t):
            n_units = len(units)
            unit_slots = slot // mm + np.arange(n_units)
            # Input patch of each slot: unit u's patches are u·mm .. u·mm + mm-1 in merge-block order.
            pidx = np.where(
                real[:, None], patch_base + units[:, None] * mm + np.arange(mm)[None, :], -1
            ).reshape(-1)
            rows = (units // gw)[:, None] * m + np.arange(mm)[None, :] // m
            cols = (units % gw)[:, None] * m + np.arange(mm)[None, :] % m
            sl = slice(slot, slot + n_units * mm)
            out["patch_index"][sl] = pidx
            out["hw_position_ids"][sl] = np.where(real[:, None, None], np.stack([rows, cols], -1), 0).reshape(
                -1, 2
            )
            out["frame_ids"][sl] = np.where(np.repeat(real, mm), frame, -1)
            out["window_ids"][sl] = np.where(np.repeat(real, mm), window + np.repeat(win, mm), -1)
            # Token order is the unit's raster index within the frame.
            out["feature_index"][feature + units[real]] = unit_slots[real]
            slot += n_units * mm
            patch_base += gh * gw * mm
            feature += gh * gw
            frame += 1
            window += nh * nw
    return out


def batched_vision_inputs(
    pixel_values: list, grids: list, config: VisionConfig, num_patches: int, dtype=np.float32
) -> dict[str, np.ndarray]:
    """Per-row vision inputs in `num_patches` window-ordered slots per row, for batches that are split
    into micro-batches or sharded by row (the learner, the sampler).

    `pixel_values[b]` is row b's patches [N_b, C·T·P·P] (all its images concatenated, merge-block
    order) or None, and `grids[b]` its image grids [n_b, 3]. Returns `pixel_values` [B, num_patches,
    C·T·P·P] in `dtype` (bf16 halves the host and transfer bytes when the model computes in bf16) and
    the `LAYOUT_KEYS` arrays of `vision_layout` with a leading batch axis; padding slots have segment
    id -1, so they never attend to (or are attended by) a real patch, and they are never gathered.
    """
    if num_patches % window_patches(config):
        raise ValueError(
            f"num_patches {num_patches} must be a multiple of {window_patches(config)} (one window)"
        )
    b = len(pixel_values)
    mm = config.spatial_merge_size**2
    out = {
        "pixel_values": np.zeros((b, num_patches, config.patch_dim), dtype),
        "hw_position_ids": np.zeros((b, num_patches, 2), np.int32),
        "frame_ids": np.full((b, num_patches), -1, np.int32),
        "window_ids": np.full((b, num_patches), -1, np.int32),
        "feature_index": np.zeros((b, num_patches // mm), np.int32),
    }
    for row, (pix, grid) in enumerate(zip(pixel_values, grids)):
        if pix is None:
            continue
        try:
            layout = vision_layout(grid, config, num_patches)
        except ValueError as e:
            raise ValueError(f"row {row}: {e}") from None
        pidx = layout["patch_index"]
        if len(pix) != int(np.asarray(grid).reshape(-1, 3).prod(-1).sum()):
            raise ValueError(
                f"row {row} has {len(pix)} image patches but its grids describe "
                f"{int(np.asarray(grid).reshape(-1, 3).prod(-1).sum())}"
            )
        real = pidx >= 0
        out["pixel_values"][row, real] = np.asarray(pix)[pidx[real]].astype(dtype)
        for key in LAYOUT_KEYS:
            out[key][row] = layout[key]
    return out


def rows_of_images(images: dict, image_index) -> dict:
    """Per-row vision inputs from inputs stored once per image: `images` holds the `IMAGE_KEYS` arrays
    with a leading image axis (`batched_vision_inputs` over the distinct prompts), `image_index` [B]
    says which image row b uses. A gather on the device, so a prompt's n responses share one copy of
    its pixels on the host and in transfer; only the rows asked for are materialized."""
    index = jnp.asarray(image_index, jnp.int32)
    return {k: jnp.take(jnp.asarray(images[k]), index, axis=0, mode="clip") for k in IMAGE_KEYS}


def layout_shapes(rows: int, num_patches: int, config: VisionConfig) -> dict[str, tuple]:
    """(shape, dtype) of each per-row vision array (`pixel_values` in fp32), for planning and lowering."""
    mm = config.spatial_merge_size**2
    return {
        "pixel_values": ((rows, num_patches, config.patch_dim), np.float32),
        "hw_position_ids": ((rows, num_patches, 2), np.int32),
        "frame_ids": ((rows, num_patches), np.int32),
        "window_ids": ((rows, num_patches), np.int32),
        "feature_index": ((rows, num_patches // mm), np.int32),
    }


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs, attention: str = "auto"):
        self.num_heads = cfg.num_heads
        self.window = window_patches(cfg)
        self.attention = attention
        self.qkv = Linear(
            cfg.hidden_size,
            3 * cfg.hidden_size,
            use_bias=True,
            axes=("vit_embed", "vit_qkv"),
            dtype=dtype,
            rngs=rngs,
        )
        self.proj = Linear(
            cfg.hidden_size,
            cfg.hidden_size,
            use_bias=True,
            axes=("vit_heads", "vit_embed"),
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x, cos, sin, segment_ids, windowed: bool):
        """x [B, S, dim] in window-ordered slots; `windowed`: attend within each window's slot run,
        else within each frame (`segment_ids` [B, S], -1 padding)."""
        b, n, dim = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # The reference rotates q and k in fp32 whatever the parameter dtype.
        c, s = cos[:, :, None, :], sin[:, :, None, :]
        q = apply_rotary(q.astype(jnp.float32), c, s).astype(x.dtype)
        k = apply_rotary(k.astype(jnp.float32), c, s).astype(x.dtype)
        if windowed:
            # One dense [window, window] attention per window slot: the batch of windows is B·S/window.
            w = self.window

            def split(a):
                return a.reshape((b * n // w, w) + a.shape[2:])

            out = attention(
                split(q),
                split(k),
                split(v),
                causal=False,
                segment_ids=split(segment_ids),
                implementation="xla",
            )
        else:
            out = attention(q, k, v, causal=False, segment_ids=segment_ids, implementation=self.attention)
        return self.proj(out.reshape(b, n, dim))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = Linear(
            cfg.hidden_size,
            cfg.intermediate_size,
            use_bias=True,
            axes=("vit_embed", "vit_mlp"),
            dtype=dtype,
            rngs=rngs,
        )
        self.up_proj = Linear(
            cfg.hidden_size,
            cfg.intermediate_size,
            use_bias=True,
            axes=("vit_embed", "vit_mlp"),
            dtype=dtype,
            rngs=rngs,
        )
        self.down_proj = Linear(
            cfg.intermediate_size,
            cfg.hidden_size,
            use_bias=True,
            axes=("vit_mlp", "vit_embed"),
            dtype=dtype,
            rngs=rngs,
        )
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):
    def __init__(
        self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs, windowed: bool = True, attention: str = "auto"
    ):
        self.norm1 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="vit_embed", dtype=dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="vit_embed", dtype=dtype)
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs, attention=attention)
        self.mlp = VisionMLP(cfg, dtype=dtype, rngs=rngs)
        self.windowed = windowed

    def __call__(self, x, cos, sin, segment_ids):
        x = x + self.attn(self.norm1(x), cos, sin, segment_ids, self.windowed)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm per patch, concatenate each 2×2 block, Linear → exact GELU → Linear to the LM width."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="vit_embed", dtype=dtype)
        self.fc1 = Linear(
            merged, merged, use_bias=True, axes=("vit_merged", "vit_merged_out"), dtype=dtype, rngs=rngs
        )
        self.fc2 = Linear(
            merged,
            cfg.out_hidden_size,
            use_bias=True,
            axes=("vit_merged_out", "embed"),
            dtype=dtype,
            rngs=rngs,
        )
        self.merged = merged

    def __call__(self, x):
        x = self.ln_q(x)
        x = x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1] // self.merged, self.merged))
        # nn.GELU() in the reference is the exact erf form; JAX's default is the tanh approximation.
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class PatchEmbed(nnx.Module):
    """The Conv3d with kernel = stride = (T, P, P) over pre-flattened patches is a single matmul."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.proj = Linear(
            cfg.patch_dim,
            cfg.hidden_size,
            use_bias=False,
            axes=("vit_patch", "vit_embed"),
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, pixel_values):
        return self.proj(pixel_values.astype(self.proj.kernel.dtype))


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs, attention: str = "auto"):
        self.cfg = cfg
        full = set(cfg.fullatt_block_indexes)
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List(
            [
                VisionBlock(cfg, dtype=dtype, rngs=rngs, windowed=i not in full, attention=attention)
                for i in range(cfg.depth)
            ]
        )
        self.merger = PatchMerger(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values, layout: dict, remat_policy=None) -> jnp.ndarray:
        """Merged image features in token order.

        Per-row input (`batched_vision_inputs`): pixel_values [B, S, C·T·P·P] in slot order and the
        layout arrays with a batch axis → [B, S / merge², out_hidden_size], row b's k-th feature for its
        k-th image-pad token. Flat input: pixel_values [N, C·T·P·P] as the processor emits them and
        `vision_layout(grid)` (with its `patch_index`) → [N / merge², out_hidden_size].
        `remat_policy`: rematerialize each block in the backward pass (see `layers.rematerialized`).
        """
        if pixel_values.ndim == 2:
            pidx = jnp.asarray(layout["patch_index"])
            rows = jnp.where((pidx >= 0)[:, None], jnp.take(pixel_values, jnp.maximum(pidx, 0), axis=0), 0)
            batched = {k: jnp.asarray(layout[k])[None] for k in LAYOUT_KEYS}
            n_feats = pixel_values.shape[0] // self.cfg.spatial_merge_size**2
            return self(rows[None], batched, remat_policy)[0, :n_feats]
        x = self.patch_embed(pixel_values)
        cos, sin = vision_cos_sin(
            jnp.asarray(layout["hw_position_ids"]), self.cfg.head_dim, self.cfg.rope_theta
        )
        frame_ids, window_ids = jnp.asarray(layout["frame_ids"]), jnp.asarray(layout["window_ids"])
        for block in self.blocks:
            run = block if remat_policy is None else rematerialized(block, remat_policy)
            x = run(x, cos, sin, window_ids if block.windowed else frame_ids)
        feats = self.merger(x)  # [B, S / merge², out] in slot order
        return jnp.take_along_axis(feats, jnp.asarray(layout["feature_index"])[..., None], axis=1)
