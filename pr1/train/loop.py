"""The Perception-R1 training loop: rollout → rewards → advantages → update → weight sync, repeated.

One step on the host:

    prompts ──▶ engine.generate(n per prompt)
                  ├──▶ reward stage (thread: math-verify pool + judge requests)   ─┐ overlap
                  └──▶ learner batch ──▶ jitted logprob pass (old policy)          ─┘
    group advantages ──▶ jitted update per mini-batch ──▶ engine.sync_weights ──▶ metrics, checkpoint

Everything that decides the result is deterministic given the config (data order by seed and
epoch, sampling seed per step, the jitted steps), so a run killed at any point and restarted from
its newest checkpoint reproduces the uninterrupted run. SIGTERM / SIGINT finish the current step,
save a checkpoint and return.
"""

from __future__ import annotations

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pr1 import export as export_lib
from pr1 import sharding
from pr1.data.processor import Processor
from pr1.models.config import Qwen25VLConfig
from pr1.rewards.combine import RewardStage
from pr1.rl import grpo
from pr1.rollout.sampler import EmbeddedEngine
from pr1.rollout.types import SamplingParams, default_stop_token_ids
from pr1.train import checkpoint as checkpoint_lib
from pr1.train import metrics as metrics_lib
from pr1.train import state as state_lib
from pr1.train import step as step_lib
from pr1.train.batch import learner_batch
from pr1.train.config import ConfigError, validate_config

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
        print(f"pr1.train: got signal {signum}; finishing this step, saving a checkpoint and exiting",
              flush=True)

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _prepare_inputs(config) -> None:
    """Debug conveniences, both explicit in the config: a tiny model and synthetic data on first use."""
    if config.model.make_tiny_if_missing and not os.path.isdir(config.model.path):
        from pr1.models.tiny import write_tiny_checkpoint
        if jax.process_index() == 0:
            write_tiny_checkpoint(config.model.path, seed=config.train.seed)
    synthetic = config.data.get("synthetic")
    if synthetic and synthetic.get("enabled"):
        from pr1.data.synthetic import write_synthetic
        for files, n, seed in ((config.data.train_files, synthetic.train_rows, synthetic.seed),
                               (config.data.val_files, synthetic.val_rows, synthetic.seed + 1)):
            for path in files:
                if not os.path.exists(path) and jax.process_index() == 0:
                    write_synthetic(path, n=n, seed=seed, task=synthetic.task, image_size=synthetic.image_size)


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
    abstract = state_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params_abstract,
                                    opt_state=jax.eval_shape(tx.init, params_abstract))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _pure(nnx_state):
    return nnx_state.to_pure_dict() if hasattr(nnx_state, "to_pure_dict") else nnx_state


def _make_engine(config, model_def, params, mesh, processor, workdir):
    r = config.rollout
    stop = default_stop_token_ids(processor.tokenizer, model_def.config)
    if r.engine == "embedded":
        return EmbeddedEngine(model_def, params, mesh, processor.tokenizer, stop_token_ids=stop,
                              pad_token_id=processor.pad_token_id, min_prompt_bucket=r.min_prompt_bucket,
                              min_patch_bucket=r.min_patch_bucket)
    from pr1.rollout.sglang import SGLangEngine
    return SGLangEngine.from_config(r.sglang, model_def=model_def, workdir=workdir, tokenizer=processor.tokenizer,
                                    stop_token_ids=stop, assets_from=config.model.path)


def _mini_batches(batch: dict, k: int) -> list[dict]:
    rows = batch["input_ids"].shape[0]
    size = rows // k
    return [{key: v[i * size:(i + 1) * size] for key, v in batch.items()} for i in range(k)]


def _rollout_metrics(completions, batch) -> dict:
    lengths = np.array([len(c.token_ids) for c in completions], np.float32)
    return {
        "response/length_mean": float(lengths.mean()), "response/length_max": float(lengths.max()),
        "response/clip_frac": float(np.mean([c.finish_reason == "length" for c in completions])),
        "response/abort_frac": float(np.mean([c.finish_reason == "abort" for c in completions])),
        "tokens/step": float(batch["attention_mask"].sum()),
    }


