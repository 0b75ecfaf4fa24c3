"""Judges of the perception reward: an OpenAI-compatible HTTP client and an offline lexical matcher.

Where it sits: the reward stage (`combine.RewardStage`) awaits `judge.judge_many(pairs)` for every
rollout batch, concurrently with the accuracy pool; each pair is (response, visual annotations)
and each result a `perception.Judgement`. Both judges share the `Judge` base: a cache so an
identical (response, annotations) pair is judged once per run, de-duplication of identical
requests already in flight, and cumulative `counters` for logs.

`OpenAIJudge` talks to any `/v1/chat/completions` server (SGLang, vLLM, hosted APIs) with HTTP/1.1
keep-alive over asyncio streams (stdlib only: the client has to hold hundreds of requests in flight
from a trainer thread, which rules out one blocking thread per request). A judgement that still
fails after its retries comes back `failed=True` with the error; it is never turned into a score
here: the failure policy in `combine` decides. Configuration errors that no retry can fix
(401/403/404) raise `JudgeError` at once, naming the URL.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import math
import os
import random
import re
import ssl
import urllib.parse
from typing import Iterable, Sequence

from pr1.rewards.perception import PROMPT_VERSION, Judgement, build_messages, judgement_from_reply

log = logging.getLogger(__name__)


class JudgeError(RuntimeError):
    """A judge misconfiguration (bad URL, key or model name) that retrying cannot fix."""


class _BadResponse(Exception):
    pass


class _LoopState:
    # asyncio primitives and open sockets belong to one event loop; a judge used from a new loop
    # (a new asyncio.run per step, a test) starts a fresh set instead of failing.
    def __init__(self, loop, limit: int):
        self.loop = loop
        self.inflight: dict[bytes, asyncio.Future] = {}
        self.sem = asyncio.Semaphore(limit)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.batches = 0  # judge_many calls running: keep-alive connections live only inside them
        self.next_slot = 0.0


class Judge:
    """Common front of the judges: cache, in-flight de-duplication, counters.

    Subclasses implement `async _judge_uncached(response, annotations) -> Judgement`.
    """

    def __init__(self, *, cache_size: int = 200_000, max_concurrency: int = 256):
        if max_concurrency < 1:
            raise ValueError(f"judge max_concurrency must be >= 1, got {max_concurrency}")
        self.cache_size = int(cache_size)
        self.max_concurrency = int(max_concurrency)
        self.counters: collections.Counter = collections.Counter()
        self._cache: collections.OrderedDict[bytes, Judgement] = collections.OrderedDict()
        self._state: _LoopState | None = None

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            self._state = _LoopState(loop, self.max_concurrency)
        return self._state

    def _cache_salt(self) -> str:
        return type(self).__name__

    def _key(self, response: str, annotations: Sequence[str]) -> bytes:
        h = hashlib.sha256()
        for part in (PROMPT_VERSION, self._cache_salt(), response, *annotations):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
        return h.digest()

    async def judge(self, response: str, annotations: Sequence[str]) -> Judgement:
        """r_v of one response; an empty annotation list is 0.0 without a judge call (as released)."""
        annotations = [str(a) for a in annotations]
        self.counters["calls"] += 1
        if not annotations:
            return Judgement(score=0.0)
        key = self._key(response, annotations)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self.counters["cache_hits"] += 1
            return hit
        state = self._loop_state()
        running = state.inflight.get(key)
        if running is not None:
            self.counters["deduplicated"] += 1
            return await asyncio.shield(running)
        fut = state.loop.create_future()
        state.inflight[key] = fut
        try:
            result = await self._judge_uncached(response, annotations)
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(e)
                fut.exception()  # marks it retrieved: no "never retrieved" noise without waiters
            raise
        finally:
            state.inflight.pop(key, None)
        fut.set_result(result)
        self._record(key, result)
        return result

    def _record(self, key: bytes, result: Judgement) -> None:
        if result.neutralized:
            self.counters["neutralized"] += 1
        if result.failed:
            # Not cached: the next step asks again.
            self.counters["failures"] += 1
            return
        if result.malformed:
            self.counters["malformed"] += 1
        if self.cache_size > 0:
            self._cache[key] = result
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    async def judge_many(self, pairs: Iterable[tuple[str, Sequence[str]]]) -> list[Judgement]:
        """Judgements in input order. A JudgeError cancels the remaining requests and propagates
        as itself (not wrapped in an ExceptionGroup, as a TaskGroup would)."""
        tasks = [asyncio.ensure_future(self.judge(r, a)) for r, a in pairs]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _judge_uncached(self, response: str, annotations: list[str]) -> Judgement:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP judge

_RETRY_STATUS = {408, 409, 425, 429}
_FATAL_STATUS = {401: "unauthorized (is the API key in ${env} right?)", 403: "forbidden",
                 404: "not found (is the base URL right, and is model {model!r} served there?)"}
_MAX_BODY = 16 << 20


def _redact(url: str) -> str:
    # A URL may carry credentials (https://user:key@host); error messages name the URL without them.
    u = urllib.parse.urlsplit(url)
    netloc = u.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if u.port:
        netloc += f":{u.port}"
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path, "", ""))


class OpenAIJudge(Judge):
    """Perception judge behind an OpenAI-compatible `/v1/chat/completions` server.

    base_url: like the OpenAI SDK's, e.g. "http://judge-host:30000/v1" (a bare host gets "/v1").
    api_key_env: the NAME of the environment variable holding the API key. The key is read from
    the environment at each request and never stored on the object, printed or logged; with the
    variable unset no Authorization header is sent (a local SGLang server needs none).
    max_concurrency: requests in flight at most (an asyncio.Semaphore, released during back-off).
    requests_per_minute: 0 for no limit; otherwise request starts are spaced 60/rpm seconds apart.
    timeout: seconds for one attempt (send + full reply); connect_timeout: for opening a socket.
    retries: extra attempts after a timeout, connection error, truncated or garbled reply,
    408/409/425/429 or 5xx, with exponential back-off (backoff * 2^k, capped at backoff_max) and
    jitter (uniform over the upper half), and at least any Retry-After the server sends.
    HTTP proxies from the environment are not used.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "PR1_JUDGE_API_KEY",
                 temperature: float = 0.0, max_tokens: int = 512, max_concurrency: int = 256,
                 requests_per_minute: float = 0, timeout: float = 120.0, connect_timeout: float = 10.0,
                 retries: int = 4, backoff: float = 1.0, backoff_max: float = 30.0,
                 cache_size: int = 200_000, seed: int | None = None):
        super().__init__(cache_size=cache_size, max_concurrency=max_concurrency)
        u = urllib.parse.urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"judge url {_redact(base_url)!r} must look like http://host:port/v1")
        if timeout <= 0 or connect_timeout <= 0 or retries < 0 or requests_per_minute < 0:
            raise ValueError("judge timeout and connect_timeout must be > 0, retries and "
                             f"requests_per_minute >= 0; got {timeout}, {connect_timeout}, {retries}, "
                             f"{requests_per_minute}")
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
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.requests_per_minute = float(requests_per_minute)
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self._rng = random.Random(seed)
        self._ssl = ssl.create_default_context() if self._https else None

    @classmethod
    def from_config(cls, cfg) -> "OpenAIJudge":
        """From the `judge` block of `combine.rewards_config()`."""
        return cls(cfg.url, cfg.model, api_key_env=cfg.api_key_env, temperature=cfg.temperature,
                   max_tokens=cfg.max_tokens, max_concurrency=cfg.max_concurrency,
                   requests_per_minute=cfg.requests_per_minute, timeout=cfg.timeout,
                   connect_timeout=cfg.connect_timeout, retries=cfg.retries, backoff=cfg.backoff,
                   backoff_max=cfg.backoff_max, cache_size=cfg.cache_size)

    def __repr__(self) -> str:
        key = "set" if os.environ.get(self.api_key_env) else "unset"
        return (f"OpenAIJudge(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r} "
                f"({key}), max_concurrency={self.max_concurrency})")

    def _cache_salt(self) -> str:
        return f"{self.url}|{self.model}|{self.temperature}|{self.max_tokens}"

    # -- one HTTP exchange

    def _request_bytes(self, body: bytes) -> bytes:
        head = [f"POST {self._path} HTTP/1.1", f"Host: {self._host_header}",
                "Content-Type: application/json", "Accept: application/json",
                f"Content-Length: {len(body)}", "Connection: keep-alive"]
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            head.append(f"Authorization: Bearer {key}")
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body

    async def _connect(self):
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port, ssl=self._ssl,
                                        server_hostname=self._host if self._ssl else None),
                self.connect_timeout)
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
            if keep and state.batches and len(state.idle) < self.max_concurrency:
                state.idle.append((reader, writer))
            else:
                writer.close()
            return status, headers, payload

    # -- one judgement with retries

    async def _judge_uncached(self, response: str, annotations: list[str]) -> Judgement:
        state = self._loop_state()
        messages, neutralized = build_messages(response, annotations)
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens, "n": 1}, ensure_ascii=False).encode()
        error, retry_after = "", 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                self.counters["retries"] += 1
                await asyncio.sleep(self._delay(attempt, retry_after))
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
            except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    _BadResponse) as e:
                self.counters["connection_errors"] += 1
                error = f"{type(e).__name__}: {e}"
                continue
            if status == 200:
                try:
                    text = _reply_text(payload)
                except _BadResponse as e:
                    self.counters["bad_replies"] += 1
                    error = str(e)
                    continue
                return judgement_from_reply(text, len(annotations), neutralized=neutralized)
            if status in _FATAL_STATUS:
                hint = _FATAL_STATUS[status].format(env=self.api_key_env, model=self.model)
                raise JudgeError(f"judge {self.url} answered HTTP {status}: {hint}; "
                                 f"body: {_snippet(payload)}")
            self.counters[f"http_{status}"] += 1
            error = f"HTTP {status}: {_snippet(payload)}"
            if status in _RETRY_STATUS or status >= 500:
                retry_after = _retry_after(headers)
                continue
            break  # another 4xx: this request is wrong (e.g. longer than the judge's context)
        log.warning("judge %s: giving up on one response after %d attempts: %s", self.url,
                    attempt + 1, error)
        return Judgement(score=0.0, failed=True, neutralized=neutralized,
                         error=f"judge {self.url}: {error} (after {attempt + 1} attempts)")

    def _delay(self, attempt: int, retry_after: float) -> float:
        cap = min(self.backoff_max, self.backoff * 2 ** (attempt - 1))
        delay = cap / 2 + self._rng.uniform(0, cap / 2)
        return max(delay, min(retry_after, self.backoff_max))

    async def _rate_limit(self, state: _LoopState) -> None:
        if not self.requests_per_minute:
            return
        # No await between reading and advancing next_slot, so concurrent tasks get distinct slots.
        now = state.loop.time()
        start = max(now, state.next_slot)
        state.next_slot = start + 60.0 / self.requests_per_minute
        if start > now:
            await asyncio.sleep(start - now)

    async def judge_many(self, pairs: Iterable[tuple[str, Sequence[str]]]) -> list[Judgement]:
        # Connections are reused within a batch and closed at its end: an idle keep-alive socket
        # would outlive the event loop of an asyncio.run, or be dropped by the server during the
        # optimizer step and cost the next step a failed first request.
        state = self._loop_state()
        state.batches += 1
        try:
            return await super().judge_many(pairs)
        finally:
            state.batches -= 1
            if not state.batches:
                await self.aclose()

    async def aclose(self) -> None:
        """Closes the idle keep-alive connections of the current event loop."""
        state = self._loop_state()
        writers = [w for _, w in state.idle]
        state.idle.clear()
        for w in writers:
            w.close()
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)


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


