"""Logits and position-id parity of pr1's Flax Qwen2.5-VL against transformers (fp32, eager)."""

import jax.numpy as jnp
import numpy as np
import pytest

from pr1.models import hf
from pr1.models.rope import rope_index
from tests import cases
from tests.hf_reference import hf_logits, hf_rope_index, make_hf_model

CASES = ["text", "one_image", "two_images", "padded_batch", "padded_text"]
IMPLEMENTATIONS = ["xla", "blockwise"]  # the attention implementations that run on CPU


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    ref = make_hf_model(seed=0)
    path = tmp_path_factory.mktemp("hf_tiny")
    ref.save_pretrained(path)
    ours = hf.load(path, dtype=jnp.float32)
    return ref, ours


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 keys and 32 queries, so the tiny sequences run through several blockwise blocks."""
    from pr1.models import attention

    monkeypatch.setattr(attention, "BLOCK_Q", 32)
    monkeypatch.setattr(attention, "BLOCK_K", 16)


def with_attention(model, implementation):
    import dataclasses

    return _with_config(model, dataclasses.replace(model.config, attention=implementation))


def ours_logits(model, ids, mask, pixels, grid):
    pos, _ = rope_index(model.config, ids, grid, mask)
    return np.asarray(
        model(
            jnp.asarray(ids),
            position_ids=jnp.asarray(pos),
            attention_mask=jnp.asarray(mask),
            pixel_values=None if pixels is None else jnp.asarray(pixels),
            image_grid_thw=grid,
        )
    )


@pytest.mark.parametrize("case", CASES)
def test_rope_index_matches_transformers(models, case):
    ref, ours = models
    ids, mask, _, grid = cases.build(case)
    pos, deltas = rope_index(ours.config, ids, grid, mask)
    ref_pos, ref_deltas = hf_rope_index(ref, ids, grid, mask)
    np.testing.assert_array_equal(pos[:, mask.astype(bool)], ref_pos[:, mask.astype(bool)])
    np.testing.assert_array_equal(deltas, ref_deltas)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(models, case, implementation, small_blocks):
    ref, ours = models
    ours = with_attention(ours, implementation)
    ids, mask, pixels, grid = cases.build(case)
    ref_pos, _ = hf_rope_index(ref, ids, grid, mask)
    expected = hf_logits(ref, ids, mask, pixels, grid, position_ids=ref_pos)
    got = ours_logits(ours, ids, mask, pixels, grid)
    valid = mask.astype(bool)
    # Padding queries attend to nothing real in either implementation; only real tokens count.
    assert np.abs(expected[valid]).std() > 0.5, (
        "reference logits too small for the tolerance to mean anything"
    )
    np.testing.assert_allclose(got[valid], expected[valid], rtol=0, atol=1e-4)


def test_window_attention_is_exercised(models):
    """The window layout matters for the one-image case: full attention in every block changes the logits."""
    import dataclasses

    from pr1.models.vision import vision_layout

    ref, ours = models
    ids, mask, pixels, grid = cases.build("one_image")
    layout = vision_layout(grid, ours.config.vision)
    windows = np.unique(layout["window_ids"])
    assert len(windows[windows >= 0]) == 12  # 3×4 windows, border ones partial
    pos, _ = rope_index(ours.config, ids, grid, mask)

    def run(m):
        return np.asarray(
            m(
                jnp.asarray(ids),
                position_ids=jnp.asarray(pos),
                attention_mask=jnp.asarray(mask),
                pixel_values=jnp.asarray(pixels),
                vision_layout_arrays=layout,
            )
        )

    vision = dataclasses.replace(
        ours.config.vision, fullatt_block_indexes=tuple(range(ours.config.vision.depth))
    )
    no_windows = _with_config(ours, dataclasses.replace(ours.config, vision=vision))
    assert np.abs(run(ours) - run(no_windows)).max() > 1e-2


def _with_config(model, config):
    """`model`'s weights in a model built from `config` (same parameter shapes)."""
    from flax import nnx

    from pr1.models.qwen2_5_vl import Qwen25VL

    other = nnx.eval_shape(lambda: Qwen25VL(config, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(other, nnx.Param)
    nnx.replace_by_pure_dict(state, nnx.state(model, nnx.Param).to_pure_dict())
    return nnx.merge(graphdef, state)


def test_image_count_mismatch_is_an_error(models):
    _, ours = models
    ids, mask, pixels, grid = cases.build("one_image")
    pos, _ = rope_index(ours.config, ids, grid, mask)
    with pytest.raises(ValueError, match="image-pad tokens"):
        ours(
            jnp.asarray(ids[:, :-20]),
            position_ids=jnp.asarray(pos[:, :, :-20]),
            pixel_values=jnp.asarray(pixels),
            image_grid_thw=grid,
        )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", ["one_image", "two_images"])
def test_vision_features_match_transformers(models, case, implementation, small_blocks):
    import torch

    from pr1.models.vision import vision_layout

    ref, ours = models
    ours = with_attention(ours, implementation)
    _, _, pixels, grid = cases.build(case)
    with torch.no_grad():
        expected = torch.cat(
            ref.model.get_image_features(torch.tensor(pixels), torch.tensor(grid)).pooler_output
        ).numpy()
    got = np.asarray(ours.visual(jnp.asarray(pixels), vision_layout(grid, ours.config.vision)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_per_row_images_match_transformers(models, implementation, small_blocks):
    """The learner's and sampler's layout (each row's images in window-ordered slots, padded to a
    patch bucket; rows with images of different sizes, left padding) gives transformers' logits."""
    from pr1.models.vision import batched_vision_inputs, patch_bucket, patch_slots

    ref, ours = models
    ours = with_attention(ours, implementation)
    ids, mask, pixels, grid = cases.build("padded_batch")
    ref_pos, _ = hf_rope_index(ref, ids, grid, mask)
    expected = hf_logits(ref, ids, mask, pixels, grid, position_ids=ref_pos)
    pos, _ = rope_index(ours.config, ids, grid, mask)
    counts = grid.prod(-1)
    slots = patch_bucket(max(patch_slots(g[None], ours.config.vision) for g in grid))
    rows = batched_vision_inputs(
        [pixels[: counts[0]], pixels[counts[0] :]],
        [grid[:1], grid[1:]],
        ours.config.vision,
        num_patches=slots,
    )
    assert slots == 512 and (rows["frame_ids"] >= 0).sum(axis=1).tolist() == counts.tolist()
    layout = {k: jnp.asarray(v) for k, v in rows.items() if k != "pixel_values"}
    got = ours(
        jnp.asarray(ids),
        position_ids=jnp.asarray(pos),
        attention_mask=jnp.asarray(mask),
        pixel_values=jnp.asarray(rows["pixel_values"]),
        vision_layout_arrays=layout,
    )
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[valid], expected[valid], rtol=0, atol=1e-4)


def test_patch_slots_follow_windows(models):
    """Slots are whole 64-patch windows; buckets are multiples of 256, not powers of two."""
    from pr1.models.vision import patch_bucket, patch_slots, vision_layout

    _, ours = models
    v = ours.config.vision
    assert patch_slots(np.array([[1, 20, 28]]), v) == 12 * 64  # 3×4 windows for 560 patches
    assert patch_slots(np.array([[1, 96, 96]]), v) == 9216  # the recipe's 1344×1344 image: 12×12 full windows
    assert patch_bucket(9216) == 9216 and patch_bucket(9217) == 9472 and patch_bucket(1, 256) == 256
    assert patch_bucket(64, 16) == 64 and patch_bucket(200, 16) == 256 and patch_bucket(300, 16) == 512
    layout = vision_layout(np.array([[1, 20, 28], [1, 8, 12]]), v)
    # Every input patch is placed exactly once, and the features come back in token order.
    placed = layout["patch_index"][layout["patch_index"] >= 0]
    assert sorted(placed.tolist()) == list(range(20 * 28 + 8 * 12))
    units = layout["patch_index"].reshape(-1, 4)[layout["feature_index"], 0]
    np.testing.assert_array_equal(units[: (20 * 28 + 8 * 12) // 4], np.arange((20 * 28 + 8 * 12) // 4) * 4)
