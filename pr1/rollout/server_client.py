"""The HTTP side of the rollout server engines: a set of servers, one request at a time, retries
and health.

Where it sits: `remote.RemoteEngine` (and through it the SGLang and vLLM engines) is a
`ServerClient`; it samples through `_http`, picks servers with `_acquire`/`_release`, and sends
weight-sync calls through `_control`. URLs are checked and failures retried by the rules every pr1
HTTP client shares (`pr1.http_policy`).

Each request opens its own connection: rollout requests last seconds, so a TCP handshake is noise,
and a pooled keep-alive connection idling through an optimizer step would be closed by the server
and turn the first request of every step into a spurious retry.
"""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import random
import threading
import time
from typing import Any, Sequence

from pr1.http_policy import RetryPolicy, check_url, retryable_status

# What a failed attempt is counted as, in `RemoteEngine.stats` ("retries/<kind>").
RETRY_KINDS = ("connection", "timeout", "server_error", "invalid_json", "abort")


class RemoteEngineError(RuntimeError):
    """A failure the caller can act on; the message names the server URL(s)."""


class Retry(Exception):
    """One failed attempt that may succeed when repeated."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class ServerClient:
    """HTTP/1.1 to a set of servers: least-loaded choice, fresh connections, retried control calls,
    /health probes. `kind`, `config_key`, `launch_script` and `Error` name the service in messages.

    `retry` (attempts max_attempts, back-off base/cap) paces a failed request's next attempt;
    `health_retry` (health_attempts, at most 1 s doubling up to 5 s) paces /health probes, which
    should answer fast or not at all.
    """

    kind = "rollout"  # the server's name in messages
    config_key = "rollout.?"  # where its knobs live, for messages
    launch_script = "launch/"  # how to start one, for messages
    Error = RemoteEngineError

    def __init__(
        self,
        urls: Sequence[str],
        *,
        request_timeout_s: float,
        connect_timeout_s: float,
        health_timeout_s: float,
        health_attempts: int,
        max_attempts: int,
        backoff_base_s: float,
        backoff_cap_s: float,
    ):
        if isinstance(urls, str):
            urls = [urls]
        self.urls = list(dict.fromkeys(str(u).rstrip("/") for u in urls))
        if not self.urls:
            raise ValueError(
                f"{self.config_key}.urls is empty; start a server with {self.launch_script} and pass its URL"
            )
        self._parts = {}
        for u in self.urls:
            parts = check_url(u, f"{self.kind} server URL")
            self._parts[u] = (parts.scheme, parts.hostname, parts.port, parts.path.rstrip("/"))
        for name, value in (("max_attempts", max_attempts), ("health_attempts", health_attempts)):
            if int(value) < 1:
                raise ValueError(f"{self.config_key}.{name} must be >= 1, got {value}")
        self.request_timeout_s = float(request_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.health_timeout_s = float(health_timeout_s)
        self.health_attempts = int(health_attempts)
        self.max_attempts = int(max_attempts)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_cap_s = float(backoff_cap_s)
        self.retry = RetryPolicy(self.max_attempts, self.backoff_base_s, self.backoff_cap_s)
        self.health_retry = RetryPolicy(self.health_attempts, min(self.backoff_base_s, 1.0), 5.0)
        self._lock = threading.Lock()
        self._inflight = {u: 0 for u in self.urls}
        self._next = 0
        self._rng = random.Random()

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
                time.sleep(self.health_retry.delay(attempt, self._rng))
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
        """A control call (weight sync, version query): transport failures and retryable statuses
        (`http_policy.retryable_status`) are retried; returns (status, JSON or None, body)."""
        last = None
        for attempt in range(1, attempts + 1):
            try:
                status, body = self._http(url, method, path, payload, timeout)
                if not retryable_status(status):
                    try:
                        data = json.loads(body) if body else None
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        data = None
                    return status, data, body
                last = f"HTTP {status}: {body[:300]!r}"
            except Retry as e:
                last = str(e)
            if attempt < attempts:
                time.sleep(self.retry.delay(attempt, self._rng))
        raise self.Error(
            f"{self.kind} server {url}: {method} {path} failed {attempts} times; last error: {last}"
        )
