"""What the HTTP rollout engines (SGLang, vLLM) share: server choice, retries, health, weight sync.

Where it sits: `pr1.rollout.sglang` and `pr1.rollout.vllm` subclass `RemoteEngine` and supply the
protocol: how one sample is requested and parsed (`_attempt`), how one server loads a weight dir
(`_update_server`) and which weight version it serves (`_served_version`). Everything that does not
depend on the protocol lives here once:

generate: one request per sample (`n = 1`, as RL frameworks do), at most `concurrency` in flight,
each sent to the least-loaded server. Connection errors, timeouts, 5xx/429, truncated or invalid
JSON and `abort` finish reasons are retried with exponential backoff and jitter, each attempt with a
fresh request id (and on another server when there are several); `engine.stats` counts every retry
by kind. Any other 4xx, or a response that breaks the protocol, is an error at once naming the URL;
after `max_attempts` the error names the servers tried and the last failure. A completion is never
made up. With `restart_timeout_s > 0` and one server, a lost connection makes the sample wait (once,
whichever sample noticed first) for the server's /health to answer again within that time, log it,
and load the current weights into it again before sampling; a server not back in time is an error
naming its URL.

Each request opens its own connection: rollout requests last seconds, so a TCP handshake is noise,
and a pooled keep-alive connection idling through an optimizer step would be closed by the server
and turn the first request of every step into a spurious retry.

sync_weights: `hf.save` writes `<workdir>/weights/step-N/` (every process takes part: it gathers
sharded params), then process 0 loads it into every server (`_update_server`) and deletes all but
the newest `keep_versions` weight dirs; every process learns the outcome. The servers must see the
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
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from pr1.images import load_rgb
from pr1.models.generation import IMAGE_PAD
from pr1.models.generation import Completion, Prompt, SamplingParams, default_stop_token_ids

log = logging.getLogger(__name__)

RETRY_KINDS = ("connection", "timeout", "server_error", "invalid_json", "abort")
VERSION_DIR = re.compile(r"^step-(\d+)$")


class RemoteEngineError(RuntimeError):
    """A failure the caller can act on; the message names the server URL(s)."""


class Retry(Exception):
    """One failed attempt that may succeed when repeated."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def split_url(url: str, kind: str = "rollout") -> tuple[str, str, int | None, str]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{kind} server URL {url!r} must look like http://host:port")
    return parts.scheme, parts.hostname, parts.port, parts.path.rstrip("/")


