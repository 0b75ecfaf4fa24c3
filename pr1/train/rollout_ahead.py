"""A training step's prompts and responses, on-policy or generated one step ahead.

Where it sits: `pr1.train.loop` asks `Rollouts.batch(step, params, timer)` for step k's examples and
completions, calls `after_update(params, step)` where it used to sync weights, and stores
`data_state()` in its checkpoint.

rollout.off_policy_steps = 0 (default; the paper is on-policy): step k samples its responses with
the params after k-1 updates (weight version step-(k-1)), trains, then pushes step-k weights.

rollout.off_policy_steps = 1 (server engines only: SGLang, vLLM): while the learner trains on step
k, the servers already generate step k+1's responses. Precisely, at step k:

    1. take step k's completions (the generation launched during step k-1; step 1, and the first
       step after a resume, generate or load them here);
    2. push the params after k-1 updates (version step-(k-1)) to the servers (no request is in
       flight then, so every sample of a batch comes from one version);
    3. read step k+1's prompts and launch their generation on a background thread (version
       step-(k-1));
    4. the loop computes rewards, old logprobs and the update of step k.

So step k >= 2 trains params step-(k-1) on responses sampled by step-(k-2): one update stale (step
1 is on-policy). The learner's old-logprob pass is the importance-ratio denominator as always; the
sampler/learner mismatch is in learner/sampler_trainer/logp_diff, and `learner.tis_cap` applies the
truncated-IS correction to it (pr1.rl.grpo). rollout/weight_version and rollout/policy_lag record
which version produced each step's responses.

Exact resume: the checkpoint of step k stores the data position *before* step k+1's prompts were
read, and the finished step-k+1 completions are written to `<workdir>/rollout_ahead/step-<k+1>.p<i>.npz`
(process i's block, with a fingerprint of its prompts) before the checkpoint is taken. A resumed run
re-reads step k+1's prompts and takes those completions, so it continues as the uninterrupted run
did. Without that file (a run started with off_policy_steps = 0, a remote workdir) the resumed step
k+1 is generated from the step-k weights, with a warning.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import logging
import os
import re
from typing import Callable

import jax
import numpy as np

from pr1.models.generation import Completion, SamplingParams

log = logging.getLogger(__name__)

STORE_DIR = "rollout_ahead"
_VERSION = re.compile(r"^step-(\d+)$")


def prompts_fingerprint(prompts) -> str:
    """What identifies a batch of prompts: sha256 over their token ids (images enter as their pads)."""
    h = hashlib.sha256()
    for p in prompts:
        ids = np.asarray(p.input_ids, np.int64)
        h.update(np.int64(ids.size).tobytes())
        h.update(ids.tobytes())
    return h.hexdigest()


def save_completions(path: str, completions: list[Completion], fingerprint: str) -> None:
    """The completions as one npz (no pickle), written atomically."""
    lengths = np.array([len(c.token_ids) for c in completions], np.int64)
    arrays = dict(
        fingerprint=np.array(fingerprint),
        prompt_index=np.array([c.prompt_index for c in completions], np.int64),
        sample_index=np.array([c.sample_index for c in completions], np.int64),
        lengths=lengths,
        token_ids=np.concatenate(
            [np.asarray(c.token_ids, np.int32) for c in completions] or [np.zeros(0, np.int32)]
        ),
        logprobs=np.concatenate(
            [np.asarray(c.logprobs, np.float32) for c in completions] or [np.zeros(0, np.float32)]
        ),
        text=np.array([c.text for c in completions], dtype=np.str_),
        finish_reason=np.array([c.finish_reason for c in completions], dtype=np.str_),
        weight_version=np.array(
            ["" if c.weight_version is None else c.weight_version for c in completions], dtype=np.str_
        ),
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_completions(path: str, fingerprint: str) -> list[Completion] | None:
    """The completions stored at `path`, or None when the file is absent or holds other prompts."""
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        if str(z["fingerprint"]) != fingerprint:
            log.warning("%s holds completions of other prompts; not used", path)
            return None
        ends = np.cumsum(z["lengths"])
        starts = ends - z["lengths"]
        token_ids, logprobs = z["token_ids"], z["logprobs"]
        return [
            Completion(
                prompt_index=int(p),
                sample_index=int(s),
                token_ids=token_ids[a:b].copy(),
                logprobs=logprobs[a:b].copy(),
                text=str(t),
                finish_reason=str(f),
                weight_version=str(v) or None,
            )
            for p, s, a, b, t, f, v in zip(
                z["prompt_index"],
                z["sample_index"],
                starts,
                ends,
                z["text"],
                z["finish_reason"],
                z["weight_version"],
            )
        ]


def version_number(version: str | None) -> int | None:
    m = _VERSION.match(version or "")
    return int(m.group(1)) if m else None


@dataclasses.dataclass
class _Pending:
    step: int
    examples: list
    future: cf.Future
    launch_version: int


class _Snapshot:
    """An iterator state taken earlier, shaped for `pr1.data.dataset.gather_states`."""

    def __init__(self, state: dict, process_count: int):
        self.state, self.process_count = state, process_count

    def get_state(self) -> dict:
        return self.state


class Rollouts:
    """Step k's (examples, completions) from `engine` and `train_data` (module doc).

    sampling_for(step) -> SamplingParams (its seed makes the step's samples reproducible); `synced`
    is the weight version the engine serves now (the loop's start-up sync); `store_dir` is where
    in-flight completions are kept for an exact resume (None: not kept).
    """

    def __init__(
        self,
        engine,
        train_data,
        sampling_for: Callable[[int], SamplingParams],
        *,
        n: int,
        off_policy_steps: int,
        total_steps: int,
        synced: int,
        rewards=None,
        store_dir: str | None = None,
        keep: int = 4,
    ):
        if off_policy_steps not in (0, 1):
            raise ValueError(f"rollout.off_policy_steps must be 0 or 1, got {off_policy_steps}")
        self.engine, self.data, self.sampling_for = engine, train_data, sampling_for
        self.rewards = rewards  # a pr1.rewards.combine.RewardStage
        self.n, self.off_policy_steps, self.total_steps = n, off_policy_steps, total_steps
        self.synced = synced
        self.store_dir, self.keep = store_dir, keep
        self.launch_version = synced  # the version the current step's completions were sampled with
        self._pending: _Pending | None = None
        self._data_state: dict | None = None
        self._pool = (
            cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead")
            if off_policy_steps
            else None
        )

    # -- the loop's calls

    def batch(self, step: int, params, timer) -> tuple[list, list[Completion], object]:
        """Step k's (examples, completions, rewards future): the rewards are being scored already,
        response by response as they finished (server engines), or from the whole batch (embedded)."""
        if not self.off_policy_steps:
            with timer("data"):
                examples = next(self.data)
            self.launch_version = self.synced
            with timer("rollout"):
                completions, rewards = self._generate(step, examples)
            return examples, completions, rewards

        pending, self._pending = self._pending, None
        if pending is not None and pending.step == step:
            examples = pending.examples
            with timer("rollout_wait"):  # what the background generation did not hide
                completions, rewards = pending.future.result()
            self.launch_version = pending.launch_version
        else:
            with timer("data"):
                examples = next(self.data)
            completions = self._stored(step, examples)
            if completions is None:
                self.launch_version = self.synced
                with timer("rollout"):
                    completions, rewards = self._generate(step, examples)
            else:
                self.launch_version = _min_version(completions, self.synced)
                rewards = self._score(examples, completions)
        if self.synced != step - 1:
            with timer("sync"):
                self.engine.sync_weights(params, step - 1)
            self.synced = step - 1
        if step < self.total_steps:
            self._data_state = self.data.get_state()
            with timer("data"):
                ahead = next(self.data)
            future = self._pool.submit(self._generate_ahead, step + 1, ahead)
            self._pending = _Pending(step + 1, ahead, future, self.synced)
        return examples, completions, rewards

    def after_update(self, params, step: int) -> None:
        """On-policy: the engine gets the new weights now. One step ahead: at the next batch(), once
        the in-flight generation has finished."""
        if not self.off_policy_steps:
            self.engine.sync_weights(params, step)
            self.synced = step

    def data_state(self) -> dict:
        """The data position a checkpoint of this step must hold (a collective with several processes).
        One step ahead: before the in-flight step's prompts, whose completions are stored first."""
        from pr1.data.dataset import gather_states

        if self._pending is None:
            return gather_states(self.data)
        self._pending.future.result()  # its completions are on disk before the checkpoint names them
        return gather_states(_Snapshot(self._data_state, self.data.process_count))

    def metrics(self, step: int, completions: list[Completion]) -> dict[str, float]:
        """rollout/weight_version (the version that sampled this step's responses, the oldest if
        several) and rollout/policy_lag (updates between it and the params being trained)."""
        from pr1 import distributed

        # The oldest over every process's block (a no-op with one process).
        (neg,) = distributed.max_over_processes([-_min_version(completions, self.launch_version)])
        version = -neg
        return {"rollout/weight_version": float(version), "rollout/policy_lag": float(step - 1 - version)}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)  # an error must not wait on a long rollout

    # -- internals

    def _path(self, step: int) -> str:
        return os.path.join(self.store_dir, f"step-{step}.p{jax.process_index()}.npz")

    def _stream(self, examples: list):
        n = self.n
        return self.rewards.stream(
            [examples[i // n].answer for i in range(len(examples) * n)],
            [examples[i // n].annotations for i in range(len(examples) * n)],
            group_size=n,
        )

    def _generate(self, step: int, examples: list):
        """(completions, rewards future); a server engine hands each completion to the reward stage
        as it finishes, the embedded one returns the batch at once and it is scored then."""
        prompts = [e.prompt for e in examples]
        sampling = self.sampling_for(step)
        if self.rewards is None:
            return self.engine.generate(prompts, sampling, n=self.n), None
        if not getattr(self.engine, "streams_completions", False):
            completions = self.engine.generate(prompts, sampling, n=self.n)
            return completions, self._score(examples, completions)
        stream, n = self._stream(examples), self.n
        completions = self.engine.generate(
            prompts,
            sampling,
            n=n,
            on_complete=lambda c: stream.add(c.prompt_index * n + c.sample_index, c.text),
        )
        return completions, stream.finish()

    def _score(self, examples: list, completions: list[Completion]):
        if self.rewards is None:
            return None
        stream = self._stream(examples)
        for c in completions:
            stream.add(c.prompt_index * self.n + c.sample_index, c.text)
        return stream.finish()

    def _generate_ahead(self, step: int, examples: list):
        completions, rewards = self._generate(step, examples)
        if self.store_dir is not None:
            prompts = [e.prompt for e in examples]
            save_completions(self._path(step), completions, prompts_fingerprint(prompts))
            self._prune(step)
        return completions, rewards

    def _stored(self, step: int, examples: list) -> list[Completion] | None:
        if self.store_dir is None:
            return None
        completions = load_completions(self._path(step), prompts_fingerprint([e.prompt for e in examples]))
        if completions is None and step > 1:
            log.warning(
                "rollout.off_policy_steps=1: no stored completions of step %d in %s; generating them "
                "from the current weights (the resumed run differs from an uninterrupted one here)",
                step,
                self.store_dir,
            )
        return completions

    def _prune(self, newest: int) -> None:
        pattern = re.compile(rf"^step-(\d+)\.p{jax.process_index()}\.npz$")
        for name in os.listdir(self.store_dir):
            m = pattern.match(name)
            if m and int(m.group(1)) <= newest - self.keep:
                try:
                    os.remove(os.path.join(self.store_dir, name))
                except FileNotFoundError:
                    pass


def _min_version(completions: list[Completion], default: int) -> int:
    versions = [version_number(c.weight_version) for c in completions]
    known = [v for v in versions if v is not None]
    return min(known) if known and len(known) == len(versions) else default
