"""The Perception-R1 training loop: rollout → rewards → advantages → update → weight sync, repeated.

One step on the host:

    prompts ──▶ engine.generate(n per prompt)
                  ├──▶ reward stage (thread: math-verify pool + judge requests)   ─┐ overlap
                  └──▶ learner batch ──▶ jitted logprob pass (old policy)          ─┘
    group advantages ──▶ jitted update per mini-batch ──▶ engine.sync_weights ──▶ metrics, checkpoint

With a server engine (SGLang, vLLM) each response goes to the reward stage as soon as its request
finishes, while the rest is still generating; the embedded engine hands over the batch at once.
rollout.off_policy_steps=1 generates step k+1 beside step k's learner (pr1.train.rollout_ahead).

Everything that decides the result is deterministic given the config (data order by seed and
epoch, sampling seed per step, the jitted steps), so a run killed at any point and restarted from
its newest checkpoint reproduces the uninterrupted run. SIGTERM / SIGINT finish the current step,
save a checkpoint and return.

Several processes (pr1.distributed; every one runs this same loop): each takes its own block of
the step's prompts, rolls out, scores and computes advantages for its own GRPO groups, and feeds its
rows into global arrays for the jitted steps, which run over the whole mesh; metrics are over the
global batch and written by process 0. With the same global batch, k processes produce the same
run as one (tests/test_multihost.py). Whatever every process must do together (collectives,
checkpoint saves, the decision to stop) is decided from values all processes agree on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pr1 import distributed, sharding
from pr1.data.processor import Processor
from pr1.models.config import Qwen25VLConfig
from pr1.models.generation import SamplingParams, default_stop_token_ids
from pr1.rewards.combine import RewardStage
from pr1.rewards.perception import as_annotations
from pr1.rl import grpo
from pr1.rollout.sampler import EmbeddedEngine
from pr1.train import batch as batch_lib
from pr1.train import checkpoint as checkpoint_lib
from pr1.train import metrics as metrics_lib
from pr1.train import rollout_ahead
from pr1.train import state as state_lib
from pr1.train import step as step_lib
from pr1.train.config import ConfigError, validate_config

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps (never mid-update)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under a test runner thread)
                pass

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.requested = True
        print(
            f"pr1.train: got signal {signum}; finishing this step, saving a checkpoint and exiting",
            flush=True,
        )

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _prepare_inputs(config) -> None:
    """Debug conveniences, both explicit in the config: a tiny model and synthetic data on first use.

    Process 0 writes them first; after a barrier, a process that still does not see them (no shared
    filesystem) writes its own copy, which is identical (both are seeded).
    """
    if jax.process_index() == 0:
        _write_missing_inputs(config)
    if distributed.is_multiprocess():
        distributed.barrier("pr1.train: debug inputs written by process 0")
        if jax.process_index() != 0:
            _write_missing_inputs(config)
        distributed.barrier("pr1.train: debug inputs present on every process")


def _write_missing_inputs(config) -> None:
    if config.model.make_tiny_if_missing and not os.path.isdir(config.model.path):
        from pr1.models.tiny import write_tiny_checkpoint

        write_tiny_checkpoint(config.model.path, seed=config.train.seed)
    synthetic = config.data.get("synthetic")
    if synthetic and synthetic.get("enabled"):
        from pr1.data.synthetic import write_synthetic

        for files, n, seed in (
            (config.data.train_files, synthetic.train_rows, synthetic.seed),
            (config.data.val_files, synthetic.val_rows, synthetic.seed + 1),
        ):
            for path in files:
                if not os.path.exists(path):
                    write_synthetic(
                        path, n=n, seed=seed, task=synthetic.task, image_size=synthetic.image_size
                    )


class _StepCache:
    """Jitted learner steps per batch signature (one per prompt/patch bucket), built on first use."""

    def __init__(self, model_def, tx, learner_cfg, shardings, mesh):
        self.args = (model_def, tx, learner_cfg, shardings, mesh)
        self._logprob, self._update = {}, {}

    @staticmethod
    def _key(batch):
        return tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items()))

    def logprobs(self, params, batch):
        model_def, _, cfg, shardings, mesh = self.args
        key = self._key(batch)
        if key not in self._logprob:
            self._logprob[key] = step_lib.make_logprob_step(model_def, cfg, shardings.params, mesh, batch)
        return self._logprob[key](params, batch)

    def update(self, state, batch):
        model_def, tx, cfg, shardings, mesh = self.args
        key = self._key(batch)
        if key not in self._update:
            self._update[key] = step_lib.make_update_step(model_def, tx, cfg, shardings, mesh, batch)
        return self._update[key](state, batch)


def _abstract_state(params_abstract, tx, shardings):
    """The restore target: TrainState shapes with the run's shardings (nothing is allocated)."""
    abstract = state_lib.TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params_abstract,
        opt_state=jax.eval_shape(tx.init, params_abstract),
    )
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _pure(nnx_state):
    return nnx_state.to_pure_dict() if hasattr(nnx_state, "to_pure_dict") else nnx_state


