"""The one training config: sections built from each component's own defaults, validated up front.

    model    where the weights are; param_dtype (the fp32 master weights the optimizer updates) and
             compute_dtype (matmuls and activations inside the jitted steps and the sampler)
    mesh     data x fsdp x tensor device mesh (one axis may be -1: the rest of the devices)
    data     pr1.data.config.data_config()
    rollout  pr1.rollout.config.rollout_config(): engine, n responses per prompt, sampling, buckets,
             server clients
    rewards  pr1.rewards.rewards_config()
    learner  pr1.train.step.learner_config()
    optim    pr1.train.state.optimizer_config()
    train    steps, mini-batches, seed, checkpoint/validation/logging intervals
    distributed  multi-process start-up: pr1.distributed.distributed_config() (off unless enabled
             here or by env PR1_DISTRIBUTED=1)

Config files in configs/ return `default_config()` with their values set. `validate_config` runs
before anything is loaded or compiled and raises `ConfigError` naming the key at fault.
"""

from __future__ import annotations

import math
import os

import ml_collections

from pr1.http_policy import check_url
from pr1.models import attention as attention_lib
from pr1.rewards.combine import check_config as check_rewards_config
from pr1.rewards.combine import judge_share, rewards_config
from pr1.rollout.config import ENGINES, SERVER_ENGINES, WEIGHTS_LAYOUTS, rollout_config
from pr1.train.state import check_optimizer_config, optimizer_config
from pr1.train.step import check_learner_config, learner_config

DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def default_config() -> ml_collections.ConfigDict:
    from pr1.data.config import data_config
    from pr1.distributed import distributed_config

    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        dict(
            path="",  # local HF checkpoint dir (e.g. Qwen2.5-VL-7B-Instruct)
            # The stored weights the optimizer updates (the release: fp32 masters; bf16 masters lose
            # lr-1e-6 updates) and the dtype the forward runs in (cast inside the jitted programs).
            # Norms, softmax, rotary, the LM head's accumulation and the logprobs are fp32 regardless.
            param_dtype="float32",
            compute_dtype="bfloat16",
            make_tiny_if_missing=False,  # debug only: write pr1.models.tiny's checkpoint at `path` first
            # pr1.models.attention: auto (splash on TPU, cudnn on GPU, blockwise on CPU) | xla (dense) |
            # blockwise (pure-JAX flash) | cudnn | splash
            attention="auto",
        )
    )
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.data = data_config()
    c.rollout = rollout_config()
    c.rewards = rewards_config()
    c.learner = learner_config()
    c.optim = optimizer_config()
    c.train = ml_collections.ConfigDict(
        dict(
            steps=275,  # rollout batches (the paper: 25 epochs x 11)
            mini_batches=1,  # optimizer steps per rollout batch (PPO mini-batches, one epoch)
            seed=0,
            checkpoint_every=25,
            keep_checkpoints=3,
            async_checkpoints=True,
            val_every=0,
            val_prompts=64,  # 0: no validation
            log_samples_every=10,
            samples_logged=2,
            tensorboard=True,
            wandb_project="",
            run_name="",
        )
    )
    c.distributed = distributed_config()
    return c


