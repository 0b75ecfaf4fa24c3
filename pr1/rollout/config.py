"""The `rollout` section of a training config, and the rollout engines by name.

An engine is chosen by `rollout.engine`; `pr1.train` builds it, `pr1.eval --engine` accepts the
same names. The server engines' own sections (`rollout.sglang`, `rollout.vllm`) come from their
modules; they are imported only when the section is built, so that naming the engines stays cheap.
"""

from __future__ import annotations

import ml_collections

# embedded: the jitted JAX sampler on the trainer's mesh; sglang, vllm: HTTP to inference servers.
ENGINES = ("embedded", "sglang", "vllm")
SERVER_ENGINES = ("sglang", "vllm")  # the ones that generate beside the learner (off-policy rollout)
# The embedded engine's weights during a rollout (pr1.rollout.sampler): "gathered" once per rollout,
# replicated over data x fsdp (tensor split kept), or read in the "learner"'s FSDP layout.
WEIGHTS_LAYOUTS = ("gathered", "learner")


def rollout_config() -> ml_collections.ConfigDict:
    """The `rollout` section: engine, GRPO group size, sampling, padding buckets, server clients."""
    from pr1.rollout.sglang import sglang_config
    from pr1.rollout.vllm import vllm_config

    return ml_collections.ConfigDict(
        dict(
            engine="embedded",  # one of ENGINES
            n=8,  # responses per prompt (the GRPO group)
            temperature=1.0,
            top_p=1.0,
            top_k=-1,
            max_new_tokens=4096,
            min_prompt_bucket=64,
            min_patch_bucket=256,
            prefill_chunk=0,  # embedded engine: prompts prefilled at a time (0: all of a step's at once)
            # embedded engine: "gathered" (weights gathered once per rollout, replicated over data x fsdp)
            # | "learner" (read FSDP-sharded; the TPU compiler then gathers them every decode step)
            weights_layout="gathered",
            val_max_new_tokens=4096,  # validation decodes greedily
            # 1: server engines generate step k+1 while step k trains (pr1.train.rollout_ahead).
            off_policy_steps=0,
            sglang=sglang_config(),
            vllm=vllm_config(),
        )
    )