def _make_engine(config, model_def, params, mesh, processor, workdir):
    r = config.rollout
    stop = default_stop_token_ids(processor.tokenizer, model_def.config)
    if r.engine == "embedded":
        return EmbeddedEngine(
            model_def,
            params,
            mesh,
            processor.tokenizer,
            stop_token_ids=stop,
            pad_token_id=processor.pad_token_id,
            min_prompt_bucket=r.min_prompt_bucket,
            min_patch_bucket=r.min_patch_bucket,
            prefill_chunk=r.prefill_chunk,
            weights_layout=r.weights_layout,
        )
    if r.engine == "vllm":
        from pr1.rollout.vllm import VLLMEngine

        return VLLMEngine.from_config(
            r.vllm,
            model_def=model_def,
            workdir=workdir,
            tokenizer=processor.tokenizer,
            stop_token_ids=stop,
            assets_from=config.model.path,
        )
    from pr1.rollout.sglang import SGLangEngine

    return SGLangEngine.from_config(
        r.sglang,
        model_def=model_def,
        workdir=workdir,
        tokenizer=processor.tokenizer,
        stop_token_ids=stop,
        assets_from=config.model.path,
    )


def _mini_batches(batch: dict, k: int, mesh) -> list[dict]:
    """Mini-batch i is global rows [i·S, (i+1)·S), as with one process: the rows move between
    devices (and hosts) on the mesh, laid out as the update step takes them."""
    if k == 1:
        return [batch]
    size = batch["input_ids"].shape[0] // k
    # Images stored once per prompt go whole to every mini-batch (its rows index them).
    shared = step_lib.shared_images(batch)
    rows = {key: v for key, v in batch.items() if key not in shared}
    shardings = step_lib.batch_sharding(
        mesh, {key: jax.ShapeDtypeStruct((size,) + v.shape[1:], v.dtype) for key, v in rows.items()}
    )
    return [
        {key: jax.device_put(v[i * size : (i + 1) * size], shardings[key]) for key, v in rows.items()}
        | shared
        for i in range(k)
    ]


def _judged(annotations, rewards_config) -> int:
    """Responses the judge was asked about (judge/failure_rate's denominator), as RewardStage decides."""
    if not rewards_config.weights.perception and not rewards_config.judge.get("measure_unweighted", False):
        return 0
    return sum(1 for a in annotations if as_annotations(a))


