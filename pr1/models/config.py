"""The Qwen2.5-VL model configuration, parsed from a Hugging Face `config.json`.

Every value comes from the file: transformers' config classes default to 72B/Qwen2-VL-like values,
so silently falling back to them would build the wrong model. Both layouts of config.json are read:
the flat hub layout (text keys at the top, `rope_scaling`) and the nested transformers-5 layout
(`text_config`, `rope_parameters`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


class ConfigError(ValueError):
    """A config.json that cannot describe a Qwen2.5-VL model; the message names the key."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    window_size: int = 112
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    # The vision tower's RMSNorm eps is fixed in the reference implementation, not read from config.
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    tie_word_embeddings: bool
    # The config.json this was parsed from, written back unchanged by `hf.save` so no field is lost.
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    # How attention is computed (pr1.models.attention: auto | xla | blockwise | cudnn | splash): a run-time
    # choice (the training config's model.attention, set with dataclasses.replace), not part of config.json.
    attention: str = "auto"

    def __post_init__(self):
        t, v = self.text, self.vision
        if t.hidden_size % t.num_attention_heads:
            raise ConfigError(
                f"text hidden_size {t.hidden_size} is not divisible by "
                f"num_attention_heads {t.num_attention_heads}"
            )
        if t.num_attention_heads % t.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {t.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {t.num_key_value_heads}"
            )
        if sum(t.mrope_section) * 2 != t.head_dim:
            raise ConfigError(
                f"mrope_section {list(t.mrope_section)} must sum to head_dim/2 = {t.head_dim // 2}"
            )
        if v.hidden_size % v.num_heads:
            raise ConfigError(
                f"vision hidden_size {v.hidden_size} is not divisible by num_heads {v.num_heads}"
            )
        if v.head_dim % 4:
            raise ConfigError(
                f"vision head_dim {v.head_dim} must be a multiple of 4 for the 2D rotary embedding"
            )
        if v.window_size % (v.patch_size * v.spatial_merge_size):
            raise ConfigError(
                f"vision window_size {v.window_size} must be a multiple of patch_size*spatial_merge_size"
            )
        for i in v.fullatt_block_indexes:
            if not 0 <= i < v.depth:
                raise ConfigError(f"vision fullatt_block_indexes has {i}, outside depth {v.depth}")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if not 0 <= getattr(self, name) < t.vocab_size:
                raise ConfigError(
                    f"{name} {getattr(self, name)} is outside the vocabulary (size {t.vocab_size})"
                )

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "Qwen25VLConfig":
        model_type = d.get("model_type")
        if model_type not in ("qwen2_5_vl", None):
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'qwen2_5_vl'")
        # transformers 5 nests the text keys under text_config; hub files written by 4.x keep them flat.
        text = dict(d.get("text_config") or {})
        for k, val in d.items():
            if k not in ("text_config", "vision_config"):
                text.setdefault(k, val)
        vision = d.get("vision_config")
        if not isinstance(vision, dict):
            raise ConfigError(f"{source}: missing 'vision_config'")

        def need(section: dict, key: str, where: str):
            if key not in section:
                raise ConfigError(f"{source}: missing key '{where}{key}'")
            return section[key]

        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if "mrope_section" not in rope:
            raise ConfigError(
                f"{source}: missing 'rope_scaling.mrope_section' "
                "(or 'text_config.rope_parameters.mrope_section')"
            )
        rope_theta = rope.get("rope_theta", text.get("rope_theta"))
        if rope_theta is None:
            raise ConfigError(f"{source}: missing 'rope_theta'")
        text_cfg = TextConfig(
            vocab_size=int(need(text, "vocab_size", "text_config.")),
            hidden_size=int(need(text, "hidden_size", "text_config.")),
            intermediate_size=int(need(text, "intermediate_size", "text_config.")),
            num_hidden_layers=int(need(text, "num_hidden_layers", "text_config.")),
            num_attention_heads=int(need(text, "num_attention_heads", "text_config.")),
            num_key_value_heads=int(
                text.get("num_key_value_heads") or need(text, "num_attention_heads", "text_config.")
            ),
            rms_norm_eps=float(need(text, "rms_norm_eps", "text_config.")),
            rope_theta=float(rope_theta),
            mrope_section=tuple(int(x) for x in rope["mrope_section"]),
            hidden_act=text.get("hidden_act", "silu"),
            max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
        )
        vrope = vision.get("rope_parameters") or {}
        vision_cfg = VisionConfig(
            depth=int(need(vision, "depth", "vision_config.")),
            hidden_size=int(need(vision, "hidden_size", "vision_config.")),
            intermediate_size=int(need(vision, "intermediate_size", "vision_config.")),
            num_heads=int(need(vision, "num_heads", "vision_config.")),
            out_hidden_size=int(need(vision, "out_hidden_size", "vision_config.")),
            fullatt_block_indexes=tuple(
                int(i) for i in need(vision, "fullatt_block_indexes", "vision_config.")
            ),
            window_size=int(vision.get("window_size", 112)),
            patch_size=int(vision.get("patch_size", 14)),
            temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
            spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
            in_channels=int(vision.get("in_channels", 3)),
            hidden_act=vision.get("hidden_act", "silu"),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
        )
        # transformers < 5 kept tie_word_embeddings inside text_config; either place means tied.
        tie = bool(
            d.get("tie_word_embeddings", False)
            or (d.get("text_config") or {}).get("tie_word_embeddings", False)
        )
        return cls(
            text=text_cfg,
            vision=vision_cfg,
            image_token_id=int(d.get("image_token_id", 151655)),
            video_token_id=int(d.get("video_token_id", 151656)),
            vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
            tie_word_embeddings=tie,
            hf_config=json.loads(json.dumps(d)),
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Qwen25VLConfig":
        file = os.path.join(path, "config.json")
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file} not found: a checkpoint dir needs a config.json")
        with open(file) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{file}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=file)


def tiny_hf_config(**overrides: Any) -> dict:
    """The tiny Qwen2.5-VL config.json (about 1 MB of weights) that transformers instantiates on CPU.

    Used by the debug mode and the tests; `overrides` replace top-level keys (e.g. tie_word_embeddings).
    """
    d = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "dtype": "float32",
        "image_token_id": 500,
        "video_token_id": 501,
        "vision_start_token_id": 502,
        "vision_end_token_id": 503,
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "type": "mrope",
                "mrope_section": [2, 3, 3],
                "rope_theta": 1000000.0,
            },
            "bos_token_id": 504,
            "eos_token_id": 506,
            "pad_token_id": 504,
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": 4,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 4,
            "out_hidden_size": 64,
            "window_size": 112,
            "fullatt_block_indexes": [1, 3],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
            "hidden_act": "silu",
            "tokens_per_second": 4,
            "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
        },
    }
    d.update(overrides)
    return d


def qwen2_5_vl_7b_hf_config() -> dict:
    """config.json of Qwen2.5-VL-7B-Instruct (shapes only; weights are never needed), for lowering the
    7B recipe on a fake mesh and for memory planning without the checkpoint at hand."""
    d = tiny_hf_config()
    d.update(
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    d["text_config"] = dict(
        d["text_config"],
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=128000,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
        rope_parameters={
            "rope_type": "default",
            "type": "mrope",
            "mrope_section": [16, 24, 24],
            "rope_theta": 1000000.0,
        },
    )
    d["vision_config"] = dict(
        d["vision_config"],
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        fullatt_block_indexes=[7, 15, 23, 31],
        window_size=112,
    )
    return d
