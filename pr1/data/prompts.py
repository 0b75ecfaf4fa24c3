"""From a row's question to the text the model is asked: the paper's format instruction, image
placeholders removed, the processor's pixel limits from config.

Where it sits: the per-process iterator (`dataset.PromptIterator`) appends the instruction to each
row's question and tokenizes it (`Prompt.build`, chat template and image patches) in grain's
threads; evaluation and annotation append the same instruction (`with_instruction`), so every
caller asks the model the way training does.
"""

from __future__ import annotations

import copy
import re

# The paper's instruction (reference/paper.md, "Prompt"), appended to the user turn.
FORMAT_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final "
    "answer. The reasoning process MUST BE enclosed within <think> </think> tags, and the answer process "
    "MUST BE enclosed within <answer> </answer> tags. The final answer MUST BE put in \\boxed{} in "
    "<answer> </answer> tags."
)


def remove_image_placeholders(problem: str, placeholder: str = "<image>") -> str:
    """The question without its image placeholders (the images go before it in the chat template)."""
    if not placeholder:
        return problem.strip()
    text = problem.replace(placeholder, " ")
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def with_instruction(question: str, instruction: str) -> str:
    """`question + " " + instruction`: EasyR1's `{{ content | trim }} <instruction>`."""
    return f"{question.strip()} {instruction}" if instruction else question.strip()


def with_pixel_limits(processor, min_pixels, max_pixels):
    """`processor`, or a copy with config data.min_pixels / data.max_pixels where they are set."""
    if min_pixels is None and max_pixels is None:
        return processor
    lo = processor.min_pixels if min_pixels is None else int(min_pixels)
    hi = processor.max_pixels if max_pixels is None else int(max_pixels)
    if not 0 < lo <= hi:
        raise ValueError(f"config data.min_pixels/max_pixels: need 0 < min <= max, got {lo}, {hi}")
    processor = copy.copy(processor)
    processor.min_pixels, processor.max_pixels = lo, hi
    return processor