def _validate(engine, reward_stage, val_data, config, limit) -> dict:
    """Greedy decoding on the held-out split: accuracy, format and perception reward means."""
    examples = []
    for batch in val_data:
        examples.extend(batch)
        if len(examples) >= limit:
            break
    examples = examples[:limit]
    if not examples:
        return {}
    sampling = SamplingParams(temperature=0.0, max_new_tokens=config.rollout.val_max_new_tokens)
    completions = engine.generate([e.prompt for e in examples], sampling, n=1)
    out = reward_stage.submit([c.text for c in completions], [e.answer for e in examples],
                              [e.annotations for e in examples], group_size=1).result()
    return {"val/accuracy": float(out.components["accuracy"].mean()),
            "val/format": float(out.components["format"].mean()),
            "val/perception": float(out.components["perception"].mean()),
            "val/response_length": float(np.mean([len(c.token_ids) for c in completions])),
            "val/examples": float(len(examples))}


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) training into `workdir`; returns the last step's metrics."""
    from pr1.data import dataset as dataset_lib

    workdir = os.path.abspath(workdir) if "://" not in workdir else workdir
    validate_config(config, num_devices=jax.device_count())
    _prepare_inputs(config)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    t_cfg, r_cfg = config.train, config.rollout
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    batch_rows = mesh.shape["data"] * mesh.shape["fsdp"]
    per_micro = config.data.prompts_per_step * r_cfg.n // t_cfg.mini_batches // config.learner.micro_batches
    if per_micro % batch_rows:
        raise ConfigError(f"learner.micro_batches: micro-batches of {per_micro} responses do not divide over the "
                          f"{batch_rows} devices of mesh axes data x fsdp {dict(mesh.shape)}")
    model_config = Qwen25VLConfig.from_dir(config.model.path)
    processor = Processor.from_dir(config.model.path, min_pixels=config.data.min_pixels,
                                   max_pixels=config.data.max_pixels)
    model_def = state_lib.ModelDef.create(model_config, dtype=jnp.dtype(config.model.dtype))
    optimizer_steps = t_cfg.steps * t_cfg.mini_batches
    tx = state_lib.make_optimizer(config.optim, optimizer_steps, _pure(model_def.abstract_state))

    param_sh = model_def.param_shardings(mesh)
    params_abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, model_def.dtype), _pure(model_def.abstract_state))
    shardings = state_lib.state_shardings(tx, params_abstract, param_sh, mesh)
    ckpt = checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_directory(workdir), keep=t_cfg.keep_checkpoints,
                                       async_save=t_cfg.async_checkpoints, save_interval_steps=t_cfg.checkpoint_every)
    train_data = dataset_lib.train_iterator(config.data, processor)
    start_step = ckpt.latest_step() or 0
    if start_step:
        state, host_state = ckpt.restore(_abstract_state(params_abstract, tx, shardings), start_step)
        train_data.set_state(host_state["data"])
        print(f"pr1.train: resumed from step {start_step} of {ckpt.directory}", flush=True)
    else:
        params = state_lib.load_params(config.model.path, model_def, mesh)
        state, _ = state_lib.create_train_state(params, tx, model_def, mesh)

    engine = _make_engine(config, model_def, state.params, mesh, processor, workdir)
    engine.sync_weights(state.params, start_step)
    reward_stage = RewardStage(config.rewards)
    steps = _StepCache(model_def, tx, config.learner, shardings, mesh)
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step, tensorboard=t_cfg.tensorboard,
                                       wandb_project=t_cfg.wandb_project, run_name=t_cfg.run_name,
                                       config_dict=json.loads(config.to_json_best_effort()))
    progress = metrics_lib.Progress(t_cfg.steps, start_step)
    stop = _StopFlag()
    stop.install()
    record = export_lib.model_record(model_config, config.model.path)
    n = r_cfg.n
    metrics: dict = {}
    step = start_step
    try:
        while step < t_cfg.steps and not stop.requested:
            step += 1
            timer = metrics_lib.StepTimer()
            t0 = time.perf_counter()
            with timer("data"):
                examples = next(train_data)
            prompts = [e.prompt for e in examples]
            sampling = SamplingParams(temperature=r_cfg.temperature, top_p=r_cfg.top_p, top_k=r_cfg.top_k,
                                      max_new_tokens=r_cfg.max_new_tokens, seed=t_cfg.seed * 1_000_003 + step)
            with timer("rollout"):
                completions = engine.generate(prompts, sampling, n=n)
            texts = [c.text for c in completions]
            rewards_future = reward_stage.submit(
                texts, [examples[c.prompt_index].answer for c in completions],
                [examples[c.prompt_index].annotations for c in completions], group_size=n)
            with timer("logprobs"):
                batch = learner_batch(model_config, prompts, completions, max_new_tokens=r_cfg.max_new_tokens,
                                      pad_token_id=processor.pad_token_id, min_prompt_bucket=r_cfg.min_prompt_bucket,
                                      min_patch_bucket=r_cfg.min_patch_bucket)
                batch["old_logprobs"] = np.asarray(steps.logprobs(state.params, batch))
            with timer("judge_wait"):
                rewards = rewards_future.result()
            advantages = np.asarray(grpo.group_advantages(rewards.totals, n))
            batch["advantages"] = advantages.astype(np.float32)
            update_metrics = []
            with timer("update"):
                for mini in _mini_batches(batch, t_cfg.mini_batches):
                    state, m = steps.update(state, mini)
                    m = jax.device_get(m)
                    step_lib.check_finite(m, step)
                    update_metrics.append(m)
            with timer("sync"):
                engine.sync_weights(state.params, step)
            with timer("checkpoint"):
                host_state = {"data": dataset_lib.gather_states(train_data), "model": record, "step": step}
                ckpt.save(step, state, host_state, force=step == t_cfg.steps or stop.requested)
            if t_cfg.val_every and config.data.val_files and step % t_cfg.val_every == 0:
                with timer("validation"):
                    val_data = dataset_lib.val_iterator(config.data, processor)
                    val_metrics = _validate(engine, reward_stage, val_data, config, t_cfg.val_prompts)
            else:
                val_metrics = {}

            elapsed = time.perf_counter() - t0
            metrics = {k: float(np.mean([float(m[k]) for m in update_metrics])) for k in update_metrics[0]}
            metrics = {f"learner/{k}": v for k, v in metrics.items()}
            metrics.update(rewards.metrics)
            metrics.update(_rollout_metrics(completions, batch))
            metrics["grpo/frac_reward_zero_std"] = float(grpo.zero_std_fraction(rewards.totals, n))
            metrics["grpo/advantage_abs_mean"] = float(np.abs(advantages).mean())
            metrics.update(timer.metrics())
            metrics["time/step"] = elapsed
            metrics["perf/tokens_per_s"] = metrics["tokens/step"] / max(elapsed, 1e-9)
            metrics["optim/learning_rate"] = float(state_lib.learning_rate_schedule(config.optim, optimizer_steps)(
                (step - 1) * t_cfg.mini_batches))
            metrics.update(val_metrics)
            metrics.update({f"data/{k}": float(v) for k, v in getattr(train_data, "stats", {}).items()
                            if isinstance(v, (int, float))})
            writer.write(step, metrics)
            if t_cfg.log_samples_every and step % t_cfg.log_samples_every == 0:
                writer.write_samples(step, [
                    {"prompt": examples[c.prompt_index].question, "answer": examples[c.prompt_index].answer,
                     "response": c.text, "reward": float(rewards.totals[i]),
                     **{k: float(v[i]) for k, v in rewards.components.items()}}
                    for i, c in enumerate(completions[:t_cfg.samples_logged])])
            progress.update(step, metrics)
        if stop.requested and step > start_step:
            # The signal may have come after this step's save point: make sure the step is saved.
            ckpt.save(step, state, {"data": dataset_lib.gather_states(train_data), "model": record, "step": step},
                      force=True)
        if stop.requested and step < t_cfg.steps:
            print(f"pr1.train: stopped after step {step}; checkpoint saved in {ckpt.directory}", flush=True)
    finally:
        stop.restore()
        ckpt.close()
        writer.close()
        reward_stage.close()
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    return metrics