def image_data_uri(image) -> str:
    """An image (PIL, HxWx3 uint8 array, encoded bytes or a path) as a lossless PNG data URI of the
    RGB pixels our processor would see."""
    buf = io.BytesIO()
    Image.fromarray(load_rgb(image)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _handed_over(completion: Completion, on_complete: Callable[[Completion], None]) -> Completion:
    on_complete(completion)
    return completion


class RemoteEngine:
    """`RolloutEngine` backed by HTTP servers; subclasses speak one server's protocol (module doc).

    `model_def` (a `pr1.train.state.ModelDef`) is needed only by `sync_weights`, which rebuilds the
    model around the params to save it; `assets_from` is the checkpoint dir whose tokenizer and
    processor files are copied next to every weight version. `stop_token_ids=None` takes EOS and
    `<|im_end|>` from `tokenizer` and `model_def.config`.
    """

    kind = "rollout"  # the server's name in messages
    config_key = "rollout.?"  # where its knobs live, for messages
    launch_script = "launch/"  # how to start one, for messages
    Error = RemoteEngineError
    # Config knobs of this engine's section beyond the ones every remote engine takes.
    extra_config_keys: tuple[str, ...] = ()
    _CONFIG_KEYS = (
        "concurrency",
        "request_timeout_s",
        "connect_timeout_s",
        "health_timeout_s",
        "health_attempts",
        "update_timeout_s",
        "max_attempts",
        "backoff_base_s",
        "backoff_cap_s",
        "keep_versions",
        "weights_dtype",
        "check_prompt_tokens",
    )

    @classmethod
    def from_config(cls, cfg, **kwargs):
        """From the engine's config section (`sglang_config()`, `vllm_config()`); `kwargs` (model_def,
        workdir, tokenizer, assets_from, ...) pass through."""
        knobs = {key: cfg[key] for key in cls._CONFIG_KEYS + cls.extra_config_keys}
        return cls(list(cfg.urls), **knobs, **kwargs)

    def __init__(
        self,
        urls: Sequence[str],
        *,
        model_def=None,
        workdir: str | os.PathLike | None = None,
        tokenizer=None,
        stop_token_ids: Sequence[int] | None = None,
        assets_from: str | os.PathLike | None = None,
        concurrency: int = 64,
        request_timeout_s: float = 600.0,
        connect_timeout_s: float = 10.0,
        health_timeout_s: float = 30.0,
        health_attempts: int = 3,
        update_timeout_s: float = 600.0,
        max_attempts: int = 5,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        keep_versions: int = 2,
        weights_dtype=None,
        check_prompt_tokens: bool = True,
        restart_timeout_s: float = 0.0,
        check_health: bool = True,
    ):
        if isinstance(urls, str):
            urls = [urls]
        self.urls = list(dict.fromkeys(str(u).rstrip("/") for u in urls))
        if not self.urls:
            raise ValueError(
                f"{self.config_key}.urls is empty; start a server with {self.launch_script} and pass its URL"
            )
        self._parts = {u: split_url(u, self.kind) for u in self.urls}
        for name, value, low in (
            ("concurrency", concurrency, 1),
            ("max_attempts", max_attempts, 1),
            ("health_attempts", health_attempts, 1),
            ("keep_versions", keep_versions, 1),
        ):
            if int(value) < low:
                raise ValueError(f"{self.config_key}.{name} must be >= {low}, got {value}")
        if stop_token_ids is None and tokenizer is not None and model_def is not None:
            stop_token_ids = default_stop_token_ids(tokenizer, model_def.config)
        if not stop_token_ids:
            raise ValueError(
                f"{type(self).__name__} needs default stop token ids (EOS, <|im_end|>): pass "
                "stop_token_ids, or tokenizer and model_def"
            )
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
        self.restart_timeout_s = float(restart_timeout_s)
        self.weight_version: str | None = None
        self._weights_path: str | None = None
        self._resync_locks: dict[str, threading.Lock] = {}
        self._restart_locks: dict[str, threading.Lock] = {}
        # Bumped whenever a server's weights are replaced, so a sample that was in flight across a
        # reload is recognised as not coming from the version it reports afterwards.
        self._generation = {u: 0 for u in self.urls}
        # Servers whose last weight update failed: their weights are unknown (vLLM may hold partial
        # ones), so they get the current version again before their next sample.
        self._needs_resync: set[str] = set()

        self._lock = threading.Lock()
        self._stats: collections.Counter = collections.Counter()
        self._inflight = {u: 0 for u in self.urls}
        self._next = 0
        self._rng = random.Random()
        self._pool = cf.ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix=self.kind.lower())
        if check_health:
            self.check_health()

    # -- what a protocol supplies -------------------------------------------------------------------

    def _sampling_payload(self, sampling: SamplingParams, stop: tuple[int, ...]) -> dict:
        raise NotImplementedError

    def _attempt(
        self, url: str, rid: str, p: int, s: int, prompt: Prompt, images: list[str], params: dict
    ) -> Completion:
        """One request for one sample on `url`; raises Retry for what repeating may fix."""
        raise NotImplementedError

    def _update_server(self, url: str, path: str, version: str) -> None:
        raise NotImplementedError

    def _served_version(self, url: str) -> str | None:
        raise NotImplementedError

    def _abort_quietly(self, url: str, rid: str) -> None:
        """Stop the server generating a request we gave up on (a timeout); best effort."""

    # -- public API ---------------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        """Cumulative counters: requests (HTTP generation attempts), samples (completions returned),
        retries/<kind> for kind in RETRY_KINDS (transport faults), weight_syncs, retries/stale_weights
        (samples from a server that lost the pushed weights, e.g. restarted), resyncs (such a server
        given the current weights again) and restarts_waited (lost servers waited for)."""
        with self._lock:
            out = {
                "requests": 0,
                "samples": 0,
                "weight_syncs": 0,
                "resyncs": 0,
                "retries/stale_weights": 0,
                "restarts_waited": 0,
            }
            out.update({f"retries/{k}": 0 for k in RETRY_KINDS})
            out.update(self._stats)
            return out

    def _probe(self, url: str, attempts: int) -> str | None:
        """None when GET /health answers 200 within `attempts` tries, else the last failure."""
        last = None
        for attempt in range(1, attempts + 1):
            try:
                status, body = self._http(
                    url,
                    "GET",
                    "/health",
                    None,
                    self.health_timeout_s,
                    connect_timeout=min(self.connect_timeout_s, self.health_timeout_s),
                )
                if status == 200:
                    return None
                last = f"HTTP {status} {body[:200]!r}"
            except Retry as e:
                last = str(e)
            if attempt < attempts:
                time.sleep(self._backoff(attempt, base=min(self.backoff_base_s, 1.0), cap=5.0))
        return last

    def check_health(self) -> None:
        """GET /health on every server, a few tries each, in bounded time; raises naming the dead ones."""
        with cf.ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            results = list(pool.map(lambda u: self._probe(u, self.health_attempts), self.urls))
        dead = [f"{u} ({err})" for u, err in zip(self.urls, results) if err is not None]
        if dead:
            raise self.Error(
                f"{self.kind} rollout server(s) not healthy after {self.health_attempts} tries of "
                f"GET /health: {'; '.join(dead)}. Start them with {self.launch_script} and "
                f"wait until they answer, or fix {self.config_key}.urls."
            )

    streams_completions = True  # generate(on_complete=...) hands over each completion as it finishes

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingParams,
        n: int = 1,
        on_complete: Callable[[Completion], None] | None = None,
    ) -> list[Completion]:
        """n completions per prompt, prompt-major (p0s0, p0s1, ..., p1s0, ...). `on_complete(c)` is
        called with each completion as soon as its request finishes (on a worker thread; an exception
        there fails the generate), so rewards can be scored while the rest is still generating."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        prompts = list(prompts)
        if not prompts:
            return []
        stop = sampling.stop_ids(self.stop_token_ids)
        for i, p in enumerate(prompts):
            pads = p.text.count(IMAGE_PAD)
            if pads != len(p.images):
                raise ValueError(
                    f"prompt {i}: its text holds {pads} {IMAGE_PAD} placeholders but it carries "
                    f"{len(p.images)} images (the {self.kind} engine sends Prompt.images, not "
                    "pixel_values)"
                )
        params = self._sampling_payload(sampling, stop)
        cancel = threading.Event()
        images = list(self._pool.map(lambda p: [image_data_uri(im) for im in p.images], prompts))
        sample = (
            self._sample if on_complete is None else (lambda *a: _handed_over(self._sample(*a), on_complete))
        )
        futures = [
            self._pool.submit(sample, p, s, prompts[p], images[p], params, cancel)
            for p in range(len(prompts))
            for s in range(n)
        ]
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
            raise ValueError(
                f"{type(self).__name__}.sync_weights needs model_def= and workdir= at construction"
            )
        from pr1.models import hf  # the model stack is only needed for weight sync

        version = f"step-{int(step)}"
        path = os.path.join(os.path.abspath(self.workdir), "weights", version)
        hf.save(self.model_def.bind(params), path, assets_from=self.assets_from, dtype=self.weights_dtype)
        error = None
        if jax.process_index() == 0:
            try:
                self._update_servers(path, version)
                self._prune_versions(version)
            except RemoteEngineError as e:
                error = e
        if jax.process_count() > 1:
            # Every process learns the outcome, so none waits forever or samples from stale servers.
            from jax.experimental import multihost_utils

            ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
            if not int(ok) and error is None:
                error = self.Error(f"{self.kind} weight sync to {version} failed on process 0 (see its log)")
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

    def _sample(
        self, p: int, s: int, prompt: Prompt, images: list[str], params: dict, cancel: threading.Event
    ) -> Completion:
        tried, last_url, last_error = [], None, None
        attempt, restarts = 0, 0
        while attempt < self.max_attempts:
            attempt += 1
            if cancel.is_set():
                raise self.Error("generate cancelled after another sample failed")
            url = self._acquire(avoid=last_url)
            rid = f"pr1-{uuid.uuid4().hex}"
            try:
                with self._lock:
                    suspect = url in self._needs_resync and self.weight_version is not None
                if suspect:
                    try:
                        self._resync(url)
                    except BaseException:
                        self._release(url)
                        raise
                    with self._lock:
                        self._needs_resync.discard(url)
                with self._lock:
                    self._stats["requests"] += 1
                try:
                    completion = self._attempt(url, rid, p, s, prompt, images, params)
                finally:
                    self._release(url)
                with self._lock:
                    self._stats["samples"] += 1
                return completion
            except Retry as e:
                if e.kind == "timeout":
                    self._abort_quietly(url, rid)  # the server would otherwise keep generating it
                with self._lock:
                    self._stats[f"retries/{e.kind}"] += 1
                tried.append(url)
                last_url, last_error = url, e
                if (
                    e.kind == "connection"
                    and self.restart_timeout_s > 0
                    and len(self.urls) == 1
                    and restarts < self.max_attempts
                    and self._await_restart(url, e, cancel)
                ):
                    attempt -= 1  # the server was down and is back: a fresh start, not a failed try
                    restarts += 1
                    continue
                if attempt < self.max_attempts:
                    log.warning(
                        "%s %s attempt %d/%d failed (%s): %s",
                        self.kind,
                        url,
                        attempt,
                        self.max_attempts,
                        e.kind,
                        e,
                    )
                    cancel.wait(self._backoff(attempt))
        raise self.Error(
            f"{self.kind} generation failed {self.max_attempts} times for prompt {p} sample {s}; servers tried: "
            f"{', '.join(dict.fromkeys(tried))}; last error from {last_url} ({last_error.kind}): {last_error}"
        )

    def _await_restart(self, url: str, error: Retry, cancel: threading.Event) -> bool:
        """Waits (one sample for all) until the lost server at `url` answers /health again, then loads the
        current weights into it; raises naming the URL when it is not back within restart_timeout_s.
        False when it answered at once (only this request was cut)."""
        with self._lock:
            lock = self._restart_locks.setdefault(url, threading.Lock())
            waited_before = self._stats["restarts_waited"]
        with lock:
            if self._probe(url, 1) is None:
                with self._lock:  # another sample waited for it meanwhile: that was a restart too
                    return self._stats["restarts_waited"] != waited_before
            log.error(
                "%s server %s lost (%s); waiting up to %g s for it to be restarted",
                self.kind,
                url,
                error,
                self.restart_timeout_s,
            )
            deadline = time.monotonic() + self.restart_timeout_s
            while self._probe(url, 1) is not None:
                if time.monotonic() > deadline:
                    raise self.Error(
                        f"{self.kind} server {url} lost ({error}) and not healthy again within "
                        f"{self.config_key}.restart_timeout_s = {self.restart_timeout_s:g} s; "
                        f"restart it with {self.launch_script}"
                    )
                if cancel.wait(min(2.0, self.restart_timeout_s)):
                    raise self.Error("generate cancelled after another sample failed")
            with self._lock:
                self._stats["restarts_waited"] += 1
            log.warning("%s server %s answers again", self.kind, url)
            if self.weight_version is not None:
                self._resync(url)
            return True

    # -- servers: choice, HTTP, weight updates ------------------------------------------------------

    def _acquire(self, avoid: str | None = None) -> str:
        """The least-loaded server (round-robin among ties), preferring not `avoid` after a failure."""
        with self._lock:
            candidates = [u for u in self.urls if u != avoid] or self.urls
            k = len(self.urls)
            order = sorted(
                candidates, key=lambda u: (self._inflight[u], (self.urls.index(u) - self._next) % k)
            )
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

    def _http(
        self,
        url: str,
        method: str,
        path: str,
        payload: Any,
        timeout: float,
        connect_timeout: float | None = None,
    ) -> tuple[int, bytes]:
        """(status, body) of one request on a fresh connection; transport failures raise Retry."""
        scheme, host, port, base = self._parts[url]
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        conn = cls(host, port, timeout=self.connect_timeout_s if connect_timeout is None else connect_timeout)
        try:
            try:
                conn.connect()
            except (OSError, http.client.HTTPException) as e:  # refused, unreachable, connect timeout
                raise Retry(
                    "connection", f"{method} {path}: cannot connect: {type(e).__name__}: {e}"
                ) from None
            conn.sock.settimeout(timeout)
            body = None if payload is None else json.dumps(payload).encode()
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, base + path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except http.client.IncompleteRead as e:
            raise Retry(
                "invalid_json", f"{method} {path}: truncated body ({len(e.partial)} bytes read)"
            ) from None
        except TimeoutError:
            raise Retry("timeout", f"{method} {path}: no answer within {timeout:g} s") from None
        except (OSError, http.client.HTTPException) as e:
            raise Retry("connection", f"{method} {path}: {type(e).__name__}: {e}") from None
        finally:
            conn.close()

    def _control(
        self, url: str, method: str, path: str, payload: Any = None, timeout: float = 60.0, attempts: int = 3
    ) -> tuple[int, Any, bytes]:
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
            except Retry as e:
                last = str(e)
            if attempt < attempts:
                time.sleep(self._backoff(attempt))
        raise self.Error(
            f"{self.kind} server {url}: {method} {path} failed {attempts} times; last error: {last}"
        )

    def _bump_generation(self, url: str) -> int:
        with self._lock:
            self._generation[url] += 1
            return self._generation[url]

    def _resync(self, url: str) -> None:
        """Loads the current weight version into `url` again, once however many samples noticed."""
        with self._lock:
            lock = self._resync_locks.setdefault(url, threading.Lock())
        with lock:
            got = self._served_version(url)
            if got == self.weight_version:
                return  # another sample already resynced it
            log.warning(
                "%s server %s serves weight_version %r instead of %r (restarted?): loading %s again",
                self.kind,
                url,
                got,
                self.weight_version,
                self._weights_path,
            )
            self._update_server(url, self._weights_path, self.weight_version)
            with self._lock:
                self._stats["resyncs"] += 1

    def _update_servers(self, path: str, version: str) -> None:
        with cf.ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            futures = {url: pool.submit(self._update_server, url, path, version) for url in self.urls}
        errors = [str(f.exception()) for f in futures.values() if f.exception() is not None]
        with self._lock:
            self._needs_resync = {url for url, f in futures.items() if f.exception() is not None}
        if errors:
            raise self.Error(
                f"weight sync to {version} failed on {len(errors)} of {len(self.urls)} server(s): "
                + " | ".join(errors)
            )
        log.info("%s servers now serve %s from %s", self.kind, version, path)

    def _prune_versions(self, current: str) -> None:
        """Keep `current` and the newest others (by write time) up to keep_versions; delete the rest."""
        root = os.path.join(self.workdir, "weights")
        entries = []
        for name in os.listdir(root):
            full = os.path.join(root, name)
            if name != current and VERSION_DIR.match(name) and os.path.isdir(full):
                entries.append((os.stat(full).st_mtime_ns, int(VERSION_DIR.match(name).group(1)), full))
        entries.sort(reverse=True)
        for _, _, full in entries[self.keep_versions - 1 :]:
            shutil.rmtree(full, ignore_errors=True)
