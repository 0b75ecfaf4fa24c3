"""A complete tiny Qwen2.5-VL checkpoint dir for the debug mode and the tests (about 1 MB).

`python -m pr1.models.tiny --out DIR` writes config.json, random safetensors weights, a locally
built tokenizer with the Qwen special tokens and chat template, and the image-processor config, so
pr1 (`hf.load`, `Processor.from_dir`) and transformers (`AutoTokenizer`,
`Qwen2_5_VLForConditionalGeneration.from_pretrained`) both load it offline. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import jax.numpy as jnp
from flax import nnx

from pr1.models import hf
from pr1.models.config import Qwen25VLConfig, tiny_hf_config
from pr1.models.qwen2_5_vl import Qwen25VL
from pr1.models.tiny_tokenizer import write_tokenizer_files


def write_tiny_checkpoint(out: str | os.PathLike, *, seed: int = 0, tie_word_embeddings: bool = False,
                          min_pixels: int = 3136, max_pixels: int = 200_704, **config_overrides) -> str:
    """Write the tiny checkpoint dir at `out` and return its path.

    max_pixels defaults small (256 patches) so debug images stay cheap on a CPU.
    """
    out = os.fspath(out)
    config = Qwen25VLConfig.from_hf_dict(tiny_hf_config(tie_word_embeddings=tie_word_embeddings, **config_overrides))
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--tie-word-embeddings", action="store_true", help="share input and output embeddings")
    parser.add_argument("--max-pixels", type=int, default=200_704, help="image processor max_pixels")
    args = parser.parse_args(argv)
    path = write_tiny_checkpoint(args.out, seed=args.seed, tie_word_embeddings=args.tie_word_embeddings,
                                 max_pixels=args.max_pixels)
    print(f"wrote tiny Qwen2.5-VL checkpoint to {path}: {', '.join(sorted(os.listdir(path)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
