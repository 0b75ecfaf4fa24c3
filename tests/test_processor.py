"""pr1.data.processor and the tiny tokenizer files against transformers' Qwen2.5-VL processor (offline)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import tokenizers
import transformers
from PIL import Image
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_pil

from pr1.data.processor import Processor, preprocess_image, smart_resize
from pr1.models.config import tiny_hf_config
from pr1.models.rope import rope_index
from pr1.models.tiny_tokenizer import SPECIAL_TOKENS, write_tokenizer_files
from tests.hf_reference import load_hf_processor

# Small limits keep images at a few dozen patches; the sizes below hit each branch of smart_resize.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 16
SIZES = {
    "in_range": (60, 90),  # rounds to 56x84, no rescale
    "max_pixels": (300, 500),  # 308x504 is over MAX_PIXELS: scaled down
    "min_pixels": (20, 30),  # 28x28 is under MIN_PIXELS: scaled up
    "exact": (56, 112),  # already multiples of 28
}


def random_image(height, width, seed):
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen25vl")
    (path / "config.json").write_text(json.dumps(tiny_hf_config(), indent=2))
    write_tokenizer_files(path, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return path


@pytest.fixture(scope="module")
def hf_processor(tiny_dir):
    return load_hf_processor(tiny_dir)


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return Processor.from_dir(tiny_dir)


# ---- image preprocessing ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SIZES))
def test_pixel_values_match_transformers_pil(name):
    height, width = SIZES[name]
    image = random_image(height, width, seed=len(name))
    hf = hf_pil.Qwen2VLImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    want = hf(images=[Image.fromarray(image)], return_tensors="np")
    pixels, grid = preprocess_image(image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(grid[None], want["image_grid_thw"])
    assert pixels.dtype == np.float32 and pixels.shape == want["pixel_values"].shape
    np.testing.assert_allclose(pixels, want["pixel_values"], rtol=0, atol=1e-5)
    rounded = (round(height / 28) * 28, round(width / 28) * 28)
    resized = (grid[1] * 14, grid[2] * 14)
    if name == "max_pixels":
        assert resized[0] * resized[1] <= MAX_PIXELS < rounded[0] * rounded[1]
    if name == "min_pixels":
        assert rounded[0] * rounded[1] < MIN_PIXELS <= resized[0] * resized[1]


def test_every_image_input_type_gives_the_same_pixels(tmp_path):
    image = random_image(45, 70, seed=7)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    (tmp_path / "x.png").write_bytes(png.getvalue())
    kw = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    want, grid = preprocess_image(image, **kw)
    for source in (
        Image.fromarray(image),
        png.getvalue(),
        str(tmp_path / "x.png"),
        tmp_path / "x.png",
        Image.fromarray(image).convert("RGBA"),
    ):
        got, got_grid = preprocess_image(source, **kw)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_grid, grid)


def test_transparent_and_gray_images_match_transformers():
    rng = np.random.RandomState(3)
    rgba = Image.fromarray(rng.randint(0, 256, (50, 64, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.randint(0, 256, (50, 64), dtype=np.uint8), "L")
    hf = hf_pil.Qwen2VLImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    for image in (rgba, gray):
        want = hf(images=[image], return_tensors="np")["pixel_values"]
        got, _ = preprocess_image(image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_smart_resize_matches_transformers():
    cases = [
        (h, w)
        for h in (1, 13, 14, 27, 28, 41, 42, 43, 70, 99, 224, 1000, 3001)
        for w in (1, 28, 42, 56, 71, 640, 4000)
    ]
    cases += [(1, 200), (200, 1), (3, 600), (28, 5600)]  # aspect ratio exactly 200 is allowed
    limits = [(3136, 1806336), (56 * 56, 28 * 28 * 16), (28 * 28 * 4, 28 * 28 * 1280), (100, 100_000)]
    for height, width in cases:
        if max(height, width) / min(height, width) > 200:
            continue
        for min_pixels, max_pixels in limits:
            want = hf_pil.smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
            got = smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
            assert got == tuple(want), (height, width, min_pixels, max_pixels)
    # round-half-to-even, as Python's round in the reference: 42 = 1.5 * 28 -> 56, 70 = 2.5 * 28 -> 56
    assert smart_resize(42, 70, min_pixels=1, max_pixels=10**9) == (56, 56)
    assert smart_resize(10, 10) == (56, 56)


def test_aspect_ratio_over_200_raises():
    with pytest.raises(ValueError, match=r"aspect ratio 201\.0"):
        smart_resize(1, 201)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(5000, 20)
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_image(np.zeros((2, 500, 3), np.uint8), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


# ---- tokenizer files --------------------------------------------------------------------------


def test_tokenizer_files_load_and_round_trip(tiny_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(500, 507))
    cfg = tiny_hf_config()
    assert len(tok) == 507 <= cfg["text_config"]["vocab_size"]
    assert tok.convert_tokens_to_ids("<|image_pad|>") == cfg["image_token_id"]
    assert tok.convert_tokens_to_ids("<|vision_start|>") == cfg["vision_start_token_id"]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for text in [
        "Find the angle ABC if AB = 3 and BC = 4.",
        "<think> 2 + 2 = 4 </think><answer>\\boxed{4}</answer>",
        "  Mixed CASE,\ttabs\nand newlines\r\n",
        "unicode: 直角三角形 é ∠ ≤ 😀",
        "",
        "1234567890",
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>",
    ]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert max(ids, default=0) < 507
        assert tok.decode(ids) == text
    # tokenizer.json on its own (tokenizers, no transformers) encodes like the Qwen2Tokenizer that
    # transformers rebuilds from vocab and merges
    raw = tokenizers.Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    for text in ["Question: what is \\frac{3}{4}?\n<answer> 12 </answer>", "<|im_start|>assistant\n"]:
        assert raw.encode(text).ids == tok(text, add_special_tokens=False)["input_ids"]
    # no lowercasing, and the regular vocabulary is all 500 ids below the specials
    assert tok("ABC")["input_ids"] != tok("abc")["input_ids"]
    assert sorted(tok.get_vocab().values()) == list(range(507))


def test_tokenizer_files_are_deterministic(tiny_dir, tmp_path):
    # Another process, thread count and hash seed than the fixture's files: BPE training must not
    # depend on any of them.
    code = (
        f"from pr1.models.tiny_tokenizer import write_tokenizer_files; "
        f"write_tokenizer_files({str(tmp_path)!r}, min_pixels={MIN_PIXELS}, max_pixels={MAX_PIXELS})"
    )
    env = dict(os.environ, RAYON_NUM_THREADS="1", PYTHONHASHSEED="123")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).resolve().parents[1])
    names = sorted(p for p in os.listdir(tmp_path))
    assert "chat_template.jinja" in names and "preprocessor_config.json" in names
    for name in names:
        assert (tmp_path / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_auto_processor_resolves_to_qwen25vl_with_pil_images(hf_processor):
    assert type(hf_processor).__name__ == "Qwen2_5_VLProcessor"
    assert type(hf_processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert hf_processor.image_processor.size["shortest_edge"] == MIN_PIXELS
    assert hf_processor.image_processor.size["longest_edge"] == MAX_PIXELS


# ---- prompts and batches against the transformers processor -----------------------------------


def messages(question, num_images, system=None):
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    out = [{"role": "user", "content": content}]
    return ([{"role": "system", "content": system}] if system else []) + out


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_prompt_and_ids_match_auto_processor(processor, hf_processor, num_images):
    question = "In the figure, AB is a diameter. What is the angle ACB?"
    images = [random_image(*SIZES[k], seed=i) for i, k in enumerate(["in_range", "max_pixels"][:num_images])]
    text = hf_processor.apply_chat_template(
        messages(question, num_images), tokenize=False, add_generation_prompt=True
    )
    assert processor.prompt_text(question, num_images) == text
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith(f"{question}<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == num_images

    want = hf_processor(
        text=[text], images=[Image.fromarray(im) for im in images] or None, return_tensors="np"
    )
    got = processor([question], [images])
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    assert got["input_ids"].dtype == np.int32 and got["attention_mask"].dtype == np.int32
    if num_images:
        np.testing.assert_array_equal(got["image_grid_thw"], want["image_grid_thw"])
        assert got["image_grid_thw"].dtype == np.int64
        np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], rtol=0, atol=1e-5)
        n_pad = int(np.sum(want["image_grid_thw"].prod(-1) // 4))
        assert int(np.sum(got["input_ids"] == 500)) == n_pad
    else:
        assert got["pixel_values"] is None and got["image_grid_thw"] is None


def test_system_prompt_matches_auto_processor(processor, hf_processor):
    want = hf_processor.apply_chat_template(
        messages("Count the cubes.", 1, system="Answer briefly."), tokenize=False, add_generation_prompt=True
    )
    assert processor.prompt_text("Count the cubes.", 1, system="Answer briefly.") == want
    assert "You are a helpful assistant." not in want


def test_left_padded_batch_matches_auto_processor(processor, hf_processor):
    questions = ["Compare the two figures: which triangle is larger?", "What is x?"]
    images = [
        [random_image(*SIZES["in_range"], seed=1), random_image(*SIZES["min_pixels"], seed=2)],
        [random_image(*SIZES["exact"], seed=3)],
    ]
    texts = [
        hf_processor.apply_chat_template(messages(q, len(ims)), tokenize=False, add_generation_prompt=True)
        for q, ims in zip(questions, images)
    ]
    want = hf_processor(
        text=texts,
        images=[Image.fromarray(im) for ims in images for im in ims],
        padding=True,
        padding_side="left",
        return_tensors="np",
    )
    got = processor(questions, images)
    for key in ("input_ids", "attention_mask", "image_grid_thw"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], rtol=0, atol=1e-5)


# ---- padding and position ids -----------------------------------------------------------------


def test_left_padding_and_position_ids(processor):
    questions = ["Short?", "A much longer question about the two circles and the tangent line?", "No image."]
    images = [
        [random_image(*SIZES["in_range"], seed=4)],
        [random_image(*SIZES["exact"], seed=5), random_image(*SIZES["min_pixels"], seed=6)],
        None,
    ]
    out = processor(questions, images, pad_to=96)
    ids, mask, pos = out["input_ids"], out["attention_mask"], out["position_ids"]
    assert ids.shape == mask.shape == (3, 96) and pos.shape == (3, 3, 96) and out["rope_deltas"].shape == (3,)
    grids = out["image_grid_thw"]
    assert grids.shape == (3, 3) and out["pixel_values"].shape == (int(grids.prod(-1).sum()), 1176)
    np.testing.assert_array_equal(mask[:, -1], 1)  # every prompt ends in the last column
    rows_grids = [grids[:1], grids[1:3], None]
    for b in range(3):
        n = int(mask[b].sum())
        # padding is a prefix: zeros then ones, pad token id under the zeros
        np.testing.assert_array_equal(mask[b], np.r_[np.zeros(96 - n), np.ones(n)].astype(np.int32))
        np.testing.assert_array_equal(ids[b, : 96 - n], processor.pad_token_id)
        assert ids[b, 96 - n] == 505  # <|im_start|>
        np.testing.assert_array_equal(pos[:, b, : 96 - n], 0)
        # positions of the real tokens do not depend on how much padding precedes them
        want_pos, want_delta = rope_index(processor.config, ids[b : b + 1, 96 - n :], rows_grids[b])
        np.testing.assert_array_equal(pos[:, b, 96 - n :], want_pos[:, 0])
        assert out["rope_deltas"][b] == want_delta[0]
    want_pos, want_deltas = rope_index(processor.config, ids, grids, mask)
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_array_equal(out["rope_deltas"], want_deltas)
    assert out["rope_deltas"][2] == 0 and out["rope_deltas"][0] < 0  # image blocks compress positions

    unpadded = processor(questions, images)
    assert unpadded["input_ids"].shape[1] == int(mask.sum(1).max())
    np.testing.assert_array_equal(unpadded["input_ids"], ids[:, 96 - unpadded["input_ids"].shape[1] :])


def test_errors_name_the_problem(processor, tiny_dir):
    image = random_image(*SIZES["in_range"], seed=0)
    with pytest.raises(ValueError, match="2 questions but 1 image lists"):
        processor(["a", "b"], [[image]])
    with pytest.raises(ValueError, match=r"question 0 has 2 <\|image_pad\|> placeholders but 1 images"):
        processor(["look: <|image_pad|>"], [[image]])
    with pytest.raises(TypeError, match="list of images"):
        processor(["a"], [image])
    with pytest.raises(TypeError, match="list of strings"):
        processor("a")
    with pytest.raises(ValueError, match="pad_to=4 is shorter"):
        processor(["a"], pad_to=4)
    with pytest.raises(FileNotFoundError, match="question 0, image 0: image file /nonexistent.png not found"):
        processor(["a"], [["/nonexistent.png"]])
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        Processor.from_dir(tiny_dir / "missing")


def test_from_dir_pixel_overrides(tiny_dir):
    small = Processor.from_dir(tiny_dir, max_pixels=28 * 28 * 4)
    assert (small.min_pixels, small.max_pixels) == (MIN_PIXELS, 28 * 28 * 4)
    out = small(["q"], [[random_image(*SIZES["max_pixels"], seed=0)]])
    assert int(out["image_grid_thw"].prod()) <= 4 * 4
