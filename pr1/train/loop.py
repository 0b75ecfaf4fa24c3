"""The Perception-R1 training loop: rollout → rewards → advantages → update → weight sync, repeated.

`init_run(config, workdir)` sets a run up once (mesh, train state, rollout engine, reward stage,
checkpointer, data, writers; a `Run`), `train_step(run, step)` is one step, `train` repeats it and
handles stopping. One step on the host:

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
import functools
import json
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pr1 import distributed
from pr1 import sharding as sharding_lib
from pr1.data.processor import Processor
from pr1.models.config import Qwen25VLConfig
from pr1.models.generation import SamplingParams
from pr1.rewards.combine import RewardStage
from pr1.rl import grpo
from pr1.rollout.engines import make_engine
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


def _mini_batches(batch: dict, k: int, mesh) -> list[dict]:
    """Mini-batch i is global rows [i·S, (i+1)·S), as with one process: the rows move between
    devices (and hosts) on the mesh, laid out as the update step takes them."""
    if k == 1:
        return [batch]
    size = batch["input_ids"].shape[0] // k
    # Images stored once per prompt go whole to every mini-batch (its rows index them).
    shared = step_lib.shared_images(batch)
    rows = {key: v for key, v in batch.items() if key not in shared}
    step_lib.check_batch_rows({key: size for key in rows}, mesh)
    sharding = sharding_lib.batch_sharding(mesh)
    return [
        {key: jax.device_put(v[i * size : (i + 1) * size], sharding) for key, v in rows.items()} | shared
        for i in range(k)
    ]


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


@dataclasses.dataclass
class Run:
    """What a run sets up once (`init_run`) and every step uses; `state` advances with each update."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    processor: Processor
    model_def: state_lib.ModelDef
    state: state_lib.TrainState
    start_step: int
    checkpointer: checkpoint_lib.Checkpointer
    train_data: Any
    engine: Any  # a pr1.rollout.RolloutEngine
    reward_stage: RewardStage
    rollouts: rollout_ahead.Rollouts
    logprob_step: Callable  # jit(params, batch) -> old logprobs
    update_step: Callable  # jit(state, mini-batch) -> (state, metrics)
    writer: metrics_lib.MetricsWriter
    progress: metrics_lib.Progress
    record: dict  # the model record every checkpoint carries (pr1.train.checkpoint.model_record)
    stop: _StopFlag = dataclasses.field(default_factory=_StopFlag)
    saved_step: int = 0  # the newest step a save was started for

    def stopping(self) -> bool:
        """A signal may reach some processes only (or at different moments); all stop at the same step."""
        return distributed.any_over_processes(self.stop.requested)

    def host_state(self, step: int) -> dict:
        """What a checkpoint stores beside the train state: data position, model record, step."""
        return {"data": self.rollouts.data_state(), "model": self.record, "step": step}

    def close(self, *, checkpointer: bool = True) -> None:
        """Closes everything the run opened; with checkpointer=False the checkpointer is left alone."""
        try:
            if checkpointer:
                self.checkpointer.close()  # may raise CheckpointSaveError for the last save
        finally:
            self.writer.close()
            self.rollouts.close()
            self.reward_stage.close()
            close = getattr(self.engine, "close", None)
            if close is not None:
                close()


def init_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Sets up a run (or its resumption from the newest checkpoint in `workdir`): validates the config,
    builds the mesh, the train state, the rollout engine (synced to the state), the reward stage, the
    checkpointer, the data iterator and the metric writers."""
    from pr1.data import dataset as dataset_lib

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

    t_cfg = config.train
    mesh = _mesh(config)
    processor, model_def = _model(config)
    model_config = model_def.config
    tx = state_lib.run_optimizer(config, model_def)
    abstract_state, shardings = state_lib.abstract_train_state(model_def, tx, mesh)
    ckpt = checkpoint_lib.Checkpointer(
        checkpoint_lib.checkpoint_directory(workdir),
        keep=t_cfg.keep_checkpoints,
        async_save=t_cfg.async_checkpoints,
        save_interval_steps=t_cfg.checkpoint_every,
    )
    train_data = dataset_lib.train_iterator(config.data, processor)
    start_step = ckpt.latest_step() or 0
    if start_step:
        state = _resume(ckpt, abstract_state, start_step, train_data, config)
    else:
        params = state_lib.load_params(config.model.path, model_def, mesh)
        state, _ = state_lib.create_train_state(params, tx, model_def, mesh)

    engine = make_engine(
        config.rollout,
        model_config=model_config,
        tokenizer=processor.tokenizer,
        pad_token_id=processor.pad_token_id,
        model_def=model_def,
        params=state.params,
        mesh=mesh,
        workdir=workdir,
        assets_from=config.model.path,
    )
    engine.sync_weights(state.params, start_step)
    reward_stage = RewardStage(config.rewards, processes=jax.process_count())
    print(f"pr1.train: process {jax.process_index()}: {reward_stage.budget_line()}", flush=True)
    rollouts = rollout_ahead.Rollouts(
        engine,
        train_data,
        functools.partial(_sampling, config),
        n=config.rollout.n,
        off_policy_steps=config.rollout.off_policy_steps,
        total_steps=t_cfg.steps,
        synced=start_step,
        rewards=reward_stage,
        store_dir=None if "://" in workdir else os.path.join(workdir, rollout_ahead.STORE_DIR),
        keep=t_cfg.checkpoint_every * t_cfg.keep_checkpoints + 2,
    )
    writer = metrics_lib.MetricsWriter(
        log_dir,
        resume_step=start_step,
        tensorboard=t_cfg.tensorboard,
        wandb_project=t_cfg.wandb_project,
        run_name=t_cfg.run_name,
        config_dict=json.loads(config.to_json_best_effort()),
    )
    return Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        processor=processor,
        model_def=model_def,
        state=state,
        start_step=start_step,
        checkpointer=ckpt,
        train_data=train_data,
        engine=engine,
        reward_stage=reward_stage,
        rollouts=rollouts,
        logprob_step=step_lib.make_logprob_step(model_def, config.learner, shardings.params, mesh),
        update_step=step_lib.make_update_step(model_def, tx, config.learner, shardings, mesh),
        writer=writer,
        progress=metrics_lib.Progress(t_cfg.steps, start_step),
        record=checkpoint_lib.model_record(model_config, config.model.path),
        saved_step=start_step,
    )


def _mesh(config) -> jax.sharding.Mesh:
    """The run's device mesh; with several processes, each must hold its own block of batch rows."""
    mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    if distributed.is_multiprocess():
        try:
            distributed.check_process_rows(mesh, sharding_lib.BATCH_AXES)
        except ValueError as e:
            raise ConfigError(f"mesh: {e}") from None
    return mesh


