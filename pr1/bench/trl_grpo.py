"""One GRPO step of pr1 side by side with TRL's `GRPOTrainer`: same tiny model, prompts, group, length.

    python -m pr1.bench.trl_grpo [--prompts 4 --group 4 --new 16 --steps 4] [--trl_site DIR]

Both trainers start from the same tiny random Qwen2.5-VL checkpoint (`pr1.models.tiny`, written to
a temporary dir) and train on the same `--prompts` synthetic image questions (one 56x56 image
each, `pr1.data.synthetic`), `--group` responses per prompt, at most `--new` new tokens sampled at
temperature 1, with the same host-side reward, AdamW, clip 0.2/0.3 and no KL term. A step is what
each trainer does per optimizer step: sampling, reward, advantages, the update (pr1 also runs its
old-policy logprob pass, which TRL skips when it takes one optimizer step per generation). pr1
runs on this machine's JAX devices, TRL (PyTorch) on CPU, in one process: TRL's trainer runs on a
thread held between optimizer steps, so after one warm-up step of each the two alternate step by
step (`pr1.bench.ratio`) and the ratio of steps per second pr1 / TRL is the median of the pairs,
printed with its min-max.

TRL is not a pr1 dependency. It is imported only here; install it into a throwaway environment
that sees the system packages, so the pinned transformers/torch stay as they are, and point
--trl_site (or PR1_TRL_SITE) at its site-packages:

    python -m venv --system-site-packages /tmp/trl_venv && /tmp/trl_venv/bin/pip install trl==1.16.0
    python -m pr1.bench.trl_grpo --trl_site /tmp/trl_venv/lib/python3.11/site-packages

Transformers' Qwen2.5-VL processor needs torchvision for its video half; without torchvision it
is loaded through `pr1.bench.hf_peer.load_hf_processor` (images only).
"""

from __future__ import annotations

import importlib
import io
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np
from absl import flags

from pr1 import cli

TRL_VERSION = "1.16.0"  # the release checked against transformers 5.23.0 and torch 2.13.0
FORMAT_INSTRUCTION = "Put the answer in \\boxed{}."  # configs/debug.py's short instruction
IMAGE_SIZE = 56


def import_trl(site: str | None = None):
    """The `trl` module, from `site` (appended to sys.path, so installed packages keep precedence)."""
    if site:
        if not os.path.isdir(site):
            raise ImportError(f"--trl_site / PR1_TRL_SITE {site} is not a directory")
        if site not in sys.path:
            sys.path.append(site)
            importlib.invalidate_caches()
            # transformers memoizes which optional packages exist (lru_cache'd is_accelerate_available,
            # ...); if another benchmark imported it before the site was added, Trainer would still
            # report accelerate missing.
            import_utils = sys.modules.get("transformers.utils.import_utils")
            for fn in vars(import_utils).values() if import_utils is not None else ():
                if callable(getattr(fn, "cache_clear", None)):
                    fn.cache_clear()
    try:
        import trl
    except ImportError as e:
        raise ImportError(
            f"TRL not installed (pip install trl=={TRL_VERSION} into a venv with "
            f"--system-site-packages, then --trl_site DIR): {e}"
        ) from None
    return trl


def bench_reward(text: str) -> float:
    """The reward both trainers use: distinct characters / 10. Cheap, deterministic, and it varies
    within a group, so advantages are not all zero; its value is not what is being measured."""
    return len(set(text)) / 10


def synthetic_problems(n: int) -> list[dict]:
    """`n` synthetic color questions: {"question" (with the format instruction), "image" (PIL RGB)}."""
    from PIL import Image

    from pr1.data.synthetic import make_row

    out = []
    for i in range(n):
        row = make_row("color", 0, i, IMAGE_SIZE)
        image = Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB")
        out.append(
            {"question": f"{row['problem'].replace('<image>', '')} {FORMAT_INSTRUCTION}", "image": image}
        )
    return out


