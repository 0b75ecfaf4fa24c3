"""Rollout engines: the embedded JAX sampler (sampler.py) and the SGLang and vLLM clients.

An engine turns prompts into `n` completions each:

    engine.generate(prompts, sampling, n) -> list[Completion]   # prompt-major: p0s0, p0s1, ..., p1s0
    engine.sync_weights(params, step)                          # after every optimizer step

A completion carries exactly the token ids that were sampled and their logprobs under the sampling
temperature (log_softmax(logits / T) before top-k/top-p, which is what the learner recomputes), so
the learner trains on what the engine produced, never on a re-tokenization of its text.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from pr1.models.generation import Completion, Prompt, SamplingParams


class RolloutEngine(Protocol):
    def generate(
        self, prompts: Sequence[Prompt], sampling: SamplingParams, n: int = 1
    ) -> list[Completion]: ...

    def sync_weights(self, params, step: int) -> None: ...
