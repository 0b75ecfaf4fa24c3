"""Helpers for tests that compare against transformers' PyTorch Qwen2.5-VL (the parity reference)."""

from __future__ import annotations

import numpy as np
import torch

from pr1.bench.hf_peer import load_hf_processor  # noqa: F401  (re-exported for the tests)
from pr1.models.config import tiny_hf_config


def make_hf_model(seed: int = 0, **config_overrides):
    """A tiny transformers Qwen2.5-VL with weights scaled so activations and logits are O(1).

    The default init (std 0.02) makes logits tiny, and a 1e-4 tolerance on tiny logits would prove
    little; unit-scale weights make a real bug show up far above the tolerance.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(**tiny_hf_config(**config_overrides))
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(
        cfg, attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln_q" in name):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                fan_in = int(np.prod(p.shape[1:])) if "embed_tokens" not in name else 1
                p.copy_(torch.randn_like(p) / np.sqrt(fan_in))
    model.eval()
    return model


def hf_logits(
    model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, position_ids=None
):
    """Logits from transformers; positions computed by transformers itself unless given."""
    image_id = model.config.image_token_id
    kwargs = dict(input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long))
    kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == image_id).to(torch.int32)
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    if pixel_values is not None:
        kwargs["pixel_values"] = torch.as_tensor(np.asarray(pixel_values), dtype=torch.float32)
        kwargs["image_grid_thw"] = torch.as_tensor(np.asarray(image_grid_thw), dtype=torch.long)
    if position_ids is not None:
        kwargs["position_ids"] = torch.as_tensor(np.asarray(position_ids), dtype=torch.long)
    with torch.no_grad():
        return model(**kwargs).logits.numpy()


def hf_rope_index(model, input_ids, image_grid_thw=None, attention_mask=None):
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    mm = (ids == model.config.image_token_id).to(torch.int32)
    grid = None if image_grid_thw is None else torch.as_tensor(np.asarray(image_grid_thw), dtype=torch.long)
    mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    pos, deltas = model.model.get_rope_index(
        ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=mask
    )
    return pos.numpy(), deltas.numpy().reshape(-1)