def pr1_step_times(
    checkpoint: str,
    problems: list[dict],
    *,
    group: int,
    max_new_tokens: int,
    steps: int,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> list[float]:
    """Seconds of each of `steps` pr1 GRPO steps (rollout, reward, logprobs, update, weight sync)."""
    stepper = pr1_steps(
        checkpoint,
        problems,
        group=group,
        max_new_tokens=max_new_tokens,
        steps=steps,
        learning_rate=learning_rate,
        seed=seed,
    )
    return [next(stepper) for _ in range(steps)]


def pr1_steps(
    checkpoint: str,
    problems: list[dict],
    *,
    group: int,
    max_new_tokens: int,
    steps: int,
    learning_rate: float = 1e-2,
    seed: int = 0,
):
    """A generator: each next() runs one pr1 GRPO step (rollout, reward, logprobs, update, weight
    sync) and yields its seconds; `steps` in all (the learning-rate schedule's length)."""
    import jax
    import jax.numpy as jnp

    from pr1 import sharding
    from pr1.data.processor import Processor
    from pr1.models.generation import Prompt, SamplingParams, default_stop_token_ids
    from pr1.models.model_def import ModelDef
    from pr1.rl import grpo
    from pr1.rollout.sampler import EmbeddedEngine
    from pr1.train import state as state_lib
    from pr1.train import step as step_lib
    from pr1.train.batch import learner_batch

    processor = Processor.from_dir(checkpoint)
    config = processor.config
    prompts = [Prompt.build(processor, p["question"], [np.asarray(p["image"])]) for p in problems]
    mesh = sharding.make_mesh(1, -1, 1, devices=jax.local_devices())
    model_def = ModelDef.create(config, dtype=jnp.float32)
    optim = state_lib.optimizer_config()
    optim.learning_rate, optim.warmup_ratio = learning_rate, 0.0
    tx = state_lib.make_optimizer(optim, total_steps=steps)
    params = state_lib.load_params(checkpoint, model_def, mesh)
    state, shardings = state_lib.create_train_state(params, tx, model_def, mesh)
    engine = EmbeddedEngine(
        model_def,
        state.params,
        mesh,
        processor.tokenizer,
        stop_token_ids=default_stop_token_ids(processor.tokenizer, config),
        pad_token_id=processor.pad_token_id,
        min_prompt_bucket=64,
        min_patch_bucket=16,
    )
    learner = step_lib.learner_config()
    # jit compiles once per batch shape; the shapes repeat from step to step.
    logprobs = step_lib.make_logprob_step(model_def, learner, shardings.params, mesh)
    update = step_lib.make_update_step(model_def, tx, learner, shardings, mesh)

    for step in range(1, steps + 1):
        start = time.perf_counter()
        completions = engine.generate(
            prompts,
            SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed * 1_000_003 + step),
            n=group,
        )
        rewards = np.array([bench_reward(c.text) for c in completions], np.float32)
        batch = learner_batch(
            config,
            prompts,
            completions,
            max_new_tokens=max_new_tokens,
            pad_token_id=processor.pad_token_id,
            min_prompt_bucket=64,
            min_patch_bucket=16,
        )
        batch["old_logprobs"] = np.asarray(logprobs(state.params, batch))
        batch["advantages"] = np.asarray(grpo.group_advantages(rewards, group), np.float32)
        state, metrics = update(state, batch)
        step_lib.check_finite(jax.device_get(metrics), step)
        engine.sync_weights(state.params, step)
        seconds = time.perf_counter() - start
        print(f"pr1 step {step}/{steps}: {seconds:.2f} s", flush=True)
        yield seconds


def _hf_processor(checkpoint: str):
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(checkpoint, local_files_only=True)
    from pr1.bench.hf_peer import load_hf_processor

    return load_hf_processor(checkpoint)


