"""The SGLang rollout engine: HTTP client for SGLang servers plus per-step weight sync from disk.

Where it sits: on GPU clusters the rollout stage of a GRPO step calls `engine.generate(prompts,
sampling, n)` here instead of the embedded sampler, and the trainer calls `engine.sync_weights(params,
step)` after every optimizer step. Protocol facts (endpoints, JSON shapes) follow the pinned SGLang
version in launch/serve_rollout.sh; see also the reference notes on SGLang.

generate: one native `POST /generate` per sample (`n = 1`, as RL frameworks do), at most
`concurrency` in flight, each sent to the least-loaded server. The prompt goes as chat-template
text with one `<|image_pad|>` per image, which the server expands itself; images go as PNG data
URIs of exactly the RGB pixels our processor sees (EXIF orientation and alpha already applied), so
the server's preprocessing starts from the same pixels. The training ids are the server's: token ids
from `output_ids` (or `output_token_logprobs[i][1]`), logprobs from `output_token_logprobs[i][0]`,
and the server's `prompt_tokens` must equal our prompt length, or the learner would score a
different prompt than the one that was sampled.

`sampling_params` sent: max_new_tokens, temperature, top_p, top_k (-1 = off), stop_token_ids, n = 1,
skip_special_tokens = false and no_stop_trim = false. The stop token stays in the ids either way
(trimming only touches the text), so the default trim gives the `Completion` contract: ids include
the stop token, text does not. SGLang's per-request seed is not part of the pinned protocol, so
`SamplingParams.seed` is not sent and server rollouts are not reproducible run to run.

Retries, server choice, health checks and the weight-sync bookkeeping are shared with the vLLM
engine (`pr1.rollout.remote`). sync_weights: per server, pause_generation → update_weights_from_disk →
get_weight_version check → continue_generation (also when the update fails, so no server stays
paused). Every completion carries the server's `weight_version`; one that differs from the version
last pushed (a restarted server) makes the engine load that version into it again and sample again.
"""

from __future__ import annotations

import json
import logging

import ml_collections
import numpy as np

from pr1.http_policy import retryable_status
from pr1.models.generation import FINISH_REASONS, Completion, Prompt, SamplingParams
from pr1.rollout.remote import RemoteEngine
from pr1.rollout.server_client import RemoteEngineError, Retry

log = logging.getLogger(__name__)


class SGLangError(RemoteEngineError):
    """A failure the caller can act on; the message names the server URL(s)."""


def sglang_config() -> ml_collections.ConfigDict:
    """Knobs of the SGLang rollout engine (`rollout.sglang.*`)."""
    return ml_collections.ConfigDict(
        {
            "urls": (),  # e.g. ("http://gpu-node-1:30000",), printed by launch/serve_rollout.sh
            "concurrency": 64,  # /generate requests in flight over all servers
            "request_timeout_s": 600.0,  # one /generate (the server answers when the sample is complete)
            "connect_timeout_s": 10.0,
            "health_timeout_s": 30.0,  # SGLang's /health runs a one-token generation (up to ~20 s)
            "health_attempts": 3,
            "update_timeout_s": 600.0,  # update_weights_from_disk reads the whole checkpoint
            "max_attempts": 5,
            "backoff_base_s": 0.5,
            "backoff_cap_s": 30.0,
            "keep_versions": 2,  # weight dirs kept under <workdir>/weights/
            "weights_dtype": ml_collections.config_dict.placeholder(str),  # None: model.compute_dtype
            "check_prompt_tokens": True,  # server prompt length must equal ours
        }
    )


