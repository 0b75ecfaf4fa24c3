"""What the HTTP rollout engines (SGLang, vLLM) share: sampling over several servers with retries
and restarts, on top of the HTTP client (`server_client`) and the weight sync (`weight_sync`).

Where it sits: `pr1.rollout.sglang` and `pr1.rollout.vllm` subclass `RemoteEngine` and supply the
protocol: how one sample is requested and parsed (`_attempt`), how one server loads a weight dir
(`_update_server`) and which weight version it serves (`_served_version`). Everything that does not
depend on the protocol lives in this file and the two beside it, once:

generate: one request per sample (`n = 1`, as RL frameworks do), at most `concurrency` in flight,
each sent to the least-loaded server. Connection errors, timeouts, retryable statuses (5xx, 429;
`pr1.http_policy`), truncated or invalid JSON and `abort` finish reasons are retried with
exponential backoff and jitter, each attempt with a fresh request id (and on another server when
there are several); `engine.stats` counts every retry by kind. Any other 4xx, or a response that
breaks the protocol, is an error at once naming the URL; after `max_attempts` the error names the
servers tried and the last failure. A completion is never made up. With `restart_timeout_s > 0`
and one server, a lost connection makes the sample wait (once, whichever sample noticed first) for
the server's /health to answer again within that time, log it, and load the current weights into
it again before sampling; a server not back in time is an error naming its URL.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures as cf
import io
import logging
import os
import threading
import time
import uuid
from typing import Callable, Sequence

from PIL import Image

from pr1.images import load_rgb
from pr1.models.generation import IMAGE_PAD, Completion, Prompt, SamplingParams, default_stop_token_ids
from pr1.rollout.server_client import RETRY_KINDS, Retry, ServerClient
from pr1.rollout.weight_sync import WeightSync

log = logging.getLogger(__name__)


def image_data_uri(image) -> str:
    """An image (PIL, HxWx3 uint8 array, encoded bytes or a path) as a lossless PNG data URI of the
    RGB pixels our processor would see."""
    buf = io.BytesIO()
    Image.fromarray(load_rgb(image)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _handed_over(completion: Completion, on_complete: Callable[[Completion], None]) -> Completion:
    on_complete(completion)
    return completion


class RemoteEngine(ServerClient, WeightSync):
    """`RolloutEngine` backed by HTTP servers; subclasses speak one server's protocol (module doc).

    `model_def` (a `pr1.models.model_def.ModelDef`) is needed only by `sync_weights`, which rebuilds
    the model around the params to save it; `assets_from` is the checkpoint dir whose tokenizer and
    processor files are copied next to every weight version. `stop_token_ids=None` takes EOS and
    `<|im_end|>` from `tokenizer` and `model_def.config`.
    """

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
        ServerClient.__init__(
            self,
            urls,
            request_timeout_s=request_timeout_s,
            connect_timeout_s=connect_timeout_s,
            health_timeout_s=health_timeout_s,
            health_attempts=health_attempts,
            max_attempts=max_attempts,
            backoff_base_s=backoff_base_s,
            backoff_cap_s=backoff_cap_s,
        )
        if int(concurrency) < 1:
            raise ValueError(f"{self.config_key}.concurrency must be >= 1, got {concurrency}")
        self._init_weight_sync(
            model_def=model_def,
            workdir=workdir,
            assets_from=assets_from,
            keep_versions=keep_versions,
            weights_dtype=weights_dtype,
        )
        if stop_token_ids is None and tokenizer is not None and model_def is not None:
            stop_token_ids = default_stop_token_ids(tokenizer, model_def.config)
        if not stop_token_ids:
            raise ValueError(
                f"{type(self).__name__} needs default stop token ids (EOS, <|im_end|>): pass "
                "stop_token_ids, or tokenizer and model_def"
            )
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids)
        self.tokenizer = tokenizer
        self.concurrency = int(concurrency)
        self.update_timeout_s = float(update_timeout_s)
        self.check_prompt_tokens = bool(check_prompt_tokens)
        self.restart_timeout_s = float(restart_timeout_s)
        self._restart_locks: dict[str, threading.Lock] = {}
        self._stats: collections.Counter = collections.Counter()
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
                    cancel.wait(self.retry.delay(attempt, self._rng))
        raise self.Error(
            f"{self.kind} generation failed {self.max_attempts} times for prompt {p} sample {s}; "
            f"servers tried: {', '.join(dict.fromkeys(tried))}; last error from {last_url} "
            f"({last_error.kind}): {last_error}"
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