def _reply_text(payload: bytes) -> str:
    try:
        data = json.loads(payload)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise _BadResponse(f"not a chat completion ({type(e).__name__}): {_snippet(payload)}") from e
    return content or ""  # null content (refusal, tool call): zero verdicts, so malformed


def _retry_after(headers: dict) -> float:
    try:
        value = float(headers.get("retry-after", 0))
    except ValueError:  # the HTTP-date form: fall back to our own back-off
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


def _snippet(payload: bytes, n: int = 200) -> str:
    return payload[:n].decode("utf-8", "replace").replace("\n", " ")


# ----------------------------------------------------------------------------------------------
# Offline lexical judge

_LATEX = [
    (r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)"),
    (r"\\sqrt\s*\{([^{}]*)\}", r"sqrt(\1)"),
    (r"\^\s*\{?\s*\\circ\s*\}?", "°"),
    (r"\\(?:degree|circ)\b", "°"),
    (r"\\(?:measuredangle|angle)\b", "∠"),
    (r"\\perp\b", " perpendicular "),
    (r"\\parallel\b", " parallel "),
    (r"\\(?:overline|overrightarrow|vec|mathrm|text|mathbf|operatorname)\s*\{([^{}]*)\}", r"\1"),
    (r"\\(?:cdot|times)\b", "*"),
    (r"\\div\b", "/"),
    (r"\\pi\b", "pi"),
    (r"\\(?:left|right)\b", ""),
    (r"\\[,;:! ]|\$|\\[()\[\]]|[{}]", " "),
]
_UNICODE = str.maketrans({"−": "-", "–": "-", "×": "*", "·": "*", "÷": "/", "π": "pi",
                          "√": "sqrt", "⊥": " perpendicular ", "∥": " parallel ", "＝": "="})
