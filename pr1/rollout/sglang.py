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

Failures: connection errors, timeouts, 5xx/429, truncated or invalid JSON and `abort` finish reasons
are retried with exponential backoff and jitter, each attempt with a fresh request id (and on another
server when there are several); `engine.stats` counts every retry by kind. Any other 4xx, or a
response that breaks the protocol, is an error at once naming the URL; after `max_attempts` the error
names the servers tried and the last failure. A completion is never made up.

Each request opens its own connection: rollout requests last seconds, so a TCP handshake is noise,
and a pooled keep-alive connection idling through an optimizer step would be closed by the server
and turn the first request of every step into a spurious retry.

sync_weights: `hf.save` writes `<workdir>/weights/step-N/` (every process takes part: it gathers
sharded params), then process 0 runs, per server, pause_generation → update_weights_from_disk →
get_weight_version check → continue_generation (also when the update fails, so no server stays
paused), and deletes all but the newest `keep_versions` weight dirs. The servers must see the
workdir path (same node or shared filesystem).
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures as cf
import http.client
import io
import json
import logging
import os
import random
import re
import shutil
import threading
import time
import urllib.parse
import uuid
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from pr1.data.processor import IMAGE_PAD, load_rgb
from pr1.rollout.types import FINISH_REASONS, Completion, Prompt, SamplingParams, default_stop_token_ids

log = logging.getLogger(__name__)

RETRY_KINDS = ("connection", "timeout", "server_error", "invalid_json", "abort")
_VERSION_DIR = re.compile(r"^step-(\d+)$")


class SGLangError(RuntimeError):
    """A failure the caller can act on; the message names the server URL(s)."""


