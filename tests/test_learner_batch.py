"""The learner's batch treats a response exactly as the sampler did: a vision token the policy
sampled in its response is text (positions continue as in decoding, no image feature goes there)."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pr1 import sharding
from pr1.data.processor import Processor
from pr1.models.config import Qwen25VLConfig
from pr1.models.generation import Completion, Prompt
from pr1.models.model_def import ModelDef
from pr1.models.rope import decode_position_ids, rope_index
from pr1.models.tiny import write_tiny_checkpoint
from pr1.models.vision import LAYOUT_KEYS
from pr1.train import batch as batch_lib
from pr1.train import state as state_lib


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("lb") / "ckpt", seed=1)
    processor = Processor.from_dir(path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), np.uint8))
    prompt = Prompt.build(processor, "What is x?", [image])
    return path, processor, prompt


def _completion(tokens):
    tokens = np.asarray(tokens, np.int32)
    return Completion(
        prompt_index=0,
        sample_index=0,
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
    layout = {k: batch[k] for k in LAYOUT_KEYS}
    ids_j = jnp.asarray(ids)
    image_mask = (ids_j == config.image_token_id) & (jnp.asarray(batch["loss_mask"]) == 0)
    emb = model.embed(
        ids_j, jnp.asarray(batch["pixel_values"]), vision_layout_arrays=layout, image_mask=image_mask
    )
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
