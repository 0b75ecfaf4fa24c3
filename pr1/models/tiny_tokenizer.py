"""Tokenizer, chat template and image-processor files for the tiny Qwen2.5-VL checkpoint.

The tiny model (`config.tiny_hf_config()`, vocab 512) is what the debug mode and the tests train and
compare against transformers. A real Qwen2.5-VL tokenizer has 151k tokens and cannot be downloaded
here, so `write_tokenizer_files` builds a stand-in offline: a byte-level BPE with the Qwen2
pre-tokenizer, trained on a few KB of built-in text to exactly 500 regular tokens, plus the seven
special tokens the model and the chat template use at fixed ids 500..506 (image/video pad and vision
start/end at the ids config.json names). With config.json and weights next to them, the directory loads
through `transformers.AutoTokenizer` / `AutoProcessor` and through `pr1.data.processor.Processor`.

Every file is a pure function of the arguments: the `tokenizers` BPE trainer breaks frequency ties by
pair order, so a fixed corpus gives the same merges on any number of threads (checked with
RAYON_NUM_THREADS 1, 2 and 8), and JSON is written in a fixed key order; two calls give the same bytes.

transformers 5.23 cannot build `Qwen2_5_VLProcessor` without torchvision whatever files are written
(its video processor needs torchvision); the tests compare against it through
`tests.hf_reference.load_hf_processor`, which works around that for images only.
"""

from __future__ import annotations

import json
import os

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

NUM_REGULAR_TOKENS = 500

# Order matters: `add_special_tokens` appends them after the 500 regular tokens, so this list *is* the
# id assignment (500..506). The first four ids are the ones tiny_hf_config() names.
SPECIAL_TOKENS = (
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
)

