"""An asyncio client for OpenAI-compatible `/v1/chat/completions` servers.

Every remote LLM pr1 talks to goes through `ChatClient`: the perception judge during training
(`rewards.judge.OpenAIJudge`), the teacher VLM and the annotation extractor of stage 1
(`pr1.annotate`), and the answer extractor/judge of evaluation (`pr1.eval`). It speaks HTTP/1.1
with keep-alive over asyncio streams (stdlib only: hundreds of requests must be in flight from one
thread, which rules out a blocking thread per request), bounds concurrency with a semaphore,
optionally spaces request starts (requests per minute), and retries timeouts, dropped connections,
garbled replies, 408/409/425/429 and 5xx with exponential back-off, jitter and Retry-After (the
policy every pr1 HTTP client shares, `pr1.http_policy`).

A request that still fails after its retries comes back as a `ChatReply` with `text=None` and the
error: callers decide what a failure means (a judge failure policy, a row recorded as failed).
Misconfiguration no retry can fix (401/403/404) raises `ChatConfigError` at once, naming the URL.
The API key is read from the environment variable named by `api_key_env` at each request; it is
never stored on the object, printed or logged.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import math
import os
import random
import ssl

from pr1.http_policy import RetryPolicy, check_url, retryable_status

log = logging.getLogger(__name__)

_FATAL_STATUS = {
    401: "unauthorized (is the API key in ${env} right?)",
    403: "forbidden",
    404: "not found (is the base URL right, and is model {model!r} served there?)",
}
_MAX_BODY = 16 << 20


class ChatConfigError(RuntimeError):
    """A misconfiguration (bad URL, key or model name) that retrying cannot fix."""


class _BadResponse(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class ChatReply:
    """One chat completion: `text` is None when every attempt failed (`error` says why).
    `prompt_tokens`/`completion_tokens` are the server's `usage` (0 when it reports none)."""

    text: str | None
    error: str = ""
    attempts: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""

    @property
    def failed(self) -> bool:
        return self.text is None


class _LoopState:
    # asyncio primitives and open sockets belong to one event loop; a client used from a new loop
    # (a new asyncio.run per step, a test) starts a fresh set instead of failing.
    def __init__(self, loop, limit: int):
        self.loop = loop
        self.sem = asyncio.Semaphore(limit)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.sessions = 0  # open session() blocks: keep-alive connections live only inside them
        self.next_slot = 0.0