def _validate(engine, reward_stage, val_data, config, limit) -> dict:
    """Greedy decoding on the held-out split: accuracy, format and perception reward means.

    `val_data` is read whole by every process (a one-process view); process p validates its block
    of the first `limit` examples, and the means are over all of them, in one-process order.
    """
    examples = []
    for batch in val_data:
        examples.extend(batch)
        if len(examples) >= limit:
            break
    examples = examples[:limit]
    if not examples:
        return {}
    p, k = jax.process_index(), jax.process_count()
    mine = examples[p * len(examples) // k : (p + 1) * len(examples) // k]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=config.rollout.val_max_new_tokens)
    completions = engine.generate([e.prompt for e in mine], sampling, n=1)
    out = reward_stage.submit(
        [c.text for c in completions], [e.answer for e in mine], [e.annotations for e in mine], group_size=1
    ).result()
    gather = distributed.allgather_host
    return {
        "val/accuracy": float(gather(out.components["accuracy"]).mean()),
        "val/format": float(gather(out.components["format"]).mean()),
        "val/perception": float(gather(out.components["perception"]).mean()),
        "val/response_length": float(
            np.mean(gather(np.array([len(c.token_ids) for c in completions], np.int64)))
        ),
        "val/examples": float(len(examples)),
    }


def _log_dir(workdir: str) -> str:
    """Where config.json, metrics.jsonl, samples.jsonl and TensorBoard go: the workdir itself, or, for
    a remote workdir (gs://, where checkpoints go through orbax), a local directory of process 0:
    object stores cannot append a line per step. $PR1_LOCAL_LOGDIR/<run name>, default ~/pr1-logs."""
    if "://" not in workdir:
        return workdir
    root = os.environ.get("PR1_LOCAL_LOGDIR") or os.path.join(os.path.expanduser("~"), "pr1-logs")
    local = os.path.join(root, workdir.rstrip("/").rsplit("/", 1)[-1])
    if jax.process_index() == 0:
        log.warning("workdir %s is remote: checkpoints go there, metrics and logs to %s", workdir, local)
    return local


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) training into `workdir`; returns the last step's metrics."""
    from pr1.data import dataset as dataset_lib

    workdir = os.path.abspath(workdir) if "://" not in workdir else workdir
    distributed.maybe_initialize(config)  # a no-op unless enabled, or when the CLI already did it
    validate_config(
        config,
        num_devices=jax.device_count(),
        backend=jax.default_backend(),
        num_processes=jax.process_count(),
    )
    _prepare_inputs(config)
    log_dir = _log_dir(workdir)
    os.makedirs(log_dir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(log_dir, CONFIG_FILE), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    t_cfg, r_cfg = config.train, config.rollout
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    if distributed.is_multiprocess():
        try:
            distributed.check_process_rows(mesh, step_lib.BATCH_AXES)
        except ValueError as e:
            raise ConfigError(f"mesh: {e}") from None
    model_config = dataclasses.replace(
        Qwen25VLConfig.from_dir(config.model.path), attention=config.model.attention
    )
    processor = Processor.from_dir(
        config.model.path, min_pixels=config.data.min_pixels, max_pixels=config.data.max_pixels
    )
    model_def = state_lib.ModelDef.create(
        model_config,
        dtype=jnp.dtype(config.model.param_dtype),
        compute_dtype=jnp.dtype(config.model.compute_dtype),
    )
    optimizer_steps = t_cfg.steps * t_cfg.mini_batches
    tx = state_lib.make_optimizer(config.optim, optimizer_steps, _pure(model_def.abstract_state))

    param_sh = model_def.param_shardings(mesh)
    params_abstract = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, model_def.dtype), _pure(model_def.abstract_state)
    )
    shardings = state_lib.state_shardings(tx, params_abstract, param_sh, mesh)
    ckpt = checkpoint_lib.Checkpointer(
        checkpoint_lib.checkpoint_directory(workdir),
        keep=t_cfg.keep_checkpoints,
        async_save=t_cfg.async_checkpoints,
        save_interval_steps=t_cfg.checkpoint_every,
    )
    train_data = dataset_lib.train_iterator(config.data, processor)
    start_step = ckpt.latest_step() or 0
    if start_step:
        state, host_state = ckpt.restore(_abstract_state(params_abstract, tx, shardings), start_step)
        if ckpt.upcast and jax.process_index() == 0:
            print(
                f"pr1.train: checkpoint step {start_step} stored {len(ckpt.upcast)} arrays in a narrower dtype "
                f"(e.g. {ckpt.upcast[0]}); upcast them to model.param_dtype={config.model.param_dtype} / fp32 "
                "moments (lossless)",
                flush=True,
            )
        train_data.set_state(host_state["data"])
        if jax.process_index() == 0:
            print(f"pr1.train: resumed from step {start_step} of {ckpt.directory}", flush=True)
    else:
        params = state_lib.load_params(config.model.path, model_def, mesh)
        state, _ = state_lib.create_train_state(params, tx, model_def, mesh)

    engine = _make_engine(config, model_def, state.params, mesh, processor, workdir)
    engine.sync_weights(state.params, start_step)
    reward_stage = RewardStage(config.rewards, processes=jax.process_count())
    print(f"pr1.train: process {jax.process_index()}: {reward_stage.budget_line()}", flush=True)
    rollouts = rollout_ahead.Rollouts(
        engine,
        train_data,
        lambda k: SamplingParams(
            temperature=r_cfg.temperature,
            top_p=r_cfg.top_p,
            top_k=r_cfg.top_k,
            max_new_tokens=r_cfg.max_new_tokens,
            seed=t_cfg.seed * 1_000_003 + k,
        ),
        n=r_cfg.n,
        off_policy_steps=r_cfg.off_policy_steps,
        total_steps=t_cfg.steps,
        synced=start_step,
        rewards=reward_stage,
        store_dir=None if "://" in workdir else os.path.join(workdir, rollout_ahead.STORE_DIR),
        keep=t_cfg.checkpoint_every * t_cfg.keep_checkpoints + 2,
    )
    steps = _StepCache(model_def, tx, config.learner, shardings, mesh)
    writer = metrics_lib.MetricsWriter(
        log_dir,
        resume_step=start_step,
        tensorboard=t_cfg.tensorboard,
        wandb_project=t_cfg.wandb_project,
        run_name=t_cfg.run_name,
        config_dict=json.loads(config.to_json_best_effort()),
    )
    progress = metrics_lib.Progress(t_cfg.steps, start_step)
    stop = _StopFlag()
    stop.install()
    record = checkpoint_lib.model_record(model_config, config.model.path)
    n = r_cfg.n
    metrics: dict = {}
    step = start_step
    saved_step = start_step  # the newest step a save was started for
    # A signal may reach some processes only (or at different moments); all stop at the same step.
    stopping = lambda: distributed.any_over_processes(stop.requested)  # noqa: E731
    try:
        while step < t_cfg.steps and not stopping():
            step += 1
            timer = metrics_lib.StepTimer()
            t0 = time.perf_counter()
            # Rewards are already being scored (response by response with a server engine).
            examples, completions, rewards_future = rollouts.batch(step, state.params, timer)
            prompts = [e.prompt for e in examples]
            with timer("logprobs"):
                # Every process pads to the same buckets: the maxima over all of them.
                extents = distributed.max_over_processes(
                    batch_lib.batch_extents(prompts, completions, model_config)
                )
                local_batch = batch_lib.learner_batch(
                    model_config,
                    prompts,
                    completions,
                    max_new_tokens=r_cfg.max_new_tokens,
                    pad_token_id=processor.pad_token_id,
                    min_prompt_bucket=r_cfg.min_prompt_bucket,
                    min_patch_bucket=r_cfg.min_patch_bucket,
                    extents=extents,
                    pixel_dtype=jnp.dtype(model_def.compute_dtype),
                )
                batch = batch_lib.on_mesh(local_batch, mesh)
                batch["old_logprobs"] = steps.logprobs(state.params, batch).block_until_ready()
            with timer("judge_wait"):
                rewards = rewards_future.result()
            # Per group, so each process computes its own groups' advantages.
            advantages = np.asarray(grpo.group_advantages(rewards.totals, n))
            batch["advantages"] = batch_lib.on_mesh({"advantages": advantages.astype(np.float32)}, mesh)[
                "advantages"
            ]
            update_metrics = []
            with timer("update"):
                for mini in _mini_batches(batch, t_cfg.mini_batches, mesh):
                    state, m = steps.update(state, mini)
                    m = jax.device_get(m)
                    step_lib.check_finite(m, step)
                    update_metrics.append(m)
            with timer("sync"):
                rollouts.after_update(state.params, step)
            with timer("checkpoint"):
                host_state = {"data": rollouts.data_state(), "model": record, "step": step}
                if ckpt.save(step, state, host_state, force=step == t_cfg.steps or stopping()):
                    saved_step = step
            if t_cfg.val_every and config.data.val_files and step % t_cfg.val_every == 0:
                with timer("validation"):
                    # Every process reads the same examples and validates its block of them.
                    val_data = dataset_lib.val_iterator(
                        config.data, processor, process_index=0, process_count=1
                    )
                    val_metrics = _validate(engine, reward_stage, val_data, config, t_cfg.val_prompts)
            else:
                val_metrics = {}

            elapsed = time.perf_counter() - t0
            metrics = {k: float(np.mean([float(m[k]) for m in update_metrics])) for k in update_metrics[0]}
            metrics = {f"learner/{k}": v for k, v in metrics.items()}
            annotations = [examples[c.prompt_index].annotations for c in completions]
            metrics.update(metrics_lib.reward_metrics(rewards, _judged(annotations, config.rewards)))
            metrics.update(metrics_lib.rollout_metrics(completions, int(local_batch["attention_mask"].sum())))
            metrics.update(rollouts.metrics(step, completions))
            all_totals = distributed.allgather_host(rewards.totals)
            metrics["grpo/frac_reward_zero_std"] = float(grpo.zero_std_fraction(all_totals, n))
            metrics["grpo/advantage_abs_mean"] = float(np.abs(distributed.allgather_host(advantages)).mean())
            metrics.update(timer.metrics())
            metrics["time/step"] = elapsed
            metrics["perf/tokens_per_s"] = metrics["tokens/step"] / max(elapsed, 1e-9)
            metrics["optim/learning_rate"] = float(
                state_lib.learning_rate_schedule(config.optim, optimizer_steps)(
                    (step - 1) * t_cfg.mini_batches
                )
            )
            metrics.update(val_metrics)
            metrics.update(metrics_lib.data_metrics(getattr(train_data, "stats", {})))
            # The rollout engine's cumulative counters since this (re)start: requests, retries by kind,
            # weight syncs, resyncs of restarted servers (SGLang); a failing server shows here.
            metrics.update(metrics_lib.counter_metrics(getattr(engine, "stats", {}), "rollout"))
            writer.write(step, metrics)
            if t_cfg.log_samples_every and step % t_cfg.log_samples_every == 0:
                writer.write_samples(
                    step,
                    [
                        {
                            "prompt": examples[c.prompt_index].question,
                            "answer": examples[c.prompt_index].answer,
                            "response": c.text,
                            "reward": float(rewards.totals[i]),
                            **{k: float(v[i]) for k, v in rewards.components.items()},
                        }
                        for i, c in enumerate(completions[: t_cfg.samples_logged])
                    ],
                )
            progress.update(step, metrics)
        stopped = stopping()
        if stopped and step > saved_step:
            # The signal may have come after this step's save point: make sure the step is saved
            # (orbax refuses a forced save of a step that already has one).
            ckpt.save(step, state, {"data": rollouts.data_state(), "model": record, "step": step}, force=True)
        if stopped and step < t_cfg.steps and jax.process_index() == 0:
            print(f"pr1.train: stopped after step {step}; checkpoint saved in {ckpt.directory}", flush=True)
    except BaseException:
        if distributed.is_multiprocess():
            # Closing the checkpointer may wait on hosts that are blocked in a collective this
            # process left; the caller aborts the process instead (distributed.abort_peers_on_error).
            ckpt = None
        raise
    finally:
        stop.restore()
        try:
            if ckpt is not None:
                ckpt.close()  # may raise CheckpointSaveError for the last save: the rest still closes
        finally:
            writer.close()
            rollouts.close()
            reward_stage.close()
            close = getattr(engine, "close", None)
            if close is not None:
                close()
    return metrics
