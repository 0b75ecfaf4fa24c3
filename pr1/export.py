"""Export a training checkpoint as a Hugging Face checkpoint dir.

    python -m pr1.export --workdir W [--step N] --out DIR [--dtype bfloat16] [--assets_from DIR]

Reads only the parameters of step N (default: the newest complete one) from `<W>/checkpoints`, and
writes config.json + safetensors via `hf.save`, which transformers, SGLang and vLLM load. The model
config comes from the checkpoint's host state (`checkpoint.model_record`, stored by the trainer), so an export
never depends on the original model dir still being there; tokenizer and processor files are copied
from `--assets_from`, else from the recorded model path when it still exists.

The parameters are gathered on one host device, so this host needs memory for one copy of them in
their stored dtype (about 4 bytes x params for fp32 master weights).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from pr1 import cli
from pr1.models import hf
from pr1.models.config import Qwen25VLConfig
from pr1.models.model_def import ModelDef
from pr1.train import checkpoint as checkpoint_lib


def export(
    workdir: str,
    out: str,
    *,
    step: int | None = None,
    dtype: str | None = None,
    assets_from: str | None = None,
) -> int:
    """Writes step `step` of `workdir` to `out` as an HF checkpoint; returns the step exported."""
    directory = checkpoint_lib.checkpoint_directory(workdir)
    params, host_state, step = checkpoint_lib.read_params(directory, step)
    record = checkpoint_lib.recorded_model(host_state, f"{directory}/{step}")
    config = Qwen25VLConfig.from_hf_dict(record["hf_config"], source=f"{directory}/{step} host_state")
    stored = {np.dtype(x.dtype) for x in jax.tree.leaves(params)}
    model_def = ModelDef.create(config, dtype=jnp.dtype(stored.pop()) if len(stored) == 1 else jnp.float32)
    try:
        model = model_def.bind(params)
    except ValueError as e:
        raise ValueError(
            f"checkpoint {directory}/{step}: params do not fit the recorded model config: {e}"
        ) from None
    if assets_from is None and record.get("path") and os.path.isdir(record["path"]):
        assets_from = record["path"]
    if assets_from is not None and not os.path.isdir(assets_from):
        raise FileNotFoundError(f"--assets_from {assets_from} is not a directory")
    hf.save(model, out, assets_from=assets_from, dtype=None if dtype is None else jnp.dtype(dtype))
    return step


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "training workdir (local path or gs://)", flag_values=fv)
    flags.DEFINE_integer("step", None, "step to export (default: newest complete)", flag_values=fv)
    flags.DEFINE_string("out", None, "output HF checkpoint dir (replaced atomically)", flag_values=fv)
    flags.DEFINE_enum(
        "dtype",
        None,
        ["bfloat16", "float16", "float32"],
        "dtype of the stored tensors (default: the checkpoint's own)",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "assets_from",
        None,
        "checkpoint dir to copy tokenizer/processor files from (default: the recorded model path)",
        flag_values=fv,
    )
    flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)


def main(argv: list[str] | None = None) -> int:
    args = cli.parse("pr1.export", argv, define_flags, doc=__doc__)
    try:
        step = export(args.workdir, args.out, step=args.step, dtype=args.dtype, assets_from=args.assets_from)
    except (OSError, ValueError) as e:
        return cli.fail("pr1.export", e)
    print(f"exported step {step} of {args.workdir} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