class _Retry(Exception):
    """One failed attempt that may succeed when repeated."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def sglang_config() -> ml_collections.ConfigDict:
    """Knobs of the SGLang rollout engine (`rollout.sglang.*`)."""
    return ml_collections.ConfigDict({
        "urls": (),                    # e.g. ("http://gpu-node-1:30000",), printed by launch/serve_rollout.sh
        "concurrency": 64,             # /generate requests in flight over all servers
        "request_timeout_s": 600.0,    # one /generate (the server answers when the sample is complete)
        "connect_timeout_s": 10.0,
        "health_timeout_s": 30.0,      # SGLang's /health runs a one-token generation (up to ~20 s)
        "health_attempts": 3,
        "update_timeout_s": 600.0,     # update_weights_from_disk reads the whole checkpoint
        "max_attempts": 5,
        "backoff_base_s": 0.5,
        "backoff_cap_s": 30.0,
        "keep_versions": 2,            # weight dirs kept under <workdir>/weights/
        "weights_dtype": ml_collections.config_dict.placeholder(str),  # None: model.compute_dtype
        "check_prompt_tokens": True,   # server prompt length must equal ours
    })


def _split_url(url: str) -> tuple[str, str, int | None, str]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"SGLang server URL {url!r} must look like http://host:port")
    return parts.scheme, parts.hostname, parts.port, parts.path.rstrip("/")


def image_data_uri(image) -> str:
    """An image (PIL, HxWx3 uint8 array, encoded bytes or a path) as a lossless PNG data URI of the
    RGB pixels our processor would see."""
    buf = io.BytesIO()
    Image.fromarray(load_rgb(image)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class SGLangEngine:
    """`RolloutEngine` backed by one or more SGLang servers (see the module docstring).

    `model_def` (a `pr1.train.state.ModelDef`) is needed only by `sync_weights`, which rebuilds the
    model around the params to save it; `assets_from` is the checkpoint dir whose tokenizer and
    processor files are copied next to every weight version. `stop_token_ids=None` takes EOS and
    `<|im_end|>` from `tokenizer` and `model_def.config`.
    """

    def __init__(self, urls: Sequence[str], *, model_def=None, workdir: str | os.PathLike | None = None,
                 tokenizer=None, stop_token_ids: Sequence[int] | None = None,
                 assets_from: str | os.PathLike | None = None, concurrency: int = 64,
                 request_timeout_s: float = 600.0, connect_timeout_s: float = 10.0,
                 health_timeout_s: float = 30.0, health_attempts: int = 3, update_timeout_s: float = 600.0,
                 max_attempts: int = 5, backoff_base_s: float = 0.5, backoff_cap_s: float = 30.0,
                 keep_versions: int = 2, weights_dtype=None, check_prompt_tokens: bool = True,
                 check_health: bool = True):
        if isinstance(urls, str):
            urls = [urls]
        self.urls = list(dict.fromkeys(str(u).rstrip("/") for u in urls))
        if not self.urls:
            raise ValueError("rollout.sglang.urls is empty; start a server with launch/serve_rollout.sh and "
                             "pass its URL")
        self._parts = {u: _split_url(u) for u in self.urls}
        for name, value, low in (("concurrency", concurrency, 1), ("max_attempts", max_attempts, 1),
                                 ("health_attempts", health_attempts, 1), ("keep_versions", keep_versions, 1)):
            if int(value) < low:
                raise ValueError(f"rollout.sglang.{name} must be >= {low}, got {value}")
        if stop_token_ids is None and tokenizer is not None and model_def is not None:
            stop_token_ids = default_stop_token_ids(tokenizer, model_def.config)
        if not stop_token_ids:
            raise ValueError("SGLangEngine needs default stop token ids (EOS, <|im_end|>): pass stop_token_ids, "
                             "or tokenizer and model_def")
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids)
        self.model_def = model_def
        self.tokenizer = tokenizer
        self.workdir = None if workdir is None else os.fspath(workdir)
        self.assets_from = None if assets_from is None else os.fspath(assets_from)
        self.concurrency = int(concurrency)
        self.request_timeout_s = float(request_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.health_timeout_s = float(health_timeout_s)
        self.health_attempts = int(health_attempts)
        self.update_timeout_s = float(update_timeout_s)
        self.max_attempts = int(max_attempts)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_cap_s = float(backoff_cap_s)
        self.keep_versions = int(keep_versions)
        # Unset: what the embedded sampler would sample with (the compute dtype), not the fp32 masters.
        if weights_dtype is None:
            weights_dtype = getattr(model_def, "compute_dtype", None)
        self.weights_dtype = None if weights_dtype is None else jnp.dtype(weights_dtype)
        self.check_prompt_tokens = bool(check_prompt_tokens)
        self.weight_version: str | None = None
        self._weights_path: str | None = None
        self._resync_locks: dict[str, threading.Lock] = {}

        self._lock = threading.Lock()
        self._stats: collections.Counter = collections.Counter()
        self._inflight = {u: 0 for u in self.urls}
        self._next = 0
        self._rng = random.Random()
        self._pool = cf.ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="sglang")
        if check_health:
            self.check_health()

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, **kwargs) -> "SGLangEngine":
        """From `sglang_config()` knobs; `kwargs` (model_def, workdir, tokenizer, assets_from, ...) pass through."""
        return cls(list(cfg.urls), concurrency=cfg.concurrency, request_timeout_s=cfg.request_timeout_s,
                   connect_timeout_s=cfg.connect_timeout_s, health_timeout_s=cfg.health_timeout_s,
                   health_attempts=cfg.health_attempts, update_timeout_s=cfg.update_timeout_s,
                   max_attempts=cfg.max_attempts, backoff_base_s=cfg.backoff_base_s,
                   backoff_cap_s=cfg.backoff_cap_s, keep_versions=cfg.keep_versions,
                   weights_dtype=cfg.weights_dtype, check_prompt_tokens=cfg.check_prompt_tokens, **kwargs)

    # -- public API ---------------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        """Cumulative counters: requests (HTTP /generate attempts), samples (completions returned),
        retries/<kind> for kind in RETRY_KINDS (transport faults), weight_syncs, retries/stale_weights
        (samples from a server that lost the pushed weights, e.g. restarted) and resyncs (such a server
        given the current weights again)."""
        with self._lock:
            out = {"requests": 0, "samples": 0, "weight_syncs": 0, "resyncs": 0, "retries/stale_weights": 0}
            out.update({f"retries/{k}": 0 for k in RETRY_KINDS})
            out.update(self._stats)
            return out

    def check_health(self) -> None:
        """GET /health on every server, a few tries each, in bounded time; raises naming the dead ones."""
        def probe(url):
            last = None
            for attempt in range(1, self.health_attempts + 1):
                try:
                    status, body = self._http(url, "GET", "/health", None, self.health_timeout_s,
                                              connect_timeout=min(self.connect_timeout_s, self.health_timeout_s))
                    if status == 200:
                        return None
                    last = f"HTTP {status} {body[:200]!r}"
                except _Retry as e:
                    last = str(e)
                if attempt < self.health_attempts:
                    time.sleep(self._backoff(attempt, base=min(self.backoff_base_s, 1.0), cap=5.0))
            return last

        with cf.ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            results = list(pool.map(probe, self.urls))
        dead = [f"{u} ({err})" for u, err in zip(self.urls, results) if err is not None]
        if dead:
            raise SGLangError(f"SGLang rollout server(s) not healthy after {self.health_attempts} tries of "
                              f"GET /health: {'; '.join(dead)}. Start them with launch/serve_rollout.sh and "
                              "wait until they answer, or fix rollout.sglang.urls.")

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingParams, n: int = 1) -> list[Completion]:
        """n completions per prompt, prompt-major (p0s0, p0s1, ..., p1s0, ...)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        prompts = list(prompts)
        if not prompts:
            return []
        stop = sampling.stop_ids(self.stop_token_ids)
        for i, p in enumerate(prompts):
            pads = p.text.count(IMAGE_PAD)
            if pads != len(p.images):
                raise ValueError(f"prompt {i}: its text holds {pads} {IMAGE_PAD} placeholders but it carries "
                                 f"{len(p.images)} images (the SGLang engine sends Prompt.images, not pixel_values)")
        params = {
            "max_new_tokens": int(sampling.max_new_tokens),
            "temperature": float(sampling.temperature),
            "top_p": float(sampling.top_p),
            "top_k": int(sampling.top_k) if sampling.top_k > 0 else -1,
            "stop_token_ids": list(stop),
            "n": 1,
            "skip_special_tokens": False,
            "no_stop_trim": False,
        }
        cancel = threading.Event()
        images = list(self._pool.map(lambda p: [image_data_uri(im) for im in p.images], prompts))
        futures = [self._pool.submit(self._sample, p, s, prompts[p], images[p], params, cancel)
                   for p in range(len(prompts)) for s in range(n)]
        cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
        failed = [f for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
        if failed:
            cancel.set()
            for f in futures:
                f.cancel()
            raise failed[0].exception()
        return [f.result() for f in futures]

    def sync_weights(self, params, step: int) -> None:
        """Write `params` as `<workdir>/weights/step-N/` and load it into every server (see module doc)."""
        if self.model_def is None or self.workdir is None:
            raise ValueError("SGLangEngine.sync_weights needs model_def= and workdir= at construction")
        from pr1.models import hf  # the model stack is only needed for weight sync

        version = f"step-{int(step)}"
        path = os.path.join(os.path.abspath(self.workdir), "weights", version)
        hf.save(self.model_def.bind(params), path, assets_from=self.assets_from, dtype=self.weights_dtype)
        error = None
        if jax.process_index() == 0:
            try:
                self._update_servers(path, version)
                self._prune_versions(version)
            except SGLangError as e:
                error = e
        if jax.process_count() > 1:
            # Every process learns the outcome, so none waits forever or samples from stale servers.
            from jax.experimental import multihost_utils
            ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
            if not int(ok) and error is None:
                error = SGLangError(f"SGLang weight sync to {version} failed on process 0 (see its log)")
        if error is not None:
            raise error
        self.weight_version, self._weights_path = version, path
        with self._lock:
            self._stats["weight_syncs"] += 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- one sample ---------------------------------------------------------------------------------

    def _sample(self, p: int, s: int, prompt: Prompt, images: list[str], params: dict,
                cancel: threading.Event) -> Completion:
        tried, last_url, last_error = [], None, None
        for attempt in range(1, self.max_attempts + 1):
            if cancel.is_set():
                raise SGLangError("generate cancelled after another sample failed")
            url = self._acquire(avoid=last_url)
            rid = f"pr1-{uuid.uuid4().hex}"
            payload = {"text": prompt.text, "sampling_params": params, "return_logprob": True,
                       "logprob_start_len": -1, "rid": rid}
            if images:
                payload["image_data"] = images
            try:
                with self._lock:
                    self._stats["requests"] += 1
                try:
                    status, body = self._http(url, "POST", "/generate", payload, self.request_timeout_s)
                finally:
                    self._release(url)
                completion = self._parse_generate(url, status, body, p, s, prompt)
                if self._stale(completion):
                    # The server no longer serves the weights we pushed (it was restarted, and came
                    # back with its launch checkpoint): push them again and sample again, or the
                    # learner would train on another policy's samples.
                    self._resync(url)
                    raise _Retry("stale_weights", f"served weight_version {completion.weight_version!r}, "
                                                  f"expected {self.weight_version!r}")
                with self._lock:
                    self._stats["samples"] += 1
                return completion
            except _Retry as e:
                if e.kind == "timeout":
                    self._abort_quietly(url, rid)  # the server would otherwise keep generating it
                with self._lock:
                    self._stats[f"retries/{e.kind}"] += 1
                tried.append(url)
                last_url, last_error = url, e
                if attempt < self.max_attempts:
                    log.warning("SGLang %s /generate attempt %d/%d failed (%s): %s", url, attempt,
                                self.max_attempts, e.kind, e)
                    cancel.wait(self._backoff(attempt))
        raise SGLangError(
            f"SGLang /generate failed {self.max_attempts} times for prompt {p} sample {s}; servers tried: "
            f"{', '.join(dict.fromkeys(tried))}; last error from {last_url} ({last_error.kind}): {last_error}")

    def _parse_generate(self, url: str, status: int, body: bytes, p: int, s: int, prompt: Prompt) -> Completion:
        if status >= 500 or status == 429:
            raise _Retry("server_error", f"HTTP {status}: {body[:300]!r}")
        if status != 200:
            raise SGLangError(f"SGLang server {url} rejected /generate with HTTP {status}: {body[:500]!r}")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _Retry("invalid_json", f"unparsable /generate response ({len(body)} bytes): {e}") from None

        def protocol(msg):
            return SGLangError(f"SGLang server {url}: /generate response {msg}; is it the pinned SGLang version "
                               "(launch/serve_rollout.sh)?")

        if isinstance(data, list) and len(data) == 1:
            data = data[0]
        meta = data.get("meta_info") if isinstance(data, dict) else None
        if not isinstance(meta, dict):
            raise protocol("has no meta_info")
        finish = meta.get("finish_reason")
        kind = finish.get("type") if isinstance(finish, dict) else finish
        if kind == "abort":
            raise _Retry("abort", f"finish_reason abort: {finish.get('message') if isinstance(finish, dict) else ''}")
        if kind not in FINISH_REASONS:
            raise protocol(f"has finish_reason {finish!r}")
        entries = meta.get("output_token_logprobs")
        if not isinstance(entries, list):
            raise protocol("has no meta_info.output_token_logprobs (return_logprob was requested)")
        try:
            logprobs = np.asarray([e[0] for e in entries], np.float32)
            logprob_ids = [int(e[1]) for e in entries]
        except (TypeError, ValueError, IndexError):
            raise protocol("has malformed output_token_logprobs (want [[logprob, token_id, text], ...])") from None
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
        if self.check_prompt_tokens and prompt_tokens is not None and len(prompt.input_ids) \
                and int(prompt_tokens) != len(prompt.input_ids):
            raise SGLangError(
                f"SGLang server {url} counts {prompt_tokens} prompt tokens for prompt {p} but our processor makes "
                f"{len(prompt.input_ids)}: the server tokenizes or resizes images differently (check its "
                "checkpoint's tokenizer and preprocessor_config min/max_pixels against ours), so the learner "
                "would score a different prompt. rollout.sglang.check_prompt_tokens=False skips this check.")
        return Completion(prompt_index=p, sample_index=s, token_ids=np.asarray(ids, np.int32), logprobs=logprobs,
                          text=str(data.get("text", "")), finish_reason=kind,
                          weight_version=meta.get("weight_version"))

    # -- servers: choice, HTTP, weight updates ---------------------------------------------------------

    def _acquire(self, avoid: str | None = None) -> str:
        """The least-loaded server (round-robin among ties), preferring not `avoid` after a failure."""
        with self._lock:
            candidates = [u for u in self.urls if u != avoid] or self.urls
            k = len(self.urls)
            order = sorted(candidates, key=lambda u: (self._inflight[u], (self.urls.index(u) - self._next) % k))
            url = order[0]
            self._next = (self.urls.index(url) + 1) % k
            self._inflight[url] += 1
            return url

    def _release(self, url: str) -> None:
        with self._lock:
            self._inflight[url] -= 1

    def _backoff(self, attempt: int, base: float | None = None, cap: float | None = None) -> float:
        """Exponential backoff with jitter: uniform in [d/2, d], d = min(cap, base * 2^(attempt-1))."""
        base = self.backoff_base_s if base is None else base
        cap = self.backoff_cap_s if cap is None else cap
        d = min(cap, base * 2 ** (attempt - 1))
        return d * (0.5 + 0.5 * self._rng.random())

    def _http(self, url: str, method: str, path: str, payload: Any, timeout: float,
              connect_timeout: float | None = None) -> tuple[int, bytes]:
        """(status, body) of one request on a fresh connection; transport failures raise _Retry."""
        scheme, host, port, base = self._parts[url]
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        conn = cls(host, port, timeout=self.connect_timeout_s if connect_timeout is None else connect_timeout)
        try:
            try:
                conn.connect()
            except (OSError, http.client.HTTPException) as e:  # refused, unreachable, connect timeout
                raise _Retry("connection", f"{method} {path}: cannot connect: {type(e).__name__}: {e}") from None
            conn.sock.settimeout(timeout)
            body = None if payload is None else json.dumps(payload).encode()
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, base + path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except http.client.IncompleteRead as e:
            raise _Retry("invalid_json", f"{method} {path}: truncated body ({len(e.partial)} bytes read)") from None
        except TimeoutError:
            raise _Retry("timeout", f"{method} {path}: no answer within {timeout:g} s") from None
        except (OSError, http.client.HTTPException) as e:
            raise _Retry("connection", f"{method} {path}: {type(e).__name__}: {e}") from None
        finally:
            conn.close()

    def _abort_quietly(self, url: str, rid: str) -> None:
        try:
            self._http(url, "POST", "/abort_request", {"rid": rid}, timeout=5.0, connect_timeout=5.0)
        except _Retry:
            pass

    def _control(self, url: str, method: str, path: str, payload: Any = None, timeout: float = 60.0,
                 attempts: int = 3) -> tuple[int, Any, bytes]:
        """A weight-sync call: transport failures and 5xx are retried; returns (status, JSON or None, body)."""
        last = None
        for attempt in range(1, attempts + 1):
            try:
                status, body = self._http(url, method, path, payload, timeout)
                if status < 500:
                    try:
                        data = json.loads(body) if body else None
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        data = None
                    return status, data, body
                last = f"HTTP {status}: {body[:300]!r}"
            except _Retry as e:
                last = str(e)
            if attempt < attempts:
                time.sleep(self._backoff(attempt))
        raise SGLangError(f"SGLang server {url}: {method} {path} failed {attempts} times; last error: {last}")

    def _update_server(self, url: str, path: str, version: str) -> None:
        status, _, body = self._control(url, "POST", "/pause_generation", {})
        if status != 200:
            raise SGLangError(f"SGLang server {url}: POST /pause_generation gave HTTP {status}: {body[:300]!r}")
        failed = True
        try:
            status, data, body = self._control(
                url, "POST", "/update_weights_from_disk",
                {"model_path": path, "weight_version": version, "flush_cache": True, "abort_all_requests": False},
                timeout=self.update_timeout_s)
            if status != 200 or not isinstance(data, dict) or not data.get("success"):
                message = data.get("message") if isinstance(data, dict) else body[:300]
                raise SGLangError(f"SGLang server {url} could not load {path} (HTTP {status}): {message}; it keeps "
                                  "its previous weights")
            status, data, body = self._control(url, "GET", "/get_weight_version")
            got = data.get("weight_version") if isinstance(data, dict) else None
            if status != 200 or got != version:
                raise SGLangError(f"SGLang server {url} reports weight_version {got!r} (HTTP {status}) after loading "
                                  f"{path}; expected {version!r}")
            failed = False
        finally:
            try:
                status, _, body = self._control(url, "POST", "/continue_generation", {})
                if status != 200:
                    raise SGLangError(f"SGLang server {url}: POST /continue_generation gave HTTP {status}: "
                                      f"{body[:300]!r}; the server may still be paused")
            except SGLangError:
                if not failed:
                    raise
                log.exception("SGLang server %s: continue_generation after a failed update also failed", url)

    def _stale(self, completion: Completion) -> bool:
        return (self.weight_version is not None and completion.weight_version is not None
                and completion.weight_version != self.weight_version)

    def _resync(self, url: str) -> None:
        """Loads the current weight version into `url` again, once however many samples noticed."""
        with self._lock:
            lock = self._resync_locks.setdefault(url, threading.Lock())
        with lock:
            status, data, _ = self._control(url, "GET", "/get_weight_version")
            got = data.get("weight_version") if isinstance(data, dict) else None
            if status == 200 and got == self.weight_version:
                return  # another sample already resynced it
            log.warning("SGLang server %s serves weight_version %r instead of %r (restarted?): loading %s again",
                        url, got, self.weight_version, self._weights_path)
            self._update_server(url, self._weights_path, self.weight_version)
            with self._lock:
                self._stats["resyncs"] += 1

    def _update_servers(self, path: str, version: str) -> None:
        with cf.ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            futures = {url: pool.submit(self._update_server, url, path, version) for url in self.urls}
        errors = [str(f.exception()) for f in futures.values() if f.exception() is not None]
        if errors:
            raise SGLangError(f"weight sync to {version} failed on {len(errors)} of {len(self.urls)} server(s): "
                              + " | ".join(errors))
        log.info("SGLang servers now serve %s from %s", version, path)

    def _prune_versions(self, current: str) -> None:
        """Keep `current` and the newest others (by write time) up to keep_versions; delete the rest."""
        root = os.path.join(self.workdir, "weights")
        entries = []
        for name in os.listdir(root):
            full = os.path.join(root, name)
            if name != current and _VERSION_DIR.match(name) and os.path.isdir(full):
                entries.append((os.stat(full).st_mtime_ns, int(_VERSION_DIR.match(name).group(1)), full))
        entries.sort(reverse=True)
        for _, _, full in entries[self.keep_versions - 1:]:
            shutil.rmtree(full, ignore_errors=True)