_WORDS = [(r"\bm\s*∠", "∠"), (r"\bangles?\s+(?=[A-Z]{1,3}\b)", "∠"), (r"\bdeg(?:rees?)?\b", "°")]
_OPS = re.compile(r"\s*([-+*/^=<>])\s*|(?<=\()\s+|\s+(?=\))")
_RUN = re.compile(r"[A-Za-z0-9.+\-*/^=()]+")
_NUMBER = re.compile(r"(?<![A-Za-z])\d+(?:\.\d+)?")
_NAME = re.compile(r"(?<![A-Za-z])([A-Z]{1,5}|[b-z])(?![A-Za-z])")
_RELATIONS = {"perpendicular", "parallel", "tangent", "diameter", "radius", "midpoint", "bisects",
              "bisector", "isosceles", "equilateral", "congruent", "similar", "square", "rectangle",
              "rhombus", "trapezoid", "parallelogram", "circle", "chord", "arc", "right", "inscribed"}
_STOP = {"that", "this", "with", "from", "have", "which", "their", "there", "where", "into",
         "length", "measure", "value", "given", "figure", "shown", "equal", "equals"}


def _normalize(text: str) -> str:
    for pattern, repl in _LATEX:
        text = re.sub(pattern, repl, text)
    text = text.translate(_UNICODE)
    for pattern, repl in _WORDS:
        text = re.sub(pattern, repl, text, flags=re.IGNORECASE)
    return _OPS.sub(lambda m: m.group(1) or "", " ".join(text.split()))


