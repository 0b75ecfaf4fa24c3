"""Prompt + image → model inputs for Qwen2.5-VL, on the host (NumPy and PIL, no torch).

Data flow: a dataset row (question, images) → `Processor.__call__` → a dict of NumPy arrays
(`input_ids`, `attention_mask`, `pixel_values`, `image_grid_thw`, `position_ids`, `rope_deltas`) that the
rollout / training step puts on device and feeds to the Flax model. It reproduces transformers'
`Qwen2_5_VLProcessor` with the PIL image processor `Qwen2VLImageProcessorPil` value for value (the tests
compare them), so a checkpoint sees the inputs it was trained on. The MRoPE position ids depend on
where the image tokens are, so they are computed here too (`pr1.models.rope.rope_index`), outside jit.

Batches are LEFT-padded: generation appends tokens on the right, so every row's last prompt token
must sit in the last column.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from pr1.images import ImageLike, load_rgb
from pr1.models.config import Qwen25VLConfig
from pr1.models.generation import IMAGE_PAD, VISION_END, VISION_START
from pr1.models.rope import rope_index

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


MAX_ASPECT_RATIO = 200  # Qwen2.5-VL's image processor refuses longer-to-shorter side ratios above this


def check_image_size(height: int, width: int) -> None:
    """ValueError for a size the processor cannot resize (`smart_resize`'s limits); the data loader
    checks image headers against it when a file opens."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image aspect ratio {ratio:.1f} (height={height}, width={width}) exceeds "
            f"{MAX_ASPECT_RATIO}; crop or pad the image first"
        )


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 3136, max_pixels: int = 1806336
) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Each side is rounded to the nearest multiple; if the area is then too large both sides shrink by
    the same factor (rounded down), if too small they grow (rounded up). Same arithmetic as
    transformers' `smart_resize`, including Python's round-half-to-even.
    """
    check_image_size(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_image(
    image: ImageLike,
    *,
    min_pixels: int,
    max_pixels: int,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """One image → (pixel_values float32 [N, 3·T·P·P], grid_thw int64 [1, H/P, W/P]).

    The image is bicubic-resized to `smart_resize`, scaled to [0, 1], CLIP-normalized and repeated over
    T = temporal_patch_size frames (a still image fills the video patch embedding's time axis). Rows are
    P×P patches ordered by merge_size×merge_size block (the merger joins consecutive rows), each row
    flattened in (C, T, P, P) order to match the Conv3d weight.
    """
    rgb = load_rgb(image)
    height, width = rgb.shape[:2]
    factor = patch_size * merge_size
    new_h, new_w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    # Resampling uint8 through PIL (not float) is what transformers does; float resizing differs by
    # rounding and clipping.
    rgb = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
    # float64 scaling then float32, then float32 normalization: transformers' exact dtype steps.
    x = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(OPENAI_CLIP_MEAN, np.float32)) / np.asarray(OPENAI_CLIP_STD, np.float32)

    gh, gw, m, p = new_h // patch_size, new_w // patch_size, merge_size, patch_size
    x = x.reshape(gh // m, m, p, gw // m, m, p, 3)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # (block row, block col, row in block, col in block, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (temporal_patch_size, p, p))
    pixel_values = np.ascontiguousarray(x.reshape(gh * gw, 3 * temporal_patch_size * p * p), dtype=np.float32)
    return pixel_values, np.array([1, gh, gw], dtype=np.int64)


class Processor:
    """Tokenizer + image preprocessing + position ids for one checkpoint directory."""

    def __init__(
        self,
        tokenizer: Any,
        config: Qwen25VLConfig,
        *,
        min_pixels: int,
        max_pixels: int,
        source: str = "<in memory>",
    ):
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"{source}: need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
        self.tokenizer = tokenizer
        self.config = config
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.source = source

        def token_id(token: str, expected: int | None, key: str) -> int:
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"{source}: the tokenizer has no {token} token")
            if expected is not None and tid != expected:
                raise ValueError(
                    f"{source}: the tokenizer maps {token} to id {tid} but config.json {key} is {expected}"
                )
            return tid

        self.image_token_id = token_id(IMAGE_PAD, config.image_token_id, "image_token_id")
        token_id(VISION_START, config.vision_start_token_id, "vision_start_token_id")
        token_id(VISION_END, config.vision_end_token_id, "vision_end_token_id")
        if tokenizer.pad_token_id is None:
            raise ValueError(f"{source}: the tokenizer has no pad token (tokenizer_config.json pad_token)")
        self.pad_token_id = int(tokenizer.pad_token_id)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"{source}: the tokenizer has no chat template (chat_template.jinja)")

    @classmethod
    def from_dir(
        cls, path: str | os.PathLike, *, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> "Processor":
        """Load tokenizer, preprocessor_config.json and config.json from a local checkpoint directory.

        `min_pixels` / `max_pixels` override the file's image area limits (e.g. to cap memory).
        """
        import transformers  # Heavy import; only needed to build the tokenizer.

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"{path} is not a directory; Processor.from_dir needs a local checkpoint dir"
            )
        config = Qwen25VLConfig.from_dir(path)
        pre_file = os.path.join(path, "preprocessor_config.json")
        pre: dict = {}
        if os.path.exists(pre_file):
            with open(pre_file) as f:
                pre = json.load(f)
        size = pre.get("size") or {}
        # transformers 5 writes size.{shortest,longest}_edge; released hub files have min/max_pixels.
        file_min = size.get("shortest_edge", pre.get("min_pixels"))
        file_max = size.get("longest_edge", pre.get("max_pixels"))
        min_pixels = file_min if min_pixels is None else min_pixels
        max_pixels = file_max if max_pixels is None else max_pixels
        if min_pixels is None or max_pixels is None:
            raise ValueError(
                f"{pre_file}: no size.shortest_edge/longest_edge (or min_pixels/max_pixels); "
                "pass min_pixels= and max_pixels= to Processor.from_dir"
            )
        vision = config.vision
        for key, expected in (
            ("patch_size", vision.patch_size),
            ("merge_size", vision.spatial_merge_size),
            ("temporal_patch_size", vision.temporal_patch_size),
        ):
            if key in pre and int(pre[key]) != expected:
                raise ValueError(
                    f"{pre_file}: {key} is {pre[key]} but config.json's vision_config says {expected}"
                )
        for key, expected in (("image_mean", OPENAI_CLIP_MEAN), ("image_std", OPENAI_CLIP_STD)):
            if key in pre and not np.allclose(pre[key], expected):
                raise ValueError(
                    f"{pre_file}: {key} is {pre[key]}; only the CLIP values {list(expected)} are supported"
                )
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(tokenizer, config, min_pixels=int(min_pixels), max_pixels=int(max_pixels), source=path)

    def prompt_text(self, question: str, num_images: int = 1, system: str | None = None) -> str:
        """The chat-template prompt: images first, then the question, ending with the assistant turn."""
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def preprocess_image(self, image: ImageLike) -> tuple[np.ndarray, np.ndarray]:
        vision = self.config.vision
        return preprocess_image(
            image,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
        )

    def __call__(
        self,
        questions: Sequence[str],
        images: Sequence[Sequence[ImageLike] | None] | None = None,
        *,
        pad_to: int | None = None,
        system: str | None = None,
    ) -> dict[str, np.ndarray | None]:
        """Tokenize a batch of questions with their images into left-padded model inputs.

        `images[i]` are the images of `questions[i]` (placed before the question), or None / [] for none.
        Returns input_ids / attention_mask int32 [B, T], pixel_values float32 [N, 1176] and
        image_grid_thw int64 [N, 3] for all images in batch order (None without images),
        position_ids int64 [3, B, T] and rope_deltas int64 [B]. `pad_to` fixes T (e.g. to avoid
        recompiling for every prompt length).
        """
        if isinstance(questions, str):
            raise TypeError("questions must be a list of strings, got a single string")
        questions = list(questions)
        if not questions:
            raise ValueError("questions is empty")
        if images is None:
            images = [None] * len(questions)
        if len(images) != len(questions):
            raise ValueError(f"got {len(questions)} questions but {len(images)} image lists")
        merge_area = self.config.vision.spatial_merge_size**2

        rows, all_pixels, all_grids = [], [], []
        for i, (question, row_images) in enumerate(zip(questions, images)):
            if isinstance(row_images, (str, bytes, Image.Image, np.ndarray)):
                raise TypeError(
                    f"images[{i}] must be a list of images for question {i}, got a single "
                    f"{type(row_images).__name__}"
                )
            row_images = list(row_images or [])
            ids = self.tokenizer(
                self.prompt_text(question, len(row_images), system), add_special_tokens=False
            )["input_ids"]
            slots = [k for k, t in enumerate(ids) if t == self.image_token_id]
            if len(slots) != len(row_images):
                raise ValueError(
                    f"question {i} has {len(slots)} {IMAGE_PAD} placeholders but {len(row_images)} "
                    f"images (does the question text itself contain {IMAGE_PAD}?)"
                )
            counts = []
            for j, image in enumerate(row_images):
                try:
                    pixels, grid = self.preprocess_image(image)
                except (ValueError, TypeError, FileNotFoundError) as e:
                    raise type(e)(f"question {i}, image {j}: {e}") from None
                all_pixels.append(pixels)
                all_grids.append(grid)
                counts.append(int(np.prod(grid)) // merge_area)
            # Expand on ids rather than on the string: the surrounding text tokenizes the same either
            # way (special tokens are split out first), and this cannot misfire on user text.
            expanded, next_count = [], iter(counts)
            for t in ids:
                expanded.extend([t] * next(next_count) if t == self.image_token_id else [t])
            rows.append(expanded)

        longest = max(len(r) for r in rows)
        length = longest if pad_to is None else int(pad_to)
        if length < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest prompt ({longest} tokens)")
        input_ids = np.full((len(rows), length), self.pad_token_id, np.int32)
        attention_mask = np.zeros((len(rows), length), np.int32)
        for b, row in enumerate(rows):
            input_ids[b, length - len(row) :] = row
            attention_mask[b, length - len(row) :] = 1

        pixel_values = np.concatenate(all_pixels, axis=0) if all_pixels else None
        image_grid_thw = np.stack(all_grids).astype(np.int64) if all_grids else None
        position_ids, rope_deltas = rope_index(self.config, input_ids, image_grid_thw, attention_mask)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "image_grid_thw": image_grid_thw,
            "position_ids": position_ids,
            "rope_deltas": rope_deltas,
        }