class SGLangEngine(RemoteEngine):
    """`RolloutEngine` backed by one or more SGLang servers (see the module docstring and
    `pr1.rollout.remote.RemoteEngine` for the constructor's arguments)."""

    kind = "SGLang"
    config_key = "rollout.sglang"
    launch_script = "launch/serve_rollout.sh"
    Error = SGLangError

    # -- the protocol -------------------------------------------------------------------------------

    def _sampling_payload(self, sampling: SamplingParams, stop: tuple[int, ...]) -> dict:
        return {
            "max_new_tokens": int(sampling.max_new_tokens),
            "temperature": float(sampling.temperature),
            "top_p": float(sampling.top_p),
            "top_k": int(sampling.top_k) if sampling.top_k > 0 else -1,
            "stop_token_ids": list(stop),
            "n": 1,
            "skip_special_tokens": False,
            "no_stop_trim": False,
        }

    def _attempt(
        self, url: str, rid: str, p: int, s: int, prompt: Prompt, images: list[str], params: dict
    ) -> Completion:
        payload = {
            "text": prompt.text,
            "sampling_params": params,
            "return_logprob": True,
            "logprob_start_len": -1,
            "rid": rid,
        }
        if images:
            payload["image_data"] = images
        status, body = self._http(url, "POST", "/generate", payload, self.request_timeout_s)
        completion = self._parse_generate(url, status, body, p, s, prompt)
        if self._stale(completion):
            # The server no longer serves the weights we pushed (it was restarted, and came back with
            # its launch checkpoint): push them again and sample again, or the learner would train on
            # another policy's samples.
            self._resync(url)
            raise Retry(
                "stale_weights",
                f"served weight_version {completion.weight_version!r}, expected {self.weight_version!r}",
            )
        return completion

    def _abort_quietly(self, url: str, rid: str) -> None:
        try:
            self._http(url, "POST", "/abort_request", {"rid": rid}, timeout=5.0, connect_timeout=5.0)
        except Retry:
            pass

    def _served_version(self, url: str) -> str | None:
        status, data, _ = self._control(url, "GET", "/get_weight_version")
        return data.get("weight_version") if status == 200 and isinstance(data, dict) else None

    def _parse_generate(
        self, url: str, status: int, body: bytes, p: int, s: int, prompt: Prompt
    ) -> Completion:
        if retryable_status(status):
            raise Retry("server_error", f"HTTP {status}: {body[:300]!r}")
        if status != 200:
            raise SGLangError(f"SGLang server {url} rejected /generate with HTTP {status}: {body[:500]!r}")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Retry("invalid_json", f"unparsable /generate response ({len(body)} bytes): {e}") from None

        def protocol(msg):
            return SGLangError(
                f"SGLang server {url}: /generate response {msg}; is it the pinned SGLang version "
                "(launch/serve_rollout.sh)?"
            )

        if isinstance(data, list) and len(data) == 1:
            data = data[0]
        meta = data.get("meta_info") if isinstance(data, dict) else None
        if not isinstance(meta, dict):
            raise protocol("has no meta_info")
        finish = meta.get("finish_reason")
        kind = finish.get("type") if isinstance(finish, dict) else finish
        if kind == "abort":
            raise Retry(
                "abort", f"finish_reason abort: {finish.get('message') if isinstance(finish, dict) else ''}"
            )
        if kind not in FINISH_REASONS:
            raise protocol(f"has finish_reason {finish!r}")
        entries = meta.get("output_token_logprobs")
        if not isinstance(entries, list):
            raise protocol("has no meta_info.output_token_logprobs (return_logprob was requested)")
        try:
            logprobs = np.asarray([e[0] for e in entries], np.float32)
            logprob_ids = [int(e[1]) for e in entries]
        except (TypeError, ValueError, IndexError):
            raise protocol(
                "has malformed output_token_logprobs (want [[logprob, token_id, text], ...])"
            ) from None
        ids = data.get("output_ids")
        if ids is None:
            ids = logprob_ids  # versions that only return ids without --return-token-ids
        if len(ids) != len(entries):
            raise protocol(f"has {len(ids)} output_ids but {len(entries)} output_token_logprobs")
        if list(map(int, ids)) != logprob_ids:
            raise protocol("has output_ids that differ from the ids in output_token_logprobs")
        if not np.all(np.isfinite(logprobs)):
            raise protocol("has non-finite logprobs")
        prompt_tokens = meta.get("prompt_tokens")
        if (
            self.check_prompt_tokens
            and prompt_tokens is not None
            and len(prompt.input_ids)
            and int(prompt_tokens) != len(prompt.input_ids)
        ):
            raise SGLangError(
                f"SGLang server {url} counts {prompt_tokens} prompt tokens for prompt {p} but our "
                f"processor makes {len(prompt.input_ids)}: the server tokenizes or resizes images "
                "differently (check its "
                "checkpoint's tokenizer and preprocessor_config min/max_pixels against ours), so the learner "
                "would score a different prompt. rollout.sglang.check_prompt_tokens=False skips this check."
            )
        return Completion(
            prompt_index=p,
            sample_index=s,
            token_ids=np.asarray(ids, np.int32),
            logprobs=logprobs,
            text=str(data.get("text", "")),
            finish_reason=kind,
            weight_version=meta.get("weight_version"),
        )

    def _update_server(self, url: str, path: str, version: str) -> None:
        status, _, body = self._control(url, "POST", "/pause_generation", {})
        if status != 200:
            raise SGLangError(
                f"SGLang server {url}: POST /pause_generation gave HTTP {status}: {body[:300]!r}"
            )
        failed = True
        try:
            status, data, body = self._control(
                url,
                "POST",
                "/update_weights_from_disk",
                {
                    "model_path": path,
                    "weight_version": version,
                    "flush_cache": True,
                    "abort_all_requests": False,
                },
                timeout=self.update_timeout_s,
            )
            if status != 200 or not isinstance(data, dict) or not data.get("success"):
                message = data.get("message") if isinstance(data, dict) else body[:300]
                raise SGLangError(
                    f"SGLang server {url} could not load {path} (HTTP {status}): {message}; it keeps "
                    "its previous weights"
                )
            status, data, body = self._control(url, "GET", "/get_weight_version")
            got = data.get("weight_version") if isinstance(data, dict) else None
            if status != 200 or got != version:
                raise SGLangError(
                    f"SGLang server {url} reports weight_version {got!r} (HTTP {status}) after loading "
                    f"{path}; expected {version!r}"
                )
            failed = False
        finally:
            try:
                status, _, body = self._control(url, "POST", "/continue_generation", {})
                if status != 200:
                    raise SGLangError(
                        f"SGLang server {url}: POST /continue_generation gave HTTP {status}: "
                        f"{body[:300]!r}; the server may still be paused"
                    )
            except SGLangError:
                if not failed:
                    raise
                log.exception("SGLang server %s: continue_generation after a failed update also failed", url)

    def _stale(self, completion: Completion) -> bool:
        return (
            self.weight_version is not None
            and completion.weight_version is not None
            and completion.weight_version != self.weight_version
        )
