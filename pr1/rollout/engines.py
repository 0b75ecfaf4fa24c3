"""The one place a rollout engine is built from the `rollout` config section: training and evaluation.

    embedded  the jitted sampler on this process's mesh (`pr1.rollout.sampler.EmbeddedEngine`)
    sglang    SGLang servers (`rollout.sglang.*`, `pr1.rollout.sglang.SGLangEngine`)
    vllm      vLLM servers (`rollout.vllm.*`, `pr1.rollout.vllm.VLLMEngine`)

The server clients are imported only when chosen: a run with the embedded engine needs none of them.
"""

from __future__ import annotations

from pr1.models.generation import default_stop_token_ids
from pr1.rollout import RolloutEngine
from pr1.rollout.config import ENGINES


def make_engine(
    rollout_cfg,
    *,
    model_config,
    tokenizer,
    pad_token_id: int,
    model_def=None,
    params=None,
    mesh=None,
    workdir: str | None = None,
    assets_from: str | None = None,
) -> RolloutEngine:
    """The engine `rollout_cfg.engine` names, stopping at the model's default stop tokens.

    The embedded engine needs `model_def`, `params` and `mesh`. A server engine syncs weights only when
    given `model_def` and `workdir` (where it writes them); `assets_from` is the checkpoint dir whose
    tokenizer and processor files go beside them.
    """
    stop = default_stop_token_ids(tokenizer, model_config)
    if rollout_cfg.engine == "embedded":
        from pr1.rollout.sampler import EmbeddedEngine

        if model_def is None or params is None or mesh is None:
            raise ValueError("rollout.engine='embedded' needs the model_def, params and mesh to sample with")
        return EmbeddedEngine(
            model_def,
            params,
            mesh,
            tokenizer,
            stop_token_ids=stop,
            pad_token_id=pad_token_id,
            min_prompt_bucket=rollout_cfg.min_prompt_bucket,
            min_patch_bucket=rollout_cfg.min_patch_bucket,
            prefill_chunk=rollout_cfg.prefill_chunk,
            weights_layout=rollout_cfg.weights_layout,
        )
    if rollout_cfg.engine == "vllm":
        from pr1.rollout.vllm import VLLMEngine as server
    elif rollout_cfg.engine == "sglang":
        from pr1.rollout.sglang import SGLangEngine as server
    else:
        raise ValueError(f"rollout.engine must be one of {ENGINES}, got {rollout_cfg.engine!r}")
    return server.from_config(
        rollout_cfg[rollout_cfg.engine],
        model_def=model_def,
        workdir=workdir,
        tokenizer=tokenizer,
        stop_token_ids=stop,
        assets_from=assets_from,
    )