# Qwen2's split regex (transformers' tokenization_qwen2.PRETOKENIZE_REGEX): digits are single tokens,
# letters group into words with an optional leading non-letter, case is preserved.
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Qwen2.5-VL's chat template, verbatim from the released checkpoints (chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The kind of text the model sees in this project (geometry and counting questions, LaTeX answers,
# the reasoning format tags, chat roles), so frequent pieces of prompts become single tokens and
# sequences in tests stay short.
CORPUS = r"""
You are a helpful assistant.
The system message tells the assistant how to answer; the user asks, the assistant answers the user.
system
user
assistant
system
user
assistant
system
user
assistant
A conversation between User and Assistant. The user asks a question, and the Assistant solves it.
The assistant first thinks about the reasoning process in the mind and then provides the user with the answer.
The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags.
<think> Let me look at the image carefully. </think> <answer> 3 </answer>
<think> The triangle has sides 3, 4 and 5, so it is a right triangle. </think><answer>\boxed{6}</answer>
Output the thinking process in <think> </think> and the final answer in <answer> </answer> tags.
Please put your final answer within \boxed{}.
Question: In the figure, AB is the diameter of circle O, and C is a point on the circle. If the angle BAC is 30 degrees, what is the angle ABC?
Answer: Since AB is a diameter, the angle ACB is 90 degrees. Therefore the angle ABC is 180 - 90 - 30 = 60 degrees. The answer is \boxed{60}.
Question: As shown in the figure, in triangle ABC, D and E are the midpoints of AB and AC. If BC = 8, find DE.
Answer: DE is the midline of the triangle, so DE = BC / 2 = 4. The answer is \boxed{4}.
Question: How many red objects are in the image? Count them one by one.
Answer: There are two red cubes and one red sphere, so there are 3 red objects in total.
Question: What is the area of the rectangle whose length is 12 and width is 7?
Answer: The area is 12 \times 7 = 84. The answer is \boxed{84}.
Question: Find the value of x if 2x + 5 = 17.
Answer: Subtract 5 from both sides: 2x = 12, then divide by 2: x = 6. \boxed{6}
Question: The radius of the circle is 5 cm. What is its circumference? Use \pi.
Answer: The circumference is 2 \pi r = 10 \pi cm, which is about 31.4 cm. \boxed{10\pi}
Question: In the right triangle ABC, angle C = 90 degrees, AC = 6 and BC = 8. What is AB?
Answer: By the Pythagorean theorem, AB = \sqrt{AC^2 + BC^2} = \sqrt{36 + 64} = \sqrt{100} = 10. \boxed{10}
Question: Lines a and b are parallel, and angle 1 = 50 degrees. What is angle 2?
Answer: Angle 1 and angle 2 are supplementary, so angle 2 = 180 - 50 = 130 degrees. \boxed{130}
Question: The sum of the interior angles of a polygon is 720 degrees. How many sides does it have?
Answer: (n - 2) \times 180 = 720, so n - 2 = 4 and n = 6. The polygon has 6 sides. \boxed{6}
Question: What is \frac{3}{4} + \frac{1}{8}?
Answer: \frac{3}{4} = \frac{6}{8}, so the sum is \frac{7}{8}. \boxed{\frac{7}{8}}
Question: A square has a diagonal of length 10. What is the area of the square?
Answer: The area of a square is half the square of its diagonal: 100 / 2 = 50. \boxed{50}
Question: In the parallelogram ABCD, angle A = 70 degrees. Find angle B.
Answer: Adjacent angles of a parallelogram are supplementary, so angle B = 110 degrees. \boxed{110}
Question: Is the number of blue cylinders greater than the number of yellow spheres?
Answer: There are 2 blue cylinders and 1 yellow sphere. Yes, the number is greater. \boxed{Yes}
Question: What is the perimeter of the triangle with sides 7, 8 and 9?
Answer: The perimeter is 7 + 8 + 9 = 24. \boxed{24}
Question: The point P is on the line y = 2x + 1 and its x coordinate is 3. What is its y coordinate?
Answer: y = 2 \cdot 3 + 1 = 7. \boxed{7}
Question: Which option is correct? Choices: (A) 30 (B) 45 (C) 60 (D) 90
Answer: The angle is 45 degrees, so the correct option is (B). \boxed{B}
Question: Point E lies on side CD of the square ABCD. If the area of triangle ABE is 18, what is the side length?
Answer: The area of triangle ABE is half of the area of the square, so the square has area 36 and side 6. \boxed{6}
Question: The tangent line touches the circle at point T. If OT = 3 and OP = 5, find PT.
Answer: The radius is perpendicular to the tangent, so PT = \sqrt{5^2 - 3^2} = \sqrt{16} = 4. \boxed{4}
Question: What fraction of the shapes in the picture are circles?
Answer: There are 8 shapes and 2 of them are circles, so the fraction is \frac{2}{8} = \frac{1}{4}. \boxed{\frac{1}{4}}
Question: In the figure, the chord AB has length 8 and the distance from O to AB is 3. What is the radius?
Answer: Half of the chord is 4, so the radius is \sqrt{4^2 + 3^2} = 5. \boxed{5}
Question: The ratio of two angles of a triangle is 2 : 3 and the third angle is 80 degrees. Find the smallest angle.
Answer: The other two angles sum to 100 degrees, so they are 40 and 60 degrees. The smallest is 40. \boxed{40}
Question: How many objects are left if you subtract all small balls and all large cubes?
Answer: There are 9 objects, 3 small balls and 2 large cubes, so 9 - 3 - 2 = 4 objects are left. \boxed{4}
Question: What is the volume of a cube with edge length 3?
Answer: The volume is 3^3 = 27. \boxed{27}
Question: The bar chart shows sales of 120, 150 and 90 units. What is the average?
Answer: (120 + 150 + 90) / 3 = 360 / 3 = 120. \boxed{120}
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 36 40 45 48 50 60 64 72 75 80 90 96 100 120 135 144 150 180 270 360
+ - = < > ( ) [ ] { } , . : ; ? ! ' " / \ ^ _ * % $ # @ & | ~
\angle \triangle \circ \sqrt{2} \sqrt{3} \frac{\sqrt{3}}{2} \pi \theta \alpha \beta \sin \cos \tan \le \ge \ne \parallel \perp
\boxed{A} \boxed{B} \boxed{C} \boxed{D} \boxed{0} \boxed{1} \boxed{2} \boxed{3}
"""


def _special(token: str) -> AddedToken:
    return AddedToken(token, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)


