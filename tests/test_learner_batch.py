"""The learner's batch treats a response exactly as the sampler did: a vision token the policy
sampled in its response is text (positions continue as in decoding, no image feature goes there)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from pr1 import sharding
from pr1.data.processor import Processor
from pr1.models.config import Qwen25VLConfig
from pr1.models.generation import Completion, Prompt
from pr1.models.model_def import ModelDef
from pr1.models.rope import decode_position_ids, rope_index
from pr1.models.tiny import write_tiny_checkpoint
from pr1.models.vision import IMAGE_KEYS, LAYOUT_KEYS, batched_vision_inputs, rows_of_images
from pr1.train import batch as batch_lib
from pr1.train import state as state_lib
from pr1.train import step as step_lib


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("lb") / "ckpt", seed=1)
    processor = Processor.from_dir(path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), np.uint8))
    prompt = Prompt.build(processor, "What is x?", [image])
    return path, processor, prompt


def _completion(tokens, prompt_index=0, sample_index=0):
    tokens = np.asarray(tokens, np.int32)
    return Completion(
        prompt_index=prompt_index,
        sample_index=sample_index,
        token_ids=tokens,
        logprobs=np.zeros(len(tokens), np.float32),
        text="",
        finish_reason="length",
    )


def test_sampled_vision_tokens_in_a_response_are_text(setup):
    path, processor, prompt = setup
    config = processor.config
    plain = [11, 12, 13, 14]
    vision = [11, config.vision_start_token_id, config.image_token_id, 14]
    batch = batch_lib.learner_batch(
        config,
        [prompt],
        [_completion(plain), _completion(vision)],
        max_new_tokens=6,
        pad_token_id=processor.pad_token_id,
    )
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]  # pos [B, 3, T]
    prompt_len = ids.shape[1] - 6
    # The sampler's decode positions: real prompt tokens + k + the prompt's rope delta.
    _, deltas = rope_index(config, ids[:1, :prompt_len], prompt.image_grid_thw, mask[:1, :prompt_len])
    want = decode_position_ids(len(prompt.input_ids), deltas, 4)[:, 0]
    for row in (0, 1):
        np.testing.assert_array_equal(pos[row, :, prompt_len : prompt_len + 4], want)
    # For plain text this is what rope_index over the whole sequence gives, as before.
    full, _ = rope_index(config, ids[:1], prompt.image_grid_thw, mask[:1])
    np.testing.assert_array_equal(full[:, 0, prompt_len : prompt_len + 4], want)

    # The model puts image features only where the learner's image mask says: the prompt.
    model_def = ModelDef.create(Qwen25VLConfig.from_dir(path), dtype=jnp.float32)
    model = model_def.bind(state_lib.load_params(path, model_def, sharding.make_mesh(1, -1, 1)))
    images = rows_of_images(batch, batch["image_index"])
    layout = {k: images[k] for k in LAYOUT_KEYS}
    ids_j = jnp.asarray(ids)
    image_mask = (ids_j == config.image_token_id) & (jnp.asarray(batch["loss_mask"]) == 0)
    emb = model.embed(ids_j, images["pixel_values"], vision_layout_arrays=layout, image_mask=image_mask)
    plain_emb = model.embed_tokens(ids_j)
    r = prompt_len + 2  # the sampled image-pad token of row 1
    assert int(ids[1, r]) == config.image_token_id
    np.testing.assert_allclose(np.asarray(emb[1, r]), np.asarray(plain_emb[1, r]), rtol=0, atol=0)
    # ... while the prompt's image-pad tokens did get features (not plain embeddings).
    first_pad = int(np.argmax(ids[1] == config.image_token_id))
    assert (
        first_pad < prompt_len
        and np.abs(np.asarray(emb[1, first_pad] - plain_emb[1, first_pad])).max() > 1e-6
    )
    # Both rows' prompt embeddings are identical: the extra pad in row 1 stole no feature.
    np.testing.assert_allclose(
        np.asarray(emb[0, :prompt_len]), np.asarray(emb[1, :prompt_len]), rtol=0, atol=0
    )


def test_rows_are_padded_to_the_steps_longest_response_not_the_maximum(setup):
    """A step whose responses are short pads them to a small bucket, not to max_new_tokens; a longer
    response elsewhere (another process's extents) moves every process to its bucket."""
    _, processor, prompt = setup
    config = processor.config
    short = [_completion([11, 12, 13]), _completion([11] * 70)]
    batch = batch_lib.learner_batch(
        config, [prompt], short, max_new_tokens=4096, pad_token_id=processor.pad_token_id
    )
    prompt_bucket = batch["input_ids"].shape[1] - 128
    assert prompt_bucket == 64 * -(-len(prompt.input_ids) // 64) or prompt_bucket >= len(prompt.input_ids)
    assert batch["loss_mask"].sum() == 73 and batch["loss_mask"][:, prompt_bucket:].sum() == 73
    extents = batch_lib.batch_extents([prompt], short, config)
    assert extents[2] == 70
    wider = batch_lib.learner_batch(
        config,
        [prompt],
        short,
        max_new_tokens=4096,
        pad_token_id=processor.pad_token_id,
        extents=(extents[0], extents[1], 300),
    )
    assert wider["input_ids"].shape[1] == prompt_bucket + 512
    capped = batch_lib.learner_batch(
        config, [prompt], short, max_new_tokens=100, pad_token_id=processor.pad_token_id
    )
    assert capped["input_ids"].shape[1] == prompt_bucket + 100


def _per_row(batch, prompts, completions, config):
    """The learner batch as it was before images were shared: every row its own copy of its prompt's
    image (built directly from the prompts, not from the shared batch)."""
    out = {k: v for k, v in batch.items() if k not in IMAGE_KEYS and k != "image_index"}
    rows = [prompts[c.prompt_index] for c in completions]
    out.update(
        batched_vision_inputs(
            [p.pixel_values for p in rows],
            [p.image_grid_thw for p in rows],
            config.vision,
            num_patches=batch["pixel_values"].shape[1],
        )
    )
    return out


@pytest.fixture(scope="module")
def groups(setup):
    """Three prompts (two images of different sizes, one text-only) x 4 responses of varied lengths."""
    path, processor, prompt = setup
    rng = np.random.default_rng(5)
    wide = Image.fromarray(rng.integers(0, 255, (28, 112, 3), np.uint8))
    prompts = [prompt, Prompt.build(processor, "And y?", [wide]), Prompt.build(processor, "No image.")]
    n = 4
    completions = [
        _completion(rng.integers(10, 300, int(rng.integers(2, 9))), p, s) for p in range(3) for s in range(n)
    ]
    return path, processor.config, prompts, completions, n


@pytest.mark.parametrize(
    "mesh_shape, micro_batches",
    # 1 device, micro-batches of rows j, j+3, ... (parts of several groups each); 4 batch devices with
    # 3 images padded to 4 (on_mesh), micro-batches of 6 rows (one and a half groups).
    [((1, 1, 1), 3), ((2, 2, 1), 2)],
    ids=["one_device", "sharded"],
)
def test_images_stored_once_per_prompt_give_the_per_row_logprobs(groups, mesh_shape, micro_batches):
    path, config, prompts, completions, n = groups
    shared = batch_lib.learner_batch(config, prompts, completions, max_new_tokens=8, pad_token_id=0)
    per_row = _per_row(shared, prompts, completions, config)
    # One image entry per prompt: the host holds (and sends) 1/n of the pixels of the per-row batch.
    assert shared["pixel_values"].shape[0] == len(prompts)
    assert shared["pixel_values"].nbytes * n == per_row["pixel_values"].nbytes
    np.testing.assert_array_equal(shared["image_index"], np.repeat(np.arange(3), n))

    devices = int(np.prod(mesh_shape))
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:devices])
    model_def = ModelDef.create(config, dtype=jnp.float32)
    params = state_lib.load_params(path, model_def, mesh)
    cfg = step_lib.learner_config()
    cfg.micro_batches = micro_batches
    shardings = model_def.param_shardings(mesh)

    def logprobs(batch):
        placed = batch_lib.on_mesh(batch, mesh)
        return np.asarray(step_lib.make_logprob_step(model_def, cfg, shardings, mesh)(params, placed))

    got, want = logprobs(shared), logprobs(per_row)
    real = shared["loss_mask"] == 1
    assert np.isfinite(want[real]).all() and (want[real] < 0).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    if devices > 1:  # on_mesh padded the 3 images to the 4 batch devices, each holding one
        placed = batch_lib.on_mesh(shared, mesh)
        assert placed["pixel_values"].shape[0] == 4
        assert placed["pixel_values"].addressable_shards[0].data.shape[0] == 1


