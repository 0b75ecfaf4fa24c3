"""Multimodal rotary position ids (host side, NumPy) and the rotary helpers used inside the model.

`rope_index` depends on token values (where the images are), so it runs on the host before the
jitted forward; the model only consumes the resulting `[3, B, T]` position ids (rows t, h, w).
During decoding every row of a new token is `(real tokens so far) + delta`, with `delta` returned here.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pr1.models.config import Qwen25VLConfig


def rope_index(
    config: Qwen25VLConfig,
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """3-row MRoPE position ids `[3, B, T]` and per-sequence decode deltas `[B]`.

    Per sequence (padding removed): text runs count up on all three rows, continuing from the
    previous maximum + 1; an image block of grid (T, H, W) patches becomes T·(H/m)·(W/m) tokens with
    rows (t, h, w) = (0, row, column) + start. A block starts where `<|vision_start|>` is followed by
    `<|image_pad|>`. Padding positions are 0. `delta = max position + 1 - unpadded length`.
    Images are consumed from `image_grid_thw` in order, row by row through the batch.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    batch, length = input_ids.shape
    mask = (
        np.ones_like(input_ids, dtype=bool)
        if attention_mask is None
        else np.asarray(attention_mask).astype(bool)
    )
    grids = (
        np.zeros((0, 3), np.int64)
        if image_grid_thw is None
        else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    )
    merge = config.vision.spatial_merge_size
    image_id = config.image_token_id

    position_ids = np.zeros((3, batch, length), np.int64)
    deltas = np.zeros((batch,), np.int64)
    next_image = 0
    for b in range(batch):
        ids = input_ids[b][mask[b]]
        n = len(ids)
        pos = np.zeros((3, n), np.int64)
        i, start = 0, 0
        while i < n:
            is_block = ids[i] == image_id and i > 0 and ids[i - 1] == config.vision_start_token_id
            if not is_block:
                # A run of text up to the next image block.
                j = i + 1
                while j < n and not (ids[j] == image_id and ids[j - 1] == config.vision_start_token_id):
                    j += 1
                pos[:, i:j] = start + np.arange(j - i)
                start += j - i
                i = j
                continue
            if next_image >= len(grids):
                raise ValueError(
                    f"sequence {b} has more image blocks than image_grid_thw rows ({len(grids)})"
                )
            t, h, w = (int(x) for x in grids[next_image])
            next_image += 1
            gh, gw = h // merge, w // merge
            count = t * gh * gw
            if i + count > n or not np.all(ids[i : i + count] == image_id):
                raise ValueError(
                    f"sequence {b}: image {next_image - 1} with grid {(t, h, w)} needs {count} consecutive "
                    f"image-pad tokens at index {i}"
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            # Still images have t = 0 for every token (no temporal spacing).
            pos[0, i : i + count] = start + tt.reshape(-1) * 0
            pos[1, i : i + count] = start + hh.reshape(-1)
            pos[2, i : i + count] = start + ww.reshape(-1)
            start += max(gh, gw)
            i += count
        position_ids[:, b, mask[b]] = pos
        deltas[b] = (pos.max() + 1 - n) if n else 0
    if next_image != len(grids):
        raise ValueError(
            f"image_grid_thw has {len(grids)} rows but the batch holds {next_image} image blocks"
        )
    return position_ids, deltas


def decode_position_ids(
    num_real_tokens: np.ndarray | int, deltas: np.ndarray, num_tokens: int = 1
) -> np.ndarray:
    """Position ids `[3, B, num_tokens]` for tokens appended after a prompt.

    `num_real_tokens` [B] counts the tokens already in each sequence, padding excluded (prompt length
    without its left padding, plus tokens generated so far). A new token's position on all three rows
    is that count + delta: with left padding the cache slot index is *not* the position, because the
    pads take slots but no positions (as in transformers, where positions come from the mask's cumsum).
    """
    deltas = np.asarray(deltas, np.int64)
    start = np.broadcast_to(np.asarray(num_real_tokens, np.int64).reshape(-1), deltas.shape)
    pos = start[:, None] + np.arange(num_tokens) + deltas[:, None]
    return np.broadcast_to(pos[None], (3,) + pos.shape).copy()


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def mrope_cos_sin(
    position_ids: jnp.ndarray, head_dim: int, theta: float, mrope_section
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin `[B, T, head_dim]` in fp32 for 3-row position ids `[3, B, T]`.

    Frequency slot s takes its angle from row t, h or w according to `mrope_section` (e.g. 16/24/24
    slots), then the 64 angles are repeated to cover the rotate-half layout of the 128-dim head.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, head_dim/2]
    row_of_slot = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)
    slots = np.arange(len(row_of_slot))
    freqs = jnp.moveaxis(freqs[row_of_slot, :, :, slots], 0, -1)  # [B, T, head_dim/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def vision_cos_sin(
    hw_position_ids: jnp.ndarray, head_dim: int, theta: float
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """2D rotary cos/sin `[..., N, head_dim]` in fp32 for patch positions `[..., N, 2]` (row h, column w).

    head_dim/4 frequencies over a spatial dim of head_dim/2; angles are [h·f ‖ w·f], repeated twice.
    """
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    hw = hw_position_ids.astype(jnp.float32)
    freqs = jnp.concatenate([hw[..., 0:1] * inv_freq, hw[..., 1:2] * inv_freq], axis=-1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)