def _canon_name(name: str) -> str:
    # A segment AB is BA, an angle ABC is CBA.
    return min(name, name[::-1])


def _numbers(text: str) -> list[float]:
    return [float(x) for x in _NUMBER.findall(text)]


class LexicalJudge(Judge):
    """Deterministic offline judge: an annotation is present (1) when the response contains its
    normalized mathematical content, else absent (0). The embedded default when no URL is set.

    What it sees, after normalizing LaTeX and Unicode (\\frac, \\sqrt, ^\\circ and "degrees", \\angle
    and "angle ABC", ⊥/∥, spacing around operators):
    - expressions: every compound side of an annotation equation ("3f-6" in "JK = 3f - 6") must
      occur verbatim in the response;
    - numbers: every standalone number must occur in the response (numerically: 5 = 5.0);
    - point, segment and variable names (A, AB, ∠ABC, x): must occur, in either direction (AB = BA);
    - relation words (perpendicular, parallel, tangent, midpoint, isosceles, ...);
    - an annotation with none of these falls back to all of its content words (4+ letters).

    What it cannot see: paraphrase ("half of AB" for "AB/2"), algebraic equivalence ("3(f-2)" for
    "3f-6"), which number belongs to which name (it checks presence, not binding), negation ("AB is
    not 5" contains AB and 5), and whether the response uses a fact or merely lists it. A policy
    that prints every number and name of the figure scores 1, so it is a debugging and test judge;
    real training needs an LLM judge (`OpenAIJudge`), and the paper shows even a 7B judge is hacked.
    """

    def __init__(self, *, cache_size: int = 0):
        super().__init__(cache_size=cache_size)

    def __repr__(self) -> str:
        return "LexicalJudge()"

    async def _judge_uncached(self, response: str, annotations: list[str]) -> Judgement:
        verdicts = tuple(self.verdict(response, a) for a in annotations)
        return Judgement(score=sum(verdicts) / (len(verdicts) + 1e-6), verdicts=verdicts)

    @staticmethod
    def verdict(response: str, annotation: str) -> float:
        """1.0 if the response contains the normalized content of the annotation, else 0.0."""
        resp = _normalize(response)
        ann = _normalize(annotation)
        resp_names = {_canon_name(n) for n in _NAME.findall(resp)}
        resp_numbers = _numbers(resp)
        resp_words = set(re.findall(r"[a-z]+", resp.lower()))

        needed = 0
        for run in _RUN.findall(ann):
            run = run.strip(".")
            for side in run.split("="):
                side = side.strip(".")
                if not side:
                    continue
                if re.search(r"[-+*/^]", side) and re.search(r"[A-Za-z0-9]", side):
                    needed += 1
                    if side.strip("()") not in resp:
                        return 0.0
        for x in _numbers(re.sub(r"[A-Za-z0-9.]*[-+*/^][A-Za-z0-9.+\-*/^()]*", " ", ann)):
            needed += 1
            if not any(abs(x - y) <= 1e-6 * max(1.0, abs(x)) for y in resp_numbers):
                return 0.0
        for name in _NAME.findall(ann):
            needed += 1
            if _canon_name(name) not in resp_names:
                return 0.0
        ann_words = set(re.findall(r"[a-z]+", ann.lower()))
        for word in ann_words & _RELATIONS:
            needed += 1
            if word not in resp_words:
                return 0.0
        if needed:
            return 1.0
        content = {w for w in ann_words if len(w) >= 4 and w not in _STOP}
        return 1.0 if content and content <= resp_words else 0.0