def build_tokenizer() -> Tokenizer:
    """The tiny byte-level BPE: 500 regular tokens trained on CORPUS, then the special tokens 500..506.

    The pipeline is Qwen2's (NFC, Qwen2 split regex, ByteLevel without its own regex, ByteLevel
    decoder and post-processor), so transformers' `Qwen2Tokenizer`, which rebuilds that pipeline around
    the vocab and merges, tokenizes exactly like the tokenizer.json written here.
    """
    tok = Tokenizer(
        models.BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # All 256 byte symbols are in the initial alphabet, so any text encodes without an unknown token.
    trainer = trainers.BpeTrainer(
        vocab_size=NUM_REGULAR_TOKENS,
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS.strip().splitlines(keepends=True), trainer=trainer)
    if tok.get_vocab_size() != NUM_REGULAR_TOKENS:
        raise RuntimeError(
            f"the built-in corpus yields {tok.get_vocab_size()} BPE tokens, "
            f"expected {NUM_REGULAR_TOKENS}; add text to CORPUS"
        )
    tok.add_special_tokens([_special(t) for t in SPECIAL_TOKENS])
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != NUM_REGULAR_TOKENS + i:
            raise RuntimeError(f"{t} got id {tok.token_to_id(t)}, expected {NUM_REGULAR_TOKENS + i}")
    return tok


def _tokenizer_config() -> dict:
    added = {
        str(NUM_REGULAR_TOKENS + i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        # As in the released tokenizer_config.json (transformers 5 reads it as extra_special_tokens).
        "additional_special_tokens": [
            "<|im_start|>",
            "<|im_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "processor_class": "Qwen2_5_VLProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _preprocessor_config(min_pixels: int, max_pixels: int) -> dict:
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": OPENAI_CLIP_MEAN,
        # The base name, as in the released files: AutoImageProcessor maps it to the torchvision class
        # or, without torchvision, to Qwen2VLImageProcessorPil (same numbers either way).
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": OPENAI_CLIP_STD,
        "merge_size": 2,
        "patch_size": 14,
        "processor_class": "Qwen2_5_VLProcessor",
        "resample": 3,  # PIL bicubic
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": max_pixels, "shortest_edge": min_pixels},
        "temporal_patch_size": 2,
    }


def _dump(path: str, obj: dict, sort_keys: bool = True) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=2, sort_keys=sort_keys, ensure_ascii=False)
        f.write("\n")


def write_tokenizer_files(
    out_dir: str | os.PathLike, *, min_pixels: int = 3136, max_pixels: int = 12845056
) -> list[str]:
    """Write tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, chat_template.jinja and
    preprocessor_config.json into the existing directory `out_dir`; returns the written paths.

    `min_pixels` / `max_pixels` bound the resized image area (preprocessor_config.json `size`); the
    defaults are the released checkpoints'. Tests pass small values to keep images to a few patches.
    """
    out_dir = os.fspath(out_dir)
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"{out_dir} is not a directory; create it (with config.json) first")
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(
            f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, max_pixels={max_pixels}"
        )
    tok = build_tokenizer()
    spec = json.loads(tok.to_str())
    written = []

    def path(name: str) -> str:
        written.append(os.path.join(out_dir, name))
        return written[-1]

    # The vocab keeps id order (as tokenizers serializes it) so the files read like the released ones.
    _dump(path("tokenizer.json"), spec, sort_keys=False)
    # vocab.json + merges.txt are what slow/older loaders read; they hold the regular tokens only.
    _dump(path("vocab.json"), spec["model"]["vocab"], sort_keys=False)
    with open(path("merges.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        for merge in spec["model"]["merges"]:
            f.write((merge if isinstance(merge, str) else " ".join(merge)) + "\n")
    _dump(path("tokenizer_config.json"), _tokenizer_config())
    # transformers 5 reads the template from chat_template.jinja for both the tokenizer and the
    # processor (chat_template.json and a tokenizer_config key are the legacy places).
    with open(path("chat_template.jinja"), "w", encoding="utf-8", newline="\n") as f:
        f.write(CHAT_TEMPLATE)
    _dump(path("preprocessor_config.json"), _preprocessor_config(min_pixels, max_pixels))
    # No video_preprocessor_config.json: AutoVideoProcessor falls back to preprocessor_config.json, and
    # no file content lets it load without torchvision (see tests.hf_reference.load_hf_processor).
    return written