def trl_step_times(
    checkpoint: str,
    problems: list[dict],
    *,
    group: int,
    max_new_tokens: int,
    steps: int,
    learning_rate: float = 1e-2,
    seed: int = 0,
    site: str | None = None,
) -> list[float]:
    """Seconds of each of `steps` optimizer steps of TRL's GRPOTrainer on the same problems."""
    stepper = TRLSteps(
        checkpoint,
        problems,
        group=group,
        max_new_tokens=max_new_tokens,
        steps=steps,
        learning_rate=learning_rate,
        seed=seed,
        site=site,
    )
    try:
        return [stepper.step() for _ in range(steps)]
    finally:
        stepper.close()


class TRLSteps:
    """TRL's GRPOTrainer one optimizer step at a time: `trainer.train()` runs on a thread and a
    callback holds it before each step until `step()` lets one through, so TRL's steps can be
    interleaved with pr1's (A B A B ...) in one process. Only one side computes at any moment."""

    def __init__(
        self,
        checkpoint: str,
        problems: list[dict],
        *,
        group: int,
        max_new_tokens: int,
        steps: int,
        learning_rate: float = 1e-2,
        seed: int = 0,
        site: str | None = None,
    ):
        import_trl(site)
        import torch
        from datasets import Dataset
        from transformers import Qwen2_5_VLForConditionalGeneration, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        self.steps, self.done_steps = steps, 0
        self._go, self._done = threading.Semaphore(0), threading.Semaphore(0)
        self._error: BaseException | None = None
        self._closing = False
        gate = self

        class Gate(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                gate._go.acquire()
                if gate._closing:
                    control.should_training_stop = True
                gate._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                gate._seconds = time.perf_counter() - gate._start
                gate._done.release()

        def reward(completions, **kwargs):
            # Conversational prompts give completions as [{"role": "assistant", "content": text}].
            return [bench_reward(c[0]["content"] if isinstance(c, list) else c) for c in completions]

        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
        data = Dataset.from_list(
            [
                {
                    "prompt": [
                        {
                            "role": "user",
                            "content": [{"type": "image"}, {"type": "text", "text": p["question"]}],
                        }
                    ],
                    "image": p["image"],
                }
                for p in problems
            ]
        )
        self._out = tempfile.mkdtemp(prefix="pr1-bench-trl-")
        args = GRPOConfig(
            output_dir=self._out,
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            seed=seed,
            dataloader_num_workers=0,
            per_device_train_batch_size=len(problems) * group,
            num_generations=group,
            max_completion_length=max_new_tokens,
            temperature=1.0,
            max_steps=steps,
            learning_rate=learning_rate,
            lr_scheduler_type="constant",
            max_grad_norm=1.0,
            beta=0.0,
            epsilon=0.2,
            epsilon_high=0.3,
            loss_type="dapo",
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[reward],
            args=args,
            train_dataset=data,
            processing_class=_hf_processor(checkpoint),
            callbacks=[Gate()],
        )

        def train():
            try:
                trainer.train()
            except BaseException as e:  # handed to the caller of step()
                self._error = e
            finally:
                self._done.release()

        self._thread = threading.Thread(target=train, name="trl-train", daemon=True)
        self._thread.start()

    def step(self) -> float:
        """Runs one TRL optimizer step and returns its seconds (step begin to step end)."""
        if self.done_steps >= self.steps:
            raise RuntimeError(f"TRL was configured for {self.steps} steps")
        self._go.release()
        self._done.acquire()
        if self._error is not None:
            raise RuntimeError(
                f"TRL GRPOTrainer failed: {type(self._error).__name__}: {self._error}"
            ) from self._error
        if not self._thread.is_alive() and self.done_steps + 1 < self.steps:
            raise RuntimeError("TRL GRPOTrainer stopped early")
        self.done_steps += 1
        print(f"TRL step {self.done_steps}/{self.steps}: {self._seconds:.2f} s", flush=True)
        return self._seconds

    def close(self) -> None:
        self._closing = True
        self._go.release()  # a trainer still waiting at a step begin stops there
        self._thread.join(60)
        shutil.rmtree(self._out, ignore_errors=True)


def measure(
    *,
    prompts: int = 4,
    group: int = 4,
    max_new_tokens: int = 16,
    steps: int = 5,
    seed: int = 0,
    site: str | None = None,
) -> dict:
    """After one warm-up step of each (compilation), `steps` interleaved pairs of pr1 and TRL steps
    (`pr1.bench.ratio`). Returns median step seconds pr1_step_s / trl_step_s, ratio (median of the
    per-pair TRL s / pr1 s: pr1 steps per second over TRL's) with ratio_min / ratio_max and
    ratio_stats, and every step's seconds. Raises ImportError when TRL cannot be imported."""
    from pr1.bench import ratio as ratio_lib

    import_trl(site)  # fail before any work when TRL is absent
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (recorded pairs after a warm-up step of each), got {steps}")
    from pr1.models.tiny import write_tiny_checkpoint

    work = tempfile.mkdtemp(prefix="pr1-bench-trl-grpo-")
    ours, theirs = [], []
    try:
        checkpoint = write_tiny_checkpoint(
            os.path.join(work, "tiny"), seed=seed, max_pixels=IMAGE_SIZE * IMAGE_SIZE
        )
        problems = synthetic_problems(prompts)
        kw = dict(group=group, max_new_tokens=max_new_tokens, steps=steps + 1, seed=seed)
        pr1_gen = pr1_steps(checkpoint, problems, **kw)
        trl = TRLSteps(checkpoint, problems, site=site, **kw)
        try:

            def pr1_rate():
                ours.append(next(pr1_gen))
                return 1 / ours[-1]

            def trl_rate():
                theirs.append(trl.step())
                return 1 / theirs[-1]

            (stats,) = ratio_lib.interleaved(
                pr1_rate,
                trl_rate,
                repeats=steps,
                warmup=1,
                label="pr1/TRL",
                log=lambda line: print(line, flush=True),
            ).values()
        finally:
            trl.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dict(
        prompts=prompts,
        group=group,
        max_new_tokens=max_new_tokens,
        pr1_step_s=1 / stats.ours_median,
        trl_step_s=1 / stats.peer_median,
        ratio=stats.median,
        ratio_min=stats.lo,
        ratio_max=stats.hi,
        ratio_stats=stats,
        pr1_times=ours,
        trl_times=theirs,
    )


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("prompts", 4, "prompts per step", flag_values=fv)
    flags.DEFINE_integer("group", 4, "responses per prompt (the GRPO group)", flag_values=fv)
    flags.DEFINE_integer("new", 16, "max new tokens per response", flag_values=fv)
    flags.DEFINE_integer(
        "steps", 5, "interleaved pr1/TRL step pairs after one warm-up step of each", flag_values=fv
    )
    flags.DEFINE_string(
        "trl_site",
        os.environ.get("PR1_TRL_SITE"),
        "site-packages dir holding trl (default: $PR1_TRL_SITE)",
        flag_values=fv,
    )


def run(argv=None) -> dict:
    """Parses the CLI flags in `argv` and returns `measure`'s numbers."""
    args = cli.parse("pr1.bench.trl_grpo", argv, define_flags, doc=__doc__)
    return measure(
        prompts=args.prompts, group=args.group, max_new_tokens=args.new, steps=args.steps, site=args.trl_site
    )


def main(argv=None) -> int:
    try:
        r = run(argv)
    except ImportError as e:
        print(f"pr1.bench.trl_grpo skipped: {e}", file=sys.stderr)
        return 1
    print(
        f"GRPO step, {r['prompts']} prompts x {r['group']} responses, <= {r['max_new_tokens']} new tokens, "
        f"one {IMAGE_SIZE}x{IMAGE_SIZE} image each"
    )
    print(f"pr1  {r['pr1_step_s']:8.3f} s/step")
    print(f"TRL  {r['trl_step_s']:8.3f} s/step")
    print(f"ratio pr1/TRL (steps per second): {r['ratio_stats']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
