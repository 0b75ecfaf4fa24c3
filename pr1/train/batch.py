"""From rollouts to the learner's batch: prompt + response rows at static, bucketed shapes (host side).

Row r holds prompt p's ids left-padded to the prompt bucket, then completion r's ids right-padded to
the response bucket: a power of two >= the step's longest completion, at most `max_new_tokens`. So
the response always starts at the same column, rows are only as long as the step's real lengths
need (not the configured maxima), and a run compiles one update per (prompt, response) bucket pair.
The loss mask covers exactly the sampled tokens (including a final stop token);
`rollout_logprobs` are the engine's logprobs of those tokens at the same columns.

Images are stored once per prompt, not once per response: the `vision.IMAGE_KEYS` arrays have one
entry per distinct prompt of the rows (`batched_vision_inputs` over those prompts) and `image_index`
[B] names row b's entry. The jitted steps gather each micro-batch's rows on the device
(`vision.rows_of_images`), so rows can still be split into micro-batches and sharded freely, while
the host holds and transfers 1/n of the pixels (n responses per prompt).

With several processes each builds the rows of its own prompts; the buckets come from maxima over
all processes (`batch_extents` → `pr1.distributed.max_over_processes`), so every process builds the
same shapes, and `on_mesh` assembles the global arrays the jitted steps take.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from pr1 import distributed
from pr1 import sharding as sharding_lib
from pr1.models.config import Qwen25VLConfig
from pr1.models.generation import Completion, Prompt
from pr1.models.rope import decode_position_ids, rope_index
from pr1.models.vision import IMAGE_KEYS, batched_vision_inputs, patch_bucket, patch_slots
from pr1.rollout.sampler import bucket
from pr1.train import step as step_lib


def batch_extents(
    prompts: Sequence[Prompt], completions: Sequence[Completion], config: Qwen25VLConfig
) -> tuple[int, int, int, int]:
    """(longest prompt, most image patch slots of a prompt, longest completion, distinct prompts) over
    `completions`."""
    rows = [prompts[c.prompt_index] for c in completions]
    return (
        max((len(p.input_ids) for p in rows), default=0),
        max((patch_slots(p.image_grid_thw, config.vision) for p in rows), default=0),
        max((len(c.token_ids) for c in completions), default=0),
        len({c.prompt_index for c in completions}),
    )


def learner_batch(
    config: Qwen25VLConfig,
    prompts: Sequence[Prompt],
    completions: Sequence[Completion],
    *,
    max_new_tokens: int,
    pad_token_id: int,
    min_prompt_bucket: int = 64,
    min_patch_bucket: int = 256,
    min_response_bucket: int = 64,
    extents: tuple[int, ...] = (0, 0, 0, 0),
    pixel_dtype=np.float32,
) -> dict[str, np.ndarray]:
    """The batch of `pr1.train.step` (without old_logprobs / advantages) for `completions`.

    `extents`: at least this (longest prompt, most patch slots, longest completion, distinct
    prompts) is padded for; several processes pass the maxima over all of them (see
    `batch_extents`), so they all reach the same buckets and image counts. `pixel_dtype`: bf16
    (ml_dtypes) when the model computes in bf16.
    """
    rows = len(completions)
    longest, most_patches, longest_response, most_images = (tuple(extents) + (0, 0, 0, 0))[:4]
    prompt_len = bucket(
        max([longest] + [len(prompts[c.prompt_index].input_ids) for c in completions]), min_prompt_bucket
    )
    response = max([longest_response] + [len(c.token_ids) for c in completions])
    response_len = min(bucket(response, min_response_bucket), max_new_tokens)
    length = prompt_len + response_len
    ids = np.full((rows, length), pad_token_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    loss_mask = np.zeros((rows, length), np.int32)
    rollout_logprobs = np.zeros((rows, length), np.float32)
    for r, c in enumerate(completions):
        p = prompts[c.prompt_index].input_ids
        n = len(c.token_ids)
        if n > max_new_tokens:
            raise ValueError(f"completion {r} has {n} tokens, more than max_new_tokens={max_new_tokens}")
        ids[r, prompt_len - len(p) : prompt_len] = p
        ids[r, prompt_len : prompt_len + n] = c.token_ids
        mask[r, prompt_len - len(p) : prompt_len + n] = 1
        loss_mask[r, prompt_len : prompt_len + n] = 1
        rollout_logprobs[r, prompt_len : prompt_len + n] = c.logprobs
    row_prompts = [prompts[c.prompt_index] for c in completions]
    grids = [p.image_grid_thw for p in row_prompts if p.image_grid_thw is not None]
    # Prompt positions from the prompt alone; response positions as the sampler gave them (real tokens
    # so far + the prompt's rope delta), so a sampled vision token in a response is text, not an image.
    pos, deltas = rope_index(
        config, ids[:, :prompt_len], np.concatenate(grids) if grids else None, mask[:, :prompt_len]
    )
    real = mask[:, :prompt_len].sum(axis=1)
    response = decode_position_ids(real, deltas, response_len)
    response = np.where(mask[None, :, prompt_len:].astype(bool), response, 0)
    pos = np.concatenate([pos, response], axis=2)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": np.swapaxes(pos, 0, 1).astype(np.int32),
        "loss_mask": loss_mask,
        "rollout_logprobs": rollout_logprobs,
    }
    if grids or most_patches:  # another process has images: every process has the vision keys
        patches = patch_bucket(
            max([most_patches] + [patch_slots(p.image_grid_thw, config.vision) for p in row_prompts]),
            min_patch_bucket,
        )
        # One image entry per distinct prompt (a prompt without an image gets an empty one), padded
        # with empty entries to the image count every process agreed on.
        distinct = sorted({c.prompt_index for c in completions})
        entry = {p: i for i, p in enumerate(distinct)}
        pad = max(most_images - len(distinct), 0)
        batch.update(
            batched_vision_inputs(
                [prompts[p].pixel_values for p in distinct] + [None] * pad,
                [prompts[p].image_grid_thw for p in distinct] + [None] * pad,
                config.vision,
                num_patches=patches,
                dtype=pixel_dtype,
            )
        )
        batch["image_index"] = np.asarray([entry[c.prompt_index] for c in completions], np.int32)
    return batch


def has_shared_images(batch: dict) -> bool:
    """Whether `batch` stores its images once per prompt (`image_index` present) rather than per row."""
    return "image_index" in batch


def on_mesh(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """The global arrays of a learner batch whose process-local rows are `batch`, sharded as the jitted
    steps take them (`pr1.sharding.batch_sharding`); with several processes, process p's rows are its block
    [p·L, (p+1)·L) of the global batch, and its images the block [p·I, (p+1)·I) of the images (each
    process's `image_index` is moved to it)."""
    if has_shared_images(batch):
        batch = _images_on_mesh(batch, mesh)
    step_lib.check_batch_rows({k: v.shape[0] * jax.process_count() for k, v in batch.items()}, mesh)
    sharding = sharding_lib.batch_sharding(mesh)
    return {k: distributed.global_array_from_local(v, sharding) for k, v in batch.items()}


def _images_on_mesh(batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Pad the process's image entries to a multiple of its batch devices (so they shard like rows:
    each device holds about its own rows' images) and offset `image_index` to the global entries.
    Every process has the same entry count (`batch_extents`), so the padded counts agree too."""
    devices = int(np.prod([mesh.shape.get(a, 1) for a in sharding_lib.BATCH_AXES]))
    local_devices = max(devices // jax.process_count(), 1)
    count = batch["pixel_values"].shape[0]
    padded = -(-count // local_devices) * local_devices
    out = dict(batch)
    if padded != count:
        for key in IMAGE_KEYS:
            value = batch[key]
            # Padding entries are empty images: zero pixels, segment ids -1 (never attended).
            fill = -1 if key in ("frame_ids", "window_ids") else 0
            out[key] = np.concatenate(
                [value, np.full((padded - count,) + value.shape[1:], fill, value.dtype)], axis=0
            )
    out["image_index"] = (batch["image_index"] + jax.process_index() * padded).astype(np.int32)
    return out
