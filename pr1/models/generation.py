"""What generation takes and returns, for every engine and every caller: `SamplingParams`,
`Prompt`, `Completion`, the default stop tokens, and the chat template's image tokens.

These sit beside the model (not in `pr1.rollout`) because data builds prompts, engines consume
them and the learner trains on completions; each of those imports them from here, downward. The
engine interface that uses them is `pr1.rollout.RolloutEngine`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

FINISH_REASONS = ("stop", "length", "abort")

# The chat template's image tokens: a prompt's text holds one IMAGE_PAD per image between
# VISION_START and VISION_END; the processor expands each IMAGE_PAD to the image's feature count.
IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. `top_k <= 0` and `top_p >= 1` switch those filters off; `temperature == 0` is
    greedy (logprobs are then reported at temperature 1). `stop_token_ids=None` means the engine's
    default: the model's EOS and `<|im_end|>`."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 1024
    stop_token_ids: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"sampling temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def stop_ids(self, default: Sequence[int]) -> tuple[int, ...]:
        """The stop token ids to use: these params' own, or the engine's `default` when None."""
        stop = tuple(int(t) for t in (default if self.stop_token_ids is None else self.stop_token_ids))
        if not stop:
            raise ValueError("sampling.stop_token_ids is empty; pass None for the defaults (EOS, <|im_end|>)")
        return stop


@dataclasses.dataclass(frozen=True, eq=False)
class Prompt:
    """One tokenized prompt, in both forms an engine may want.

    `input_ids` [L] has each image's pad token expanded to its feature count (what the model sees);
    `text` is the chat-template prompt with one `<|image_pad|>` per image (what SGLang expands itself);
    `images` are the original images for engines that preprocess on their side; `pixel_values`
    [N, C·T·P·P] and `image_grid_thw` [k, 3] are our preprocessing of them (None without images).
    """

    input_ids: np.ndarray
    text: str
    images: tuple = ()
    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None

    @classmethod
    def build(
        cls, processor, question: str, images: Sequence[Any] = (), system: str | None = None
    ) -> "Prompt":
        batch = processor([question], [list(images)], system=system)
        return cls(
            input_ids=np.asarray(batch["input_ids"][0], np.int32),
            text=processor.prompt_text(question, len(images), system),
            images=tuple(images),
            pixel_values=batch["pixel_values"],
            image_grid_thw=None
            if batch["image_grid_thw"] is None
            else np.asarray(batch["image_grid_thw"], np.int64),
        )


@dataclasses.dataclass(eq=False)
class Completion:
    """One sampled response. `token_ids` include the stop token when one ended it (the learner must
    learn to stop); `text` is the decoded response without it."""

    prompt_index: int
    sample_index: int
    token_ids: np.ndarray  # int32 [R]
    logprobs: np.ndarray  # float32 [R], log_softmax(logits / T)[token]
    text: str
    finish_reason: str  # "stop" | "length" | "abort"
    weight_version: str | None = None


def default_stop_token_ids(tokenizer, config) -> tuple[int, ...]:
    """EOS from config.json and the chat template's `<|im_end|>`, deduplicated, in that order."""
    ids = []
    eos = config.hf_config.get(
        "eos_token_id", (config.hf_config.get("text_config") or {}).get("eos_token_id")
    )
    for value in eos if isinstance(eos, list) else [eos]:
        if value is not None:
            ids.append(int(value))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end is not None and im_end != tokenizer.unk_token_id:
        ids.append(int(im_end))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return tuple(dict.fromkeys(ids))