def test_update_with_shared_images_equals_per_row(groups):
    """The update step gives the same loss and gradient norm: mini-batches (the loop's row slices; the
    shared images go whole to each) of micro-batches that hold parts of groups."""
    from pr1.train.loop import _mini_batches

    path, config, prompts, completions, n = groups
    shared = batch_lib.learner_batch(config, prompts, completions, max_new_tokens=8, pad_token_id=0)
    per_row = _per_row(shared, prompts, completions, config)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model_def = ModelDef.create(config, dtype=jnp.float32)
    params = state_lib.load_params(path, model_def, mesh)
    cfg = step_lib.learner_config()
    cfg.micro_batches = 2
    tx = optax.sgd(1.0)
    rng = np.random.default_rng(0)
    current = step_lib.make_logprob_step(model_def, cfg, model_def.param_shardings(mesh), mesh)
    old = np.asarray(current(params, per_row))
    extra = {  # ratios around 1, so the clipped and unclipped branches both carry gradient
        "old_logprobs": (old + rng.normal(0, 0.2, old.shape) * per_row["loss_mask"]).astype(np.float32),
        "advantages": rng.standard_normal(len(completions)).astype(np.float32),
    }
    results = []
    for batch in (dict(shared, **extra), dict(per_row, **extra)):
        placed = batch_lib.on_mesh(batch, mesh)
        minis = _mini_batches(placed, 2, mesh)  # rows 0-5 and 6-11: prompt 1's group is split
        if "image_index" in batch:  # the shared images go whole to both mini-batches
            assert all(m["pixel_values"].shape[0] == len(prompts) for m in minis)
        metrics = []
        for mini in minis:  # each from the same state (the step donates its input state)
            state, shardings = state_lib.create_train_state(params, tx, model_def, mesh)
            step = step_lib.make_update_step(model_def, tx, cfg, shardings, mesh)
            metrics.append(jax.device_get(step(state, mini)[1]))
        results.append(metrics)
    for got, want in zip(*results):
        assert want["grad_norm"] > 0
        for key in ("loss", "grad_norm", "pg_clipfrac"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7)