def _model(config) -> tuple[Processor, state_lib.ModelDef]:
    """The processor and the model binding of `config.model` (its dtypes and attention kernel)."""
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
    return processor, model_def


def _resume(ckpt, abstract_state, start_step: int, train_data, config) -> state_lib.TrainState:
    """The train state of checkpoint `start_step`; the data iterator continues where it was."""
    state, host_state = ckpt.restore(abstract_state, start_step)
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
    return state


def _sampling(config, step: int) -> SamplingParams:
    """Step `step`'s sampling: the rollout section's knobs, a seed per step."""
    r = config.rollout
    return SamplingParams(
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        seed=config.train.seed * 1_000_003 + step,
    )


def train_step(run: Run, step: int) -> dict:
    """One GRPO step (DESIGN.md's data flow); returns its metrics, as written to metrics.jsonl."""
    timer = metrics_lib.StepTimer()
    t0 = time.perf_counter()
    # Rollout: the rewards are already being scored (response by response with a server engine).
    examples, completions, rewards_future = run.rollouts.batch(step, run.state.params, timer)
    with timer("logprobs"):
        batch, local_tokens = _old_logprobs(run, examples, completions)
    with timer("judge_wait"):
        rewards = rewards_future.result()
    advantages = _advantages(run, batch, rewards)
    with timer("update"):
        learner_metrics = _update(run, batch, step)
    with timer("sync"):
        run.rollouts.after_update(run.state.params, step)
    with timer("checkpoint"):
        host_state = run.host_state(step)
        force = step == run.config.train.steps or run.stopping()
        if run.checkpointer.save(step, run.state, host_state, force=force):
            run.saved_step = step
    val_metrics = _validation(run, step, timer)
    elapsed = time.perf_counter() - t0
    metrics = _step_metrics(
        run, step, learner_metrics, examples, completions, rewards, advantages, local_tokens
    )
    metrics.update(timer.metrics())
    metrics["time/step"] = elapsed
    metrics["perf/tokens_per_s"] = metrics["tokens/step"] / max(elapsed, 1e-9)
    metrics.update(_run_metrics(run, step, val_metrics))
    run.writer.write(step, metrics)
    _log_samples(run, step, examples, completions, rewards)
    run.progress.update(step, metrics)
    return metrics


def _old_logprobs(run: Run, examples, completions) -> tuple[dict, int]:
    """(the learner batch on the mesh with the old policy's logprobs, this process's real tokens)."""
    r_cfg, model_config = run.config.rollout, run.model_def.config
    prompts = [e.prompt for e in examples]
    # Every process pads to the same buckets: the maxima over all of them.
    extents = distributed.max_over_processes(batch_lib.batch_extents(prompts, completions, model_config))
    local_batch = batch_lib.learner_batch(
        model_config,
        prompts,
        completions,
        max_new_tokens=r_cfg.max_new_tokens,
        pad_token_id=run.processor.pad_token_id,
        min_prompt_bucket=r_cfg.min_prompt_bucket,
        min_patch_bucket=r_cfg.min_patch_bucket,
        extents=extents,
        pixel_dtype=jnp.dtype(run.model_def.compute_dtype),
    )
    batch = batch_lib.on_mesh(local_batch, run.mesh)
    batch["old_logprobs"] = run.logprob_step(run.state.params, batch).block_until_ready()
    return batch, int(local_batch["attention_mask"].sum())


