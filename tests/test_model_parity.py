"""Logits and position-id parity of pr1's Flax Qwen2.5-VL against transformers (fp32, eager)."""

import numpy as np
import jax.numpy as jnp
import pytest

from pr1.models import hf
from pr1.models.rope import rope_index
from tests import cases
from tests.hf_reference import hf_logits, hf_rope_index, make_hf_model

CASES = ["text", "one_image", "two_images", "padded_batch", "padded_text"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    ref = make_hf_model(seed=0)
    path = tmp_path_factory.mktemp("hf_tiny")
    ref.save_pretrained(path)
    ours = hf.load(path, dtype=jnp.float32)
    return ref, ours


def ours_logits(model, ids, mask, pixels, grid):
    pos, _ = rope_index(model.config, ids, grid, mask)
    return np.asarray(model(jnp.asarray(ids), position_ids=jnp.asarray(pos), attention_mask=jnp.asarray(mask),
                            pixel_values=None if pixels is None else jnp.asarray(pixels), image_grid_thw=grid))


@pytest.mark.parametrize("case", CASES)
def test_rope_index_matches_transformers(models, case):
    ref, ours = models
    ids, mask, _, grid = cases.build(case)
    pos, deltas = rope_index(ours.config, ids, grid, mask)
    ref_pos, ref_deltas = hf_rope_index(ref, ids, grid, mask)
    np.testing.assert_array_equal(pos[:, mask.astype(bool)], ref_pos[:, mask.astype(bool)])
    np.testing.assert_array_equal(deltas, ref_deltas)


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(models, case):
    ref, ours = models
    ids, mask, pixels, grid = cases.build(case)
    ref_pos, _ = hf_rope_index(ref, ids, grid, mask)
    expected = hf_logits(ref, ids, mask, pixels, grid, position_ids=ref_pos)
    got = ours_logits(ours, ids, mask, pixels, grid)
    valid = mask.astype(bool)
    # Padding queries attend to nothing real in either implementation; only real tokens count.
    assert np.abs(expected[valid]).std() > 0.5, "reference logits too small for the tolerance to mean anything"
    np.testing.assert_allclose(got[valid], expected[valid], rtol=0, atol=1e-4)


def test_window_attention_is_exercised(models):
    """The window mask matters for the one-image case: attending across windows changes the logits."""
    ref, ours = models
    ids, mask, pixels, grid = cases.build("one_image")
    from pr1.models.vision import vision_layout
    layout = vision_layout(grid, ours.config.vision)
    assert len(np.unique(layout["window_ids"])) == 12  # 3×4 windows, border ones partial
    no_windows = dict(layout, window_ids=layout["frame_ids"])
    pos, _ = rope_index(ours.config, ids, grid, mask)
    run = lambda lay: np.asarray(ours(jnp.asarray(ids), position_ids=jnp.asarray(pos), attention_mask=jnp.asarray(mask),
                                      pixel_values=jnp.asarray(pixels), vision_layout_arrays=lay))
    assert np.abs(run(layout) - run(no_windows)).max() > 1e-2


def test_image_count_mismatch_is_an_error(models):
    _, ours = models
    ids, mask, pixels, grid = cases.build("one_image")
    pos, _ = rope_index(ours.config, ids, grid, mask)
    with pytest.raises(ValueError, match="image-pad tokens"):
        ours(jnp.asarray(ids[:, :-20]), position_ids=jnp.asarray(pos[:, :, :-20]), pixel_values=jnp.asarray(pixels),
             image_grid_thw=grid)


@pytest.mark.parametrize("case", ["one_image", "two_images"])
def test_vision_features_match_transformers(models, case):
    import torch
    from pr1.models.vision import vision_layout

    ref, ours = models
    _, _, pixels, grid = cases.build(case)
    with torch.no_grad():
        expected = torch.cat(ref.model.get_image_features(torch.tensor(pixels), torch.tensor(grid)).pooler_output).numpy()
    got = np.asarray(ours.visual(jnp.asarray(pixels), vision_layout(grid, ours.config.vision)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)


def test_per_row_padded_images_match_concatenated(models):
    """The learner's layout (images padded per row to a patch bucket) gives the same logits."""
    from pr1.models.vision import batched_vision_inputs

    _, ours = models
    ids, mask, pixels, grid = cases.build("padded_batch")
    pos, _ = rope_index(ours.config, ids, grid, mask)
    counts = grid.prod(-1)
    rows = batched_vision_inputs([pixels[:counts[0]], pixels[counts[0]:]], [grid[:1], grid[1:]], ours.config.vision,
                                 num_patches=int(counts.max()) + 16)
    layout = {k: jnp.asarray(v) for k, v in rows.items() if k != "pixel_values"}
    got = ours(jnp.asarray(ids), position_ids=jnp.asarray(pos), attention_mask=jnp.asarray(mask),
               pixel_values=jnp.asarray(rows["pixel_values"]), vision_layout_arrays=layout)
    want = ours_logits(ours, ids, mask, pixels, grid)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], rtol=0, atol=1e-5)
