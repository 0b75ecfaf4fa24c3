"""The vLLM rollout engine: HTTP client for vLLM servers plus per-step weight reload from a directory.

Where it sits: with `rollout.engine = "vllm"` the rollout stage of a GRPO step calls
`engine.generate(prompts, sampling, n)` here and the trainer calls `engine.sync_weights(params, step)`
after every optimizer step; `python -m pr1.eval --engine vllm` samples here too. Servers come from
launch/serve_vllm.sh (rollout mode), whose flags this client relies on:
`--logprobs-mode processed_logprobs` (logprobs after temperature, the learner's), `--generation-config
vllm` (no sampling defaults from the checkpoint's generation_config.json, e.g. Qwen's
repetition_penalty 1.05), `--trust-request-chat-template` and `VLLM_SERVER_DEV_MODE=1` (weight reload).
Protocol facts (vLLM 0.32, CPU and GPU builds alike) are in the reference notes on vLLM.

generate: one `POST /v1/chat/completions` per sample (n = 1). Our prompt is already chat-template
text, so the request carries it verbatim: a one-message conversation whose content parts are our
text split at each `<|image_pad|>`, with a PNG data URI of exactly our RGB pixels in each gap, and a
request chat template that concatenates the parts and writes `<|image_pad|>` for each image; vLLM
expands each pad to its feature count as it would for the checkpoint's own template. With
`return_token_ids` the response carries the server's `prompt_token_ids`, which must equal our
`input_ids` exactly (image pads included), and each choice's sampled `token_ids`, whose per-token
logprobs are `choices[0].logprobs.content[j].logprob`. Sent: temperature, top_p = 1, top_k = 0,
min_p = 0, no penalties, max_tokens, stop_token_ids (the stop token stays in `token_ids`; the text
leaves it out; with a tokenizer the engine decodes the text itself, as the embedded sampler does),
skip_special_tokens = false, and a per-sample `seed` derived from
(SamplingParams.seed, prompt, sample), so server rollouts are reproducible for a fixed batch.
top_p < 1 or top_k > 0 are refused: vLLM's processed logprobs are taken after those filters
(renormalized over the kept tokens), which is not what the learner recomputes.

Weights: vLLM's chat responses carry no weight version, so after each sample the engine asks the
server (`GET /weight_info`) and counts the sample only if the server still serves the version last
pushed and was not reloaded while the sample was in flight; otherwise (a restarted server is back on
its launch checkpoint) it loads the current version into it again and samples again. A never-synced
engine (evaluation) skips this check. sync_weights: the weight dir is checked first (config.json,
every safetensors shard present with a readable header that covers its tensors), because a reload
from a bad dir leaves vLLM with empty weights and the next request kills it; then per server
`POST /pause?mode=wait` → `POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path":
DIR}}` → `/reset_prefix_cache` → `/reset_encoder_cache` → `/update_weight_version` → `GET /weight_info`
must report the new version → `/resume` (also after a failure, so no server stays paused). A failed
reload marks the server's version as broken, so no later sample from it is taken as current.
Retries, health checks, restarts waited for (`restart_timeout_s`) and the bookkeeping are shared
with the SGLang engine (`pr1.rollout.remote`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading

import ml_collections
import numpy as np

from pr1.http_policy import retryable_status
from pr1.models.generation import IMAGE_PAD, Completion, Prompt, SamplingParams
from pr1.rollout.remote import RemoteEngine
from pr1.rollout.server_client import RemoteEngineError, Retry

log = logging.getLogger(__name__)

# Renders our content parts back into exactly our prompt text (see the module docstring).
RAW_CHAT_TEMPLATE = (
    "{%- for message in messages -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- else -%}"
    + IMAGE_PAD
    + "{%- endif -%}{%- endfor -%}{%- endfor -%}"
)


class VLLMError(RemoteEngineError):
    """A failure the caller can act on; the message names the server URL(s) or the weight dir."""


def vllm_config() -> ml_collections.ConfigDict:
    """Knobs of the vLLM rollout engine (`rollout.vllm.*`)."""
    return ml_collections.ConfigDict(
        {
            "urls": (),  # e.g. ("http://gpu-node-1:8000",), printed by launch/serve_vllm.sh
            "model": "",  # served model name; "" asks the server (GET /v1/models)
            "concurrency": 64,  # requests in flight over all servers
            # One chat completion (the server answers when the sample is complete).
            "request_timeout_s": 600.0,
            "connect_timeout_s": 10.0,
            "health_timeout_s": 30.0,
            "health_attempts": 3,
            "update_timeout_s": 600.0,  # reload_weights reads the whole checkpoint
            "max_attempts": 5,
            "backoff_base_s": 0.5,
            "backoff_cap_s": 30.0,
            "restart_timeout_s": 900.0,  # one server lost: wait this long for it to come back, then resync
            "keep_versions": 2,  # weight dirs kept under <workdir>/weights/
            "weights_dtype": ml_collections.config_dict.placeholder(str),  # None: model.compute_dtype
            "check_prompt_tokens": True,  # the server's prompt ids must equal ours
        }
    )


def check_weights_dir(path: str) -> None:
    """Raises VLLMError unless `path` holds a loadable HF checkpoint: config.json, and every safetensors
    shard (per the index, or all *.safetensors) present with a header whose tensors fit in the file."""

    def bad(why):
        return VLLMError(f"weight dir {path} {why}; not reloading it (vLLM would be left with empty weights)")

    if not os.path.isdir(path):
        raise bad("does not exist")
    try:
        with open(os.path.join(path, "config.json")) as f:
            if not isinstance(json.load(f), dict):
                raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise bad(f"has no readable config.json ({e})") from None
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise bad(f"has an unreadable model.safetensors.index.json ({e})") from None
    else:
        shards = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not shards:
        raise bad("holds no .safetensors files")
    for name in shards:
        full = os.path.join(path, name)
        try:
            size = os.path.getsize(full)
            with open(full, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n <= 0 or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit in {size} bytes")
                header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end > size:
                raise ValueError(f"tensors end at byte {8 + n + end} of a {size}-byte file (truncated)")
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise bad(f"has a bad shard {name} ({e})") from None


def sample_seed(seed: int, p: int, s: int) -> int:
    """A per-sample seed: n requests of the same prompt must not draw the same sample."""
    digest = hashlib.sha256(f"{int(seed)}:{p}:{s}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def chat_messages(prompt: Prompt, images: list[str]) -> list[dict]:
    """Our chat-template prompt as one message of text parts with an image part at each pad."""
    pieces = prompt.text.split(IMAGE_PAD)
    parts = []
    for i, piece in enumerate(pieces):
        if piece:
            parts.append({"type": "text", "text": piece})
        if i < len(images):
            parts.append({"type": "image_url", "image_url": {"url": images[i]}})
    return [{"role": "user", "content": parts}]


class VLLMEngine(RemoteEngine):
    """`RolloutEngine` backed by one or more vLLM servers (see the module docstring and
    `pr1.rollout.remote.RemoteEngine` for the constructor's arguments; `model` is the served model
    name, "" to ask each server)."""

    kind = "vLLM"
    config_key = "rollout.vllm"
    launch_script = "launch/serve_vllm.sh"
    Error = VLLMError
    extra_config_keys = ("model", "restart_timeout_s")

    def __init__(self, urls, *, model: str = "", restart_timeout_s: float = 900.0, **kwargs):
        self.model = str(model or "")
        self._models: dict[str, str] = {}
        self._model_lock = threading.Lock()
        super().__init__(urls, restart_timeout_s=restart_timeout_s, **kwargs)

    # -- the protocol -------------------------------------------------------------------------------

    def _sampling_payload(self, sampling: SamplingParams, stop: tuple[int, ...]) -> dict:
        if not sampling.greedy and (sampling.top_p < 1 or sampling.top_k > 0):
            raise ValueError(
                f"the vLLM engine samples with top_p = 1 and top_k off only (got top_p={sampling.top_p}, "
                f"top_k={sampling.top_k}): vLLM reports logprobs after those filters, which the "
                "learner does not recompute; set rollout.top_p=1.0 and rollout.top_k=-1"
            )
        return {
            "max_tokens": int(sampling.max_new_tokens),
            "temperature": float(sampling.temperature),
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "stop_token_ids": list(stop),
            "skip_special_tokens": False,
            "include_stop_str_in_output": False,
            "logprobs": True,
            "top_logprobs": 0,
            "return_token_ids": True,
            "n": 1,
            "seed": int(sampling.seed),
            "chat_template": RAW_CHAT_TEMPLATE,
            "add_generation_prompt": False,
        }

    def _model_name(self, url: str) -> str:
        if self.model:
            return self.model
        with self._model_lock:
            if url not in self._models:
                # In the sample path: a lost server is a Retry here too (then waited for).
                status, body = self._http(url, "GET", "/v1/models", None, self.health_timeout_s)
                try:
                    self._models[url] = str(json.loads(body)["data"][0]["id"])
                except (ValueError, TypeError, KeyError, IndexError):
                    raise VLLMError(
                        f"vLLM server {url}: GET /v1/models gave HTTP {status} {body[:300]!r}, no model id; "
                        "set rollout.vllm.model"
                    ) from None
            return self._models[url]

    def _attempt(
        self, url: str, rid: str, p: int, s: int, prompt: Prompt, images: list[str], params: dict
    ) -> Completion:
        payload = dict(
            params,
            model=self._model_name(url),
            messages=chat_messages(prompt, images),
            seed=sample_seed(params["seed"], p, s),
            request_id=rid,
        )
        with self._lock:
            generation = self._generation[url]
        status, body = self._http(url, "POST", "/v1/chat/completions", payload, self.request_timeout_s)
        completion = self._parse(url, status, body, p, s, prompt, payload["model"])
        if self.weight_version is None:
            return completion
        # Which weights made this sample: the server must still serve the version last pushed, and must
        # not have been reloaded while the sample was in flight (a resync of a restarted server).
        served = self._weight_info(url)
        with self._lock:
            reloaded = self._generation[url] != generation
        if served != self.weight_version or reloaded:
            if served != self.weight_version:
                self._resync(url)
            raise Retry(
                "stale_weights",
                f"server serves weight_version {served!r}"
                f"{' (reloaded meanwhile)' if reloaded else ''}, expected "
                f"{self.weight_version!r}",
            )
        completion.weight_version = served
        return completion

    def _weight_info(self, url: str) -> str | None:
        """The served weight version, in the sample path: transport failures are Retry (a lost server)."""
        status, body = self._http(url, "GET", "/weight_info", None, self.health_timeout_s)
        if status == 404:
            raise VLLMError(
                f"vLLM server {url} has no GET /weight_info: start it with VLLM_SERVER_DEV_MODE=1 "
                "(launch/serve_vllm.sh rollout) so weight versions can be checked"
            )
        if status != 200:
            raise Retry("server_error", f"GET /weight_info: HTTP {status}: {body[:200]!r}")
        try:
            return json.loads(body)["weight_version"]
        except (ValueError, KeyError, TypeError):
            raise Retry("invalid_json", f"GET /weight_info: unparsable {body[:200]!r}") from None

    def _parse(
        self, url: str, status: int, body: bytes, p: int, s: int, prompt: Prompt, model: str
    ) -> Completion:
        if retryable_status(status):
            raise Retry("server_error", f"HTTP {status}: {body[:300]!r}")
        if status == 404:
            raise VLLMError(
                f"vLLM server {url} does not serve model {model!r} (HTTP 404: {body[:300]!r}); "
                "fix rollout.vllm.model or leave it empty to use the served one"
            )
        if status != 200:
            raise VLLMError(
                f"vLLM server {url} rejected /v1/chat/completions with HTTP {status}: {body[:500]!r}"
            )
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Retry("invalid_json", f"unparsable chat completion ({len(body)} bytes): {e}") from None

        def protocol(msg):
            return VLLMError(
                f"vLLM server {url}: chat completion {msg}; is it vLLM >= 0.32 started by "
                "launch/serve_vllm.sh?"
            )

        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            raise protocol("does not have exactly one choice")
        choice = choices[0]
        finish = choice.get("finish_reason")
        if finish in ("abort", None):
            raise Retry("abort", f"finish_reason {finish!r}")
        if finish not in ("stop", "length"):
            raise protocol(f"has finish_reason {finish!r}")
        ids = choice.get("token_ids")
        content = (choice.get("logprobs") or {}).get("content")
        if not isinstance(ids, list) or not isinstance(content, list):
            raise protocol(
                "has no token_ids or logprobs.content (return_token_ids and logprobs were requested)"
            )
        if len(ids) != len(content):
            raise protocol(f"has {len(ids)} token_ids but {len(content)} logprobs")
        try:
            ids = np.asarray([int(t) for t in ids], np.int32)
            logprobs = np.asarray([float(c["logprob"]) for c in content], np.float32)
        except (TypeError, ValueError, KeyError):
            raise protocol("has malformed token_ids or logprobs") from None
        # vLLM writes -9999.0 where a logprob is -inf or missing: never a sampled token's true value.
        if not np.all(np.isfinite(logprobs)) or np.any(logprobs <= -9999.0):
            raise protocol("has non-finite logprobs")
        prompt_ids = data.get("prompt_token_ids")
        if self.check_prompt_tokens and len(prompt.input_ids):
            if not isinstance(prompt_ids, list):
                raise protocol("has no prompt_token_ids (return_token_ids was requested)")
            if prompt_ids != prompt.input_ids.tolist():
                first = next(
                    (i for i, (a, b) in enumerate(zip(prompt_ids, prompt.input_ids.tolist())) if a != b),
                    min(len(prompt_ids), len(prompt.input_ids)),
                )
                raise VLLMError(
                    f"vLLM server {url} tokenizes prompt {p} into {len(prompt_ids)} ids, ours has "
                    f"{len(prompt.input_ids)}, first difference at position {first}: the server tokenizes or "
                    "resizes images differently (check its checkpoint's tokenizer and preprocessor_config "
                    "min/max_pixels against ours), so the learner would score a different prompt. "
                    "rollout.vllm.check_prompt_tokens=False skips this check."
                )
        if self.tokenizer is not None:
            # Decoded here as the embedded sampler does: vLLM's incremental detokenizer renders an
            # incomplete UTF-8 sequence at a cut-off end differently, and rewards read this text.
            text = self.tokenizer.decode(
                (ids[:-1] if finish == "stop" else ids).tolist(), skip_special_tokens=False
            )
        else:
            text = (choice.get("message") or {}).get("content") or ""
        return Completion(
            prompt_index=p,
            sample_index=s,
            token_ids=ids,
            logprobs=logprobs,
            text=str(text),
            finish_reason=finish,
            weight_version=None,
        )

    def _served_version(self, url: str) -> str | None:
        status, data, _ = self._control(url, "GET", "/weight_info")
        return data.get("weight_version") if status == 200 and isinstance(data, dict) else None

    def _update_server(self, url: str, path: str, version: str) -> None:
        check_weights_dir(path)  # before any request: a bad dir must never reach the server
        self._bump_generation(url)

        def call(method, route, payload=None, timeout=60.0, attempts=3):
            status, data, body = self._control(
                url, method, route, payload, timeout=timeout, attempts=attempts
            )
            if status != 200:
                raise VLLMError(
                    f"vLLM server {url}: {method} {route} gave HTTP {status}: {body[:300]!r}"
                    + (
                        " (start it with VLLM_SERVER_DEV_MODE=1: launch/serve_vllm.sh rollout)"
                        if status == 404
                        else ""
                    )
                )
            return data

        call("POST", "/pause?mode=wait")
        ok = False
        try:
            # One try: a failed reload can leave partial weights, and repeating it would not say more.
            call(
                "POST",
                "/collective_rpc",
                {"method": "reload_weights", "kwargs": {"weights_path": path}},
                timeout=self.update_timeout_s,
                attempts=1,
            )
            call("POST", "/reset_prefix_cache")
            call("POST", "/reset_encoder_cache")
            call("POST", "/update_weight_version", {"new_version": version})
            got = (call("GET", "/weight_info") or {}).get("weight_version")
            if got != version:
                raise VLLMError(
                    f"vLLM server {url} reports weight_version {got!r} after loading {path}; expected "
                    f"{version!r}"
                )
            ok = True
        except RemoteEngineError:
            # Its weights are now unknown: make sure no later sample from it passes as any version.
            try:
                call("POST", "/update_weight_version", {"new_version": f"broken:{version}"}, attempts=1)
            except RemoteEngineError:
                log.exception("vLLM server %s: could not mark its weights as broken", url)
            raise
        finally:
            try:
                call("POST", "/resume")
            except RemoteEngineError:
                if ok:
                    raise
                log.exception("vLLM server %s: resume after a failed weight update also failed", url)