def _advantages(run: Run, batch: dict, rewards) -> np.ndarray:
    """GRPO advantages of this process's groups, added to `batch`; returns them (host, local rows)."""
    # Per group, so each process computes its own groups' advantages.
    advantages = np.asarray(grpo.group_advantages(rewards.totals, run.config.rollout.n))
    placed = batch_lib.on_mesh({"advantages": advantages.astype(np.float32)}, run.mesh)
    batch["advantages"] = placed["advantages"]
    return advantages


def _update(run: Run, batch: dict, step: int) -> list[dict]:
    """One optimizer step per mini-batch; advances `run.state`; returns each update's metrics."""
    out = []
    for mini in _mini_batches(batch, run.config.train.mini_batches, run.mesh):
        run.state, m = run.update_step(run.state, mini)
        m = jax.device_get(m)
        step_lib.check_finite(m, step)
        out.append(m)
    return out


def _validation(run: Run, step: int, timer) -> dict:
    """Validation metrics every train.val_every steps (when there is a val split), else none."""
    from pr1.data import dataset as dataset_lib

    config = run.config
    t_cfg = config.train
    if not (t_cfg.val_every and config.data.val_files and step % t_cfg.val_every == 0):
        return {}
    with timer("validation"):
        # Every process reads the same examples and validates its block of them.
        val_data = dataset_lib.val_iterator(config.data, run.processor, process_index=0, process_count=1)
        return _validate(run.engine, run.reward_stage, val_data, config, t_cfg.val_prompts)


def _step_metrics(
    run: Run, step: int, learner_metrics, examples, completions, rewards, advantages, local_tokens
) -> dict:
    """The learner's, rewards', rollout's and GRPO's metrics of this step, over the global batch."""
    n = run.config.rollout.n
    metrics = {k: float(np.mean([float(m[k]) for m in learner_metrics])) for k in learner_metrics[0]}
    metrics = {f"learner/{k}": v for k, v in metrics.items()}
    metrics.update(metrics_lib.reward_metrics(rewards))
    metrics.update(metrics_lib.rollout_metrics(completions, local_tokens))
    metrics.update(run.rollouts.metrics(step, completions))
    all_totals = distributed.allgather_host(rewards.totals)
    metrics["grpo/frac_reward_zero_std"] = float(grpo.zero_std_fraction(all_totals, n))
    metrics["grpo/advantage_abs_mean"] = float(np.abs(distributed.allgather_host(advantages)).mean())
    return metrics


def _run_metrics(run: Run, step: int, val_metrics: dict) -> dict:
    """Learning rate, validation, data and rollout-engine counters at this step."""
    t_cfg = run.config.train
    schedule = state_lib.learning_rate_schedule(run.config.optim, t_cfg.steps * t_cfg.mini_batches)
    metrics = {"optim/learning_rate": float(schedule((step - 1) * t_cfg.mini_batches))}
    metrics.update(val_metrics)
    metrics.update(metrics_lib.data_metrics(getattr(run.train_data, "stats", {})))
    # The rollout engine's cumulative counters since this (re)start: requests, retries by kind,
    # weight syncs, resyncs of restarted servers (SGLang); a failing server shows here.
    metrics.update(metrics_lib.counter_metrics(getattr(run.engine, "stats", {}), "rollout"))
    return metrics


def _log_samples(run: Run, step: int, examples, completions, rewards) -> None:
    t_cfg = run.config.train
    if not (t_cfg.log_samples_every and step % t_cfg.log_samples_every == 0):
        return
    rows = [
        {
            "prompt": examples[c.prompt_index].question,
            "answer": examples[c.prompt_index].answer,
            "response": c.text,
            "reward": float(rewards.totals[i]),
            **{k: float(v[i]) for k, v in rewards.components.items()},
        }
        for i, c in enumerate(completions[: t_cfg.samples_logged])
    ]
    run.writer.write_samples(step, rows)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) training into `workdir`; returns the last step's metrics."""
    workdir = os.path.abspath(workdir) if "://" not in workdir else workdir
    run = init_run(config, workdir)
    run.stop.install()
    metrics: dict = {}
    step = run.start_step
    close_checkpointer = True
    try:
        while step < config.train.steps and not run.stopping():
            step += 1
            metrics = train_step(run, step)
        stopped = run.stopping()
        if stopped and step > run.saved_step:
            # The signal may have come after this step's save point: make sure the step is saved
            # (orbax refuses a forced save of a step that already has one).
            run.checkpointer.save(step, run.state, run.host_state(step), force=True)
        if stopped and step < config.train.steps and jax.process_index() == 0:
            print(
                f"pr1.train: stopped after step {step}; checkpoint saved in {run.checkpointer.directory}",
                flush=True,
            )
    except BaseException:
        if distributed.is_multiprocess():
            # Closing the checkpointer may wait on hosts that are blocked in a collective this
            # process left; the caller aborts the process instead (distributed.abort_peers_on_error).
            close_checkpointer = False
        raise
    finally:
        run.stop.restore()
        run.close(checkpointer=close_checkpointer)
    return metrics
