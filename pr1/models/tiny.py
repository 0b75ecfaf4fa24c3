"""A complete tiny Qwen2.5-VL checkpoint dir for the debug mode and the tests (about 1 MB).

`python -m pr1.models.tiny --out DIR` writes config.json, random safetensors weights, a locally
built tokenizer with the Qwen special tokens and chat template, and the image-processor config, so
pr1 (`hf.load`, `Processor.from_dir`) and transformers (`AutoTokenizer`,
`Qwen2_5_VLForConditionalGeneration.from_pretrained`) both load it offline. Nothing is downloaded.

Presets (`--preset`): "default" (4 heads of 16 dims, the unit tests' model) and "vllm" (2 heads and
1 KV head of 32 dims, mrope_section [4, 6, 6]): vLLM's CPU attention supports head sizes 32, 64, 80
and up, and a 16-dim head kills its engine on the first request. Same hidden size, vocabulary,
vision tower, tokenizer and processor config otherwise.
"""

from __future__ import annotations

import os
import shutil
import sys

import jax.numpy as jnp
from absl import flags
from flax import nnx

from pr1 import cli
from pr1.models import hf
from pr1.models.config import Qwen25VLConfig, tiny_hf_config
from pr1.models.qwen2_5_vl import Qwen25VL
from pr1.models.tiny_tokenizer import write_tokenizer_files


def preset_overrides(preset: str) -> dict:
    """Top-level config.json overrides of a preset (see the module docstring)."""
    if preset == "default":
        return {}
    if preset == "vllm":
        text = dict(tiny_hf_config()["text_config"], num_attention_heads=2, num_key_value_heads=1)
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[4, 6, 6])
        return {"text_config": text}
    raise ValueError(f"unknown tiny checkpoint preset {preset!r}; known: {', '.join(PRESETS)}")


PRESETS = ("default", "vllm")


def write_tiny_checkpoint(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    min_pixels: int = 3136,
    max_pixels: int = 200_704,
    preset: str = "default",
    **config_overrides,
) -> str:
    """Write the tiny checkpoint dir at `out` and return its path.

    max_pixels defaults small (256 patches) so debug images stay cheap on a CPU. `preset` picks the
    attention shape ("vllm": head_dim 32, servable by vLLM's CPU build); `config_overrides` replace
    top-level config.json keys after it.
    """
    out = os.fspath(out)
    overrides = {**preset_overrides(preset), **config_overrides}
    config = Qwen25VLConfig.from_hf_dict(tiny_hf_config(tie_word_embeddings=tie_word_embeddings, **overrides))
    model = Qwen25VL(config, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    # Weights and tokenizer are assembled next to `out` and renamed into place together: a run killed
    # in between must not leave a dir with weights but no tokenizer, which every later debug run
    # would take as a finished checkpoint.
    staging = f"{out.rstrip(os.sep)}.tiny-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    hf.save(model, staging)
    write_tokenizer_files(staging, min_pixels=min_pixels, max_pixels=max_pixels)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("out", None, "directory to write (replaced if it exists)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the random weights", flag_values=fv)
    flags.DEFINE_bool("tie_word_embeddings", False, "share input and output embeddings", flag_values=fv)
    flags.DEFINE_integer("max_pixels", 200_704, "image processor max_pixels", flag_values=fv)
    flags.DEFINE_enum(
        "preset",
        "default",
        list(PRESETS),
        "attention shape: default (head_dim 16) or vllm (head_dim 32, for vLLM's CPU build)",
        flag_values=fv,
    )
    flags.mark_flag_as_required("out", flag_values=fv)


def main(argv=None) -> int:
    args = cli.parse("pr1.models.tiny", argv, define_flags, doc=__doc__)
    path = write_tiny_checkpoint(
        args.out,
        seed=args.seed,
        tie_word_embeddings=args.tie_word_embeddings,
        max_pixels=args.max_pixels,
        preset=args.preset,
    )
    print(f"wrote tiny Qwen2.5-VL checkpoint to {path}: {', '.join(sorted(os.listdir(path)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