class ChatClient:
    """base_url: like the OpenAI SDK's, e.g. "http://host:30000/v1" (a bare host gets "/v1").
    role: what this client is for ("judge", "teacher", ...), used in errors and logs.
    api_key_env: the NAME of the environment variable holding the API key; unset → no
    Authorization header (a local SGLang/vLLM server needs none).
    max_concurrency: requests in flight at most (released during back-off).
    requests_per_minute: 0 for no limit; otherwise request starts are spaced 60/rpm seconds apart.
    timeout: seconds for one attempt (send + full reply); connect_timeout: for opening a socket.
    retries: extra attempts after a retryable failure, with back-off backoff * 2^k capped at
    backoff_max, jitter over the upper half, and at least any Retry-After the server sends.
    counters: a Counter to count into (requests, retries, timeouts, connection_errors, bad_replies,
    http_<status>, stale_connections, prompt_tokens, completion_tokens); shared with the caller's.
    HTTP proxies from the environment are not used.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        role: str = "chat",
        api_key_env: str = "",
        max_concurrency: int = 64,
        requests_per_minute: float = 0,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        retries: int = 4,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
        seed: int | None = None,
        counters: collections.Counter | None = None,
    ):
        u = check_url(base_url, f"{role} url", "http://host:port/v1")
        if max_concurrency < 1:
            raise ValueError(f"{role} max_concurrency must be >= 1, got {max_concurrency}")
        if timeout <= 0 or connect_timeout <= 0 or retries < 0 or requests_per_minute < 0:
            raise ValueError(
                f"{role} timeout and connect_timeout must be > 0, retries and "
                f"requests_per_minute >= 0; got {timeout}, {connect_timeout}, {retries}, "
                f"{requests_per_minute}"
            )
        self.role = role
        self._https = u.scheme == "https"
        self._host = u.hostname
        self._port = u.port or (443 if self._https else 80)
        self._path = (u.path.rstrip("/") or "/v1") + "/chat/completions"
        host = f"[{self._host}]" if ":" in self._host else self._host
        default_port = self._port == (443 if self._https else 80)
        self._host_header = host if default_port else f"{host}:{self._port}"
        self.url = f"{u.scheme}://{host}:{self._port}{self._path}"
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrency = int(max_concurrency)
        self.requests_per_minute = float(requests_per_minute)
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self.retry = RetryPolicy(self.retries + 1, self.backoff, self.backoff_max)
        self.counters = counters if counters is not None else collections.Counter()
        self._rng = random.Random(seed)
        self._ssl = ssl.create_default_context() if self._https else None
        self._state: _LoopState | None = None

    def __repr__(self) -> str:
        key = "set" if self.api_key_env and os.environ.get(self.api_key_env) else "unset"
        return (
            f"ChatClient(role={self.role!r}, url={self.url!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r} ({key}), max_concurrency={self.max_concurrency})"
        )

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            self._state = _LoopState(loop, self.max_concurrency)
        return self._state

    # -- sessions: keep-alive connections are reused inside one and closed at its end

    def session(self) -> "_Session":
        """`async with client.session(): ...` reuses connections across the requests made inside.
        Outside a session each request closes its socket: an idle keep-alive socket would outlive
        the event loop of an asyncio.run, or be dropped by the server between training steps."""
        return _Session(self)

    async def aclose(self) -> None:
        """Closes the idle keep-alive connections of the current event loop."""
        state = self._loop_state()
        writers = [w for _, w in state.idle]
        state.idle.clear()
        for w in writers:
            w.close()
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)

    # -- one HTTP exchange

    def _request_bytes(self, body: bytes) -> bytes:
        head = [
            f"POST {self._path} HTTP/1.1",
            f"Host: {self._host_header}",
            "Content-Type: application/json",
            "Accept: application/json",
            f"Content-Length: {len(body)}",
            "Connection: keep-alive",
        ]
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            head.append(f"Authorization: Bearer {key}")
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body

    async def _connect(self):
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(
                    self._host, self._port, ssl=self._ssl, server_hostname=self._host if self._ssl else None
                ),
                self.connect_timeout,
            )
        except TimeoutError:  # reported as a connection error, not as a slow reply
            raise ConnectionError(f"no connection within {self.connect_timeout:g}s") from None

    async def _exchange(self, state: _LoopState, body: bytes) -> tuple[int, dict, bytes]:
        request = self._request_bytes(body)
        while True:
            reused = False
            while state.idle and not reused:
                reader, writer = state.idle.pop()
                reused = not (writer.is_closing() or reader.at_eof())
                if not reused:
                    writer.close()
            if not reused:
                reader, writer = await self._connect()
            try:
                async with asyncio.timeout(self.timeout):
                    writer.write(request)
                    await writer.drain()
                    try:
                        status_line = await reader.readuntil(b"\r\n")
                    except asyncio.IncompleteReadError as e:
                        if reused and not e.partial:
                            raise ConnectionResetError("stale keep-alive connection") from e
                        raise
                    status, headers, payload, keep = await _read_rest(reader, status_line)
            except (ConnectionResetError, BrokenPipeError):
                writer.close()
                if reused:
                    # The server closed an idle keep-alive socket under us: not the request's
                    # fault, so try once more on a fresh connection without spending a retry.
                    self.counters["stale_connections"] += 1
                    continue
                raise
            except BaseException:
                writer.close()  # a half-read reply leaves the socket unusable
                raise
            if keep and state.sessions and len(state.idle) < self.max_concurrency:
                state.idle.append((reader, writer))
            else:
                writer.close()
            return status, headers, payload

    # -- one completion with retries

    async def complete(
        self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int = 512, **extra
    ) -> ChatReply:
        """One chat completion of `messages` (OpenAI message dicts; image parts as
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}). `extra` goes into
        the request body as is (e.g. seed, top_p, stop)."""
        state = self._loop_state()
        body = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": temperature,
                "max_tokens": max_tokens,
                "n": 1,
                **extra,
            },
            ensure_ascii=False,
        ).encode()
        error, retry_after = "", 0.0
        for attempt in range(self.retry.attempts):
            if attempt:
                self.counters["retries"] += 1
                await asyncio.sleep(self.retry.delay(attempt, self._rng, retry_after))
            retry_after = 0.0
            await self._rate_limit(state)
            try:
                async with state.sem:
                    self.counters["requests"] += 1
                    status, headers, payload = await self._exchange(state, body)
            except TimeoutError:
                self.counters["timeouts"] += 1
                error = f"no complete reply within {self.timeout:g}s"
                continue
            except (
                OSError,
                EOFError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                _BadResponse,
            ) as e:
                self.counters["connection_errors"] += 1
                error = f"{type(e).__name__}: {e}"
                continue
            if status == 200:
                try:
                    reply = _parse_completion(payload, attempt + 1)
                except _BadResponse as e:
                    self.counters["bad_replies"] += 1
                    error = str(e)
                    continue
                self.counters["prompt_tokens"] += reply.prompt_tokens
                self.counters["completion_tokens"] += reply.completion_tokens
                return reply
            if status in _FATAL_STATUS:
                hint = _FATAL_STATUS[status].format(env=self.api_key_env, model=self.model)
                raise ChatConfigError(
                    f"{self.role} {self.url} answered HTTP {status}: {hint}; body: {_snippet(payload)}"
                )
            self.counters[f"http_{status}"] += 1
            error = f"HTTP {status}: {_snippet(payload)}"
            if retryable_status(status):
                retry_after = _retry_after(headers)
                continue
            break  # another 4xx: this request is wrong (e.g. longer than the model's context)
        log.warning(
            "%s %s: giving up on one request after %d attempts: %s", self.role, self.url, attempt + 1, error
        )
        return ChatReply(
            text=None,
            attempts=attempt + 1,
            error=f"{self.role} {self.url}: {error} (after {attempt + 1} attempts)",
        )

    async def _rate_limit(self, state: _LoopState) -> None:
        if not self.requests_per_minute:
            return
        # No await between reading and advancing next_slot, so concurrent tasks get distinct slots.
        now = state.loop.time()
        start = max(now, state.next_slot)
        state.next_slot = start + 60.0 / self.requests_per_minute
        if start > now:
            await asyncio.sleep(start - now)


class _Session:
    def __init__(self, client: ChatClient):
        self.client = client

    async def __aenter__(self) -> ChatClient:
        self.client._loop_state().sessions += 1
        return self.client

    async def __aexit__(self, *exc) -> None:
        state = self.client._loop_state()
        state.sessions -= 1
        if not state.sessions:
            await self.client.aclose()


async def _read_rest(reader: asyncio.StreamReader, status_line: bytes):
    parts = status_line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise _BadResponse(f"not an HTTP status line: {status_line[:80]!r}")
    version, status = parts[0], int(parts[1])
    headers = {}
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                break
            if len(body) + size > _MAX_BODY:
                raise _BadResponse("reply body over 16 MiB")
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        return status, headers, bytes(body), keep
    if "content-length" in headers:
        length = int(headers["content-length"])
        if length > _MAX_BODY:
            raise _BadResponse("reply body over 16 MiB")
        return status, headers, await reader.readexactly(length), keep
    return status, headers, await reader.read(_MAX_BODY), False


def _parse_completion(payload: bytes, attempts: int) -> ChatReply:
    try:
        data = json.loads(payload)
        choice = data["choices"][0]
        content = choice["message"]["content"]
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise _BadResponse(f"not a chat completion ({type(e).__name__}): {_snippet(payload)}") from e
    # null content (a refusal, a tool call) is an empty text, not a failure: the caller's parser
    # sees nothing it can use and says so.
    return ChatReply(
        text=content or "",
        attempts=attempts,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason=str(choice.get("finish_reason") or ""),
    )


def _retry_after(headers: dict) -> float:
    try:
        value = float(headers.get("retry-after", 0))
    except ValueError:  # the HTTP-date form: fall back to our own back-off
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


def _snippet(payload: bytes, n: int = 200) -> str:
    return payload[:n].decode("utf-8", "replace").replace("\n", " ")
