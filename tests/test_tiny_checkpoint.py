"""The tiny checkpoint dir: transformers and pr1 both load it, and agree on a real processed prompt."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from pr1.data.processor import Processor
from pr1.models import hf
from pr1.models.tiny import write_tiny_checkpoint
from tests.hf_reference import hf_logits


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=3)


def test_cli_writes_a_loadable_dir(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run(
        [sys.executable, "-m", "pr1.models.tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 0, res.stderr
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert hf.load(out, dtype=jnp.float32).config.text.vocab_size == 512


@pytest.fixture(scope="module")
def vllm_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-vllm") / "ckpt", seed=3, preset="vllm")


def test_vllm_preset_has_servable_heads(vllm_dir):
    """vLLM's CPU attention takes head sizes 32, 64, 80+: the vllm preset must have 32-dim heads, one KV
    head per two query heads, and a rotary split that covers them, with the default tokenizer."""
    import json

    with open(f"{vllm_dir}/config.json") as f:
        text = json.load(f)["text_config"]
    assert text["hidden_size"] // text["num_attention_heads"] == 32
    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (2, 1)
    assert text["rope_parameters"]["mrope_section"] == [4, 6, 6]
    config = hf.load(vllm_dir, dtype=jnp.float32).config
    assert config.text.head_dim == 32 and config.text.vocab_size == 512
    assert Processor.from_dir(vllm_dir).prompt_text("Hi", 0).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("preset", ["default", "vllm"])
def test_transformers_and_pr1_agree_on_processed_prompt(preset, tiny_dir, vllm_dir):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tiny_dir = {"default": tiny_dir, "vllm": vllm_dir}[preset]

    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_dir, attn_implementation="eager", dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert tok.convert_tokens_to_ids("<|image_pad|>") == ref.config.image_token_id
    processor = Processor.from_dir(tiny_dir)
    rng = np.random.default_rng(0)
    images = [
        [Image.fromarray(rng.integers(0, 255, (300, 420, 3), np.uint8))],
        [Image.fromarray(rng.integers(0, 255, (120, 90, 3), np.uint8))],
    ]
    batch = processor(["What is the length of AB?", "How many circles?"], images)
    model = hf.load(tiny_dir, dtype=jnp.float32)
    got = np.asarray(
        model(
            jnp.asarray(batch["input_ids"]),
            position_ids=jnp.asarray(batch["position_ids"]),
            attention_mask=jnp.asarray(batch["attention_mask"]),
            pixel_values=jnp.asarray(batch["pixel_values"]),
            image_grid_thw=batch["image_grid_thw"],
        )
    )
    expected = hf_logits(
        ref, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"]
    )
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[valid], expected[valid], rtol=0, atol=1e-4)


def test_kv_cache_decode_matches_full_forward(tiny_dir):
    """Prefill a left-padded batch with an image into the cache, then decode token by token: each step's
    logits equal the full forward over prompt + generated tokens (positions = cache index + delta)."""
    from pr1.models.rope import decode_position_ids, rope_index

    model = hf.load(tiny_dir, dtype=jnp.float32)
    processor = Processor.from_dir(tiny_dir)
    rng = np.random.default_rng(1)
    images = [[Image.fromarray(rng.integers(0, 255, (200, 260, 3), np.uint8))], None]
    batch = processor(["Describe the figure.", "Say hello in one long sentence please."], images)
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    b, prompt_len = ids.shape
    steps, slots = 5, prompt_len + 8
    cache = model.init_cache(b, slots)
    slot_mask = np.zeros((b, slots), np.int32)
    slot_mask[:, :prompt_len] = mask
    logits, cache = model(
        jnp.asarray(ids),
        position_ids=jnp.asarray(pos),
        attention_mask=jnp.asarray(slot_mask),
        pixel_values=jnp.asarray(batch["pixel_values"]),
        image_grid_thw=batch["image_grid_thw"],
        cache=cache,
        cache_index=0,
    )
    decode = jax.jit(
        lambda m, tok, p, am, c, i: m(tok, position_ids=p, attention_mask=am, cache=c, cache_index=i)
    )
    generated = []
    step_logits = [np.asarray(logits[:, -1])]
    for s in range(steps):
        nxt = np.asarray(step_logits[-1]).argmax(-1).astype(np.int32)[:, None]
        generated.append(nxt)
        index = prompt_len + s
        slot_mask[:, index] = 1
        p = decode_position_ids(mask.sum(1) + s, batch["rope_deltas"])
        out, cache = decode(model, jnp.asarray(nxt), jnp.asarray(p), jnp.asarray(slot_mask), cache, index)
        step_logits.append(np.asarray(out[:, -1]))

    full_ids = np.concatenate([ids] + generated, axis=1)
    full_mask = np.concatenate([mask, np.ones((b, steps), mask.dtype)], axis=1)
    full_pos, _ = rope_index(model.config, full_ids, batch["image_grid_thw"], full_mask)
    full = np.asarray(
        model(
            jnp.asarray(full_ids),
            position_ids=jnp.asarray(full_pos),
            attention_mask=jnp.asarray(full_mask),
            pixel_values=jnp.asarray(batch["pixel_values"]),
            image_grid_thw=batch["image_grid_thw"],
        )
    )
    for s in range(steps + 1):
        np.testing.assert_allclose(step_logits[s], full[:, prompt_len - 1 + s], rtol=0, atol=1e-5)


def test_jitted_forward_with_precomputed_vision_layout(tiny_dir):
    """Under jit the image sizes are not concrete: the host-side vision layout is passed in as arrays."""
    from flax import nnx

    from pr1.models.vision import vision_layout

    model = hf.load(tiny_dir, dtype=jnp.float32)
    processor = Processor.from_dir(tiny_dir)
    rng = np.random.default_rng(2)
    batch = processor(
        ["Which angle is largest?"], [[Image.fromarray(rng.integers(0, 255, (230, 310, 3), np.uint8))]]
    )
    layout = vision_layout(batch["image_grid_thw"], model.config.vision)
    args = dict(
        position_ids=jnp.asarray(batch["position_ids"]),
        attention_mask=jnp.asarray(batch["attention_mask"]),
        pixel_values=jnp.asarray(batch["pixel_values"]),
    )
    eager = model(jnp.asarray(batch["input_ids"]), image_grid_thw=batch["image_grid_thw"], **args)
    jitted = nnx.jit(lambda m, ids, lay, kw: m(ids, vision_layout_arrays=lay, **kw))(
        model, jnp.asarray(batch["input_ids"]), layout, args
    )
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=0, atol=1e-5)