def _check_urls(urls, key: str) -> None:
    for url in [urls] if isinstance(urls, str) else urls:
        try:
            check_url(url, key)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _need(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def validate_config(
    c: ml_collections.ConfigDict,
    *,
    num_devices: int | None = None,
    check_files: bool = True,
    backend: str | None = None,
    num_processes: int = 1,
) -> None:
    """Checks every value the run depends on; raises ConfigError('<key>: <why>').

    Each section is checked on its own (here for the sections this module defines, beside their
    defaults for the others), then what spans sections: sampling and learner temperatures, and how a
    step's responses split into mini-batches, micro-batches and over the mesh.
    check_files=False skips the checks that local data files exist (for planning a run elsewhere);
    `backend` (jax's platform name), when given, is where model.attention must be able to run.
    """
    for section in ("model", "mesh", "data", "rollout", "rewards", "learner", "optim", "train"):
        _need(section in c, section, "section missing from the config")
    _check_model(c.model, backend)
    axes = _check_mesh(c.mesh, num_devices)
    _check_data(c.data, check_files)
    _check_rollout(c.rollout)
    for key, check in (
        ("rewards", lambda: _check_rewards(c.rewards, num_processes)),
        ("learner", lambda: check_learner_config(c.learner)),
        ("optim", lambda: check_optimizer_config(c.optim)),
    ):
        try:
            check()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _check_train(c.train)

    d, r, t, lc = c.data, c.rollout, c.train, c.learner
    _need(
        abs(lc.temperature - r.temperature) < 1e-9,
        "learner.temperature",
        f"must equal rollout.temperature ({r.temperature}) so logprobs are of the sampling distribution, "
        f"got {lc.temperature}",
    )
    rows = d.prompts_per_step * r.n
    _need(
        rows % t.mini_batches == 0,
        "train.mini_batches",
        f"{t.mini_batches} does not divide the {rows} responses per step (data.prompts_per_step x rollout.n)",
    )
    # A mini-batch must hold whole groups and split into micro-batches.
    per_mini = rows // t.mini_batches
    _need(
        per_mini % r.n == 0,
        "train.mini_batches",
        f"mini-batches of {per_mini} responses would split GRPO groups of {r.n}",
    )
    _need(
        lc.micro_batches == 0 or per_mini % lc.micro_batches == 0,
        "learner.micro_batches",
        f"{lc.micro_batches} does not divide the {per_mini} responses of a mini-batch",
    )
    if num_devices is not None:
        sizes = dict(axes)
        free = [k for k, v in sizes.items() if v == -1]
        if free:  # the -1 axis takes the devices the fixed axes leave
            sizes[free[0]] = num_devices // math.prod(v for v in sizes.values() if v != -1)
        batch_rows = sizes["data"] * sizes["fsdp"]
        _need(
            per_mini % batch_rows == 0,
            "data.prompts_per_step",
            f"the {per_mini} responses of a mini-batch do not divide over the {batch_rows} devices of mesh "
            f"axes data x fsdp ({sizes})",
        )
        per_micro = per_mini // lc.micro_batches if lc.micro_batches else batch_rows
        _need(
            per_micro % batch_rows == 0,
            "learner.micro_batches",
            f"micro-batches of {per_micro} responses do not divide over the {batch_rows} devices of mesh "
            f"axes data x fsdp ({sizes})",
        )


def _check_model(m: ml_collections.ConfigDict, backend: str | None) -> None:
    _need(bool(m.path), "model.path", "empty; set it to a local Hugging Face checkpoint dir")
    _need(
        m.make_tiny_if_missing or os.path.isdir(m.path),
        "model.path",
        f"{m.path} is not a directory (no model is downloaded; give a local checkpoint dir)",
    )
    _need(m.param_dtype in DTYPES, "model.param_dtype", f"must be one of {DTYPES}, got {m.param_dtype!r}")
    _need(
        m.compute_dtype in DTYPES, "model.compute_dtype", f"must be one of {DTYPES}, got {m.compute_dtype!r}"
    )
    try:
        attention_lib.check_implementation(m.get("attention", "auto"), backend)
    except attention_lib.AttentionConfigError as e:
        raise ConfigError(str(e)) from None


def _check_mesh(mesh: ml_collections.ConfigDict, num_devices: int | None) -> dict:
    """The mesh section's checks; returns its axis sizes (one may be -1)."""
    axes = {name: mesh[name] for name in ("data", "fsdp", "tensor")}
    for name, value in axes.items():
        _need(
            isinstance(value, int) and (value >= 1 or value == -1),
            f"mesh.{name}",
            f"must be >= 1 or -1, got {value!r}",
        )
    _need(list(axes.values()).count(-1) <= 1, "mesh", f"at most one axis may be -1, got {axes}")
    if num_devices is not None:
        fixed = 1
        for value in axes.values():
            fixed *= value if value != -1 else 1
        _need(
            num_devices % fixed == 0 if -1 in axes.values() else fixed == num_devices,
            "mesh",
            f"{axes} does not fit the {num_devices} devices",
        )
    return axes


def _check_data(d: ml_collections.ConfigDict, check_files: bool) -> None:
    from pr1.data.config import check_data_config

    try:
        check_data_config(d)
    except ValueError as e:
        raise ConfigError(str(e).removeprefix("config ")) from None
    _need(bool(d.train_files), "data.train_files", "empty; give parquet files (or set data.synthetic)")
    synthetic = "synthetic" in d and d.synthetic.enabled  # the debug config writes its files on first use
    if check_files and not synthetic:
        for key in ("train_files", "val_files"):
            for f in [d[key]] if isinstance(d[key], str) else d[key]:
                _need("://" in f or os.path.isfile(f), f"data.{key}", f"{f}: parquet file not found")
    _need(d.max_prompt_length >= 8, "data.max_prompt_length", f"must be >= 8, got {d.max_prompt_length}")


def _check_rollout(r: ml_collections.ConfigDict) -> None:
    _need(r.engine in ENGINES, "rollout.engine", f"must be one of {ENGINES}, got {r.engine!r}")
    _need(r.n >= 2, "rollout.n", f"GRPO needs at least 2 responses per prompt, got {r.n}")
    _need(
        r.temperature > 0,
        "rollout.temperature",
        f"training samples need a temperature > 0, got {r.temperature}",
    )
    _need(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _need(r.max_new_tokens >= 1, "rollout.max_new_tokens", f"must be >= 1, got {r.max_new_tokens}")
    _need(
        r.weights_layout in WEIGHTS_LAYOUTS,
        "rollout.weights_layout",
        f"must be one of {WEIGHTS_LAYOUTS}, got {r.weights_layout!r}",
    )
    _need(
        r.prefill_chunk >= 0,
        "rollout.prefill_chunk",
        f"must be >= 0 (0: all prompts at once), got {r.prefill_chunk}",
    )
    _need(
        r.val_max_new_tokens >= 1, "rollout.val_max_new_tokens", f"must be >= 1, got {r.val_max_new_tokens}"
    )
    _need(
        r.off_policy_steps in (0, 1), "rollout.off_policy_steps", f"must be 0 or 1, got {r.off_policy_steps}"
    )
    _need(
        r.off_policy_steps == 0 or r.engine in SERVER_ENGINES,
        "rollout.off_policy_steps",
        "1 needs a server engine (sglang, vllm) to generate beside the learner; "
        f"rollout.engine is {r.engine!r}",
    )
    if r.engine == "sglang":
        _need(
            bool(r.sglang.urls),
            "rollout.sglang.urls",
            "empty; give the SGLang server URLs (launch/serve_rollout.sh)",
        )
        _check_urls(r.sglang.urls, "rollout.sglang.urls")
    if r.engine == "vllm":
        _need(
            bool(r.vllm.urls),
            "rollout.vllm.urls",
            "empty; give the vLLM server URLs (launch/serve_vllm.sh rollout)",
        )
        _check_urls(r.vllm.urls, "rollout.vllm.urls")
        # vLLM reports logprobs after top-p/top-k (renormalized), not what the learner recomputes.
        _need(r.top_p == 1, "rollout.top_p", f"must be 1.0 with rollout.engine=vllm, got {r.top_p}")
        _need(r.top_k <= 0, "rollout.top_k", f"must be -1 (off) with rollout.engine=vllm, got {r.top_k}")


def _check_rewards(rewards: ml_collections.ConfigDict, num_processes: int) -> None:
    check_rewards_config(rewards)
    if rewards.judge.url:
        judge_share(rewards.judge, num_processes)  # the service totals must cover every process


def _check_train(t: ml_collections.ConfigDict) -> None:
    _need(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    _need(t.mini_batches >= 1, "train.mini_batches", f"must be >= 1, got {t.mini_batches}")
    _need(t.checkpoint_every >= 1, "train.checkpoint_every", f"must be >= 1, got {t.checkpoint_every}")
    _need(
        t.keep_checkpoints is None or t.keep_checkpoints >= 1,
        "train.keep_checkpoints",
        f"must be >= 1 (or None to keep all), got {t.keep_checkpoints}",
    )
    _need(t.val_every >= 0, "train.val_every", f"must be >= 0, got {t.val_every}")
