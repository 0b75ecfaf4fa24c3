"""Token sequences for the parity cases: text only, one image over several windows, two images, padding.

Ids follow the tiny config: image pad 500, vision start 502, vision end 503, text ids < 500.
"""

from __future__ import annotations

import numpy as np

PAD, IMAGE, VSTART, VEND = 504, 500, 502, 503


def image_block(grid) -> list[int]:
    t, h, w = grid
    return [VSTART] + [IMAGE] * (t * h * w // 4) + [VEND]


def sequence(rng, parts) -> list[int]:
    """parts: ints (that many random text tokens) or grids (an image block)."""
    out = []
    for part in parts:
        out += list(rng.integers(0, 400, part)) if isinstance(part, int) else image_block(part)
    return out


def left_pad(seqs):
    length = max(len(s) for s in seqs)
    ids = np.full((len(seqs), length), PAD, np.int64)
    mask = np.zeros((len(seqs), length), np.int64)
    for i, s in enumerate(seqs):
        ids[i, length - len(s) :] = s
        mask[i, length - len(s) :] = 1
    return ids, mask


def build(name: str, seed: int = 0, patch_dim: int = 1176):
    """(input_ids, attention_mask, pixel_values, image_grid_thw) for a named case."""
    rng = np.random.default_rng(seed)
    if name == "text":
        ids, mask = left_pad([sequence(rng, [23])])
        return ids, mask, None, None
    if name == "one_image":
        # 20×28 patches = 10×14 merged units: 3×4 windows of 4×4 units, the last row and column partial.
        grids = [(1, 20, 28)]
        ids, mask = left_pad([sequence(rng, [5, grids[0], 9])])
    elif name == "two_images":
        grids = [(1, 12, 16), (1, 20, 10)]
        ids, mask = left_pad([sequence(rng, [4, grids[0], 6, grids[1], 7])])
    elif name == "padded_batch":
        grids = [(1, 8, 12), (1, 18, 10)]
        ids, mask = left_pad(
            [
                sequence(rng, [3, grids[0], 5]),
                sequence(
                    rng,
                    [
                        8,
                        grids[1],
                        12,
                    ],
                ),
            ]
        )
    elif name == "padded_text":
        ids, mask = left_pad([sequence(rng, [7]), sequence(rng, [19])])
        return ids, mask, None, None
    else:
        raise KeyError(name)
    grid = np.asarray(grids, np.int64)
    pixels = rng.standard_normal((int(grid.prod(-1).sum()), patch_dim)).astype(np.float32)
    return ids, mask, pixels, grid
