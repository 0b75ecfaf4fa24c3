"""Judges of the perception reward: an OpenAI-compatible HTTP client and an offline lexical matcher.

Where it sits: the reward stage (`combine.RewardStage`) awaits `judge.judge_many(pairs)` for every
rollout batch, concurrently with the accuracy pool; each pair is (response, visual annotations)
and each result a `perception.Judgement`. Both judges share the `Judge` base: a cache so an
identical (response, annotations) pair is judged once per run, de-duplication of identical
requests already in flight, and cumulative `counters` for logs.

`OpenAIJudge` talks to any `/v1/chat/completions` server (SGLang, vLLM, hosted APIs) through
`pr1.chat.ChatClient` (asyncio, keep-alive, bounded concurrency, retries). A judgement that still
fails after its retries comes back `failed=True` with the error; it is never turned into a score
here: the failure policy in `combine` decides. Configuration errors that no retry can fix
(401/403/404) raise `JudgeError` at once, naming the URL.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import re
from typing import Iterable, Sequence

from pr1.chat import ChatClient, ChatConfigError
from pr1.rewards.perception import (
    PROMPT_VERSION,
    Judgement,
    build_messages,
    judgement_from_reply,
    prompt_token_bound,
)

# A judge misconfiguration (bad URL, key or model name) that retrying cannot fix.
JudgeError = ChatConfigError


class _LoopState:
    # Futures belong to one event loop; a judge used from a new loop (a new asyncio.run per step,
    # a test) starts a fresh table instead of failing.
    def __init__(self, loop):
        self.loop = loop
        self.inflight: dict[bytes, asyncio.Future] = {}


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
            self._state = _LoopState(loop)
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


class OpenAIJudge(Judge):
    """Perception judge behind an OpenAI-compatible `/v1/chat/completions` server.

    base_url: like the OpenAI SDK's, e.g. "http://judge-host:30000/v1" (a bare host gets "/v1").
    api_key_env: the NAME of the environment variable holding the API key. The key is read from
    the environment at each request and never stored on the object, printed or logged; with the
    variable unset no Authorization header is sent (a local SGLang server needs none).
    The transport (concurrency bound, rate limit, timeouts, retries with back-off) is
    `pr1.chat.ChatClient`; its counters are this judge's `counters`.
    max_prompt_tokens: a request whose prompt could exceed it (`prompt_token_bound`) is not sent; its
    judgement fails naming the sizes (counter `oversized_prompts`), and the failure policy applies.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "PR1_JUDGE_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 512,
        max_concurrency: int = 256,
        requests_per_minute: float = 0,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        retries: int = 4,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
        cache_size: int = 200_000,
        seed: int | None = None,
        max_prompt_tokens: int = 32_000,
    ):
        super().__init__(cache_size=cache_size, max_concurrency=max_concurrency)
        if max_prompt_tokens < 1:
            raise ValueError(f"judge max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.client = ChatClient(
            base_url,
            model,
            role="judge",
            api_key_env=api_key_env,
            max_concurrency=max_concurrency,
            requests_per_minute=requests_per_minute,
            timeout=timeout,
            connect_timeout=connect_timeout,
            retries=retries,
            backoff=backoff,
            backoff_max=backoff_max,
            seed=seed,
            counters=self.counters,
        )
        self.url = self.client.url
        self.model = model
        self.api_key_env = api_key_env
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)

    @classmethod
    def from_config(cls, cfg) -> "OpenAIJudge":
        """From the `judge` block of `combine.rewards_config()`."""
        return cls(
            cfg.url,
            cfg.model,
            api_key_env=cfg.api_key_env,
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            max_concurrency=cfg.max_concurrency,
            requests_per_minute=cfg.requests_per_minute,
            timeout=cfg.timeout_s,
            connect_timeout=cfg.connect_timeout_s,
            retries=cfg.retries,
            backoff=cfg.backoff_s,
            backoff_max=cfg.backoff_max_s,
            cache_size=cfg.cache_size,
            max_prompt_tokens=cfg.get("max_prompt_tokens", 32_000),
        )

    def __repr__(self) -> str:
        key = "set" if os.environ.get(self.api_key_env) else "unset"
        return (
            f"OpenAIJudge(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r} "
            f"({key}), max_concurrency={self.max_concurrency})"
        )

    def _cache_salt(self) -> str:
        return f"{self.url}|{self.model}|{self.temperature}|{self.max_tokens}"

    async def _judge_uncached(self, response: str, annotations: list[str]) -> Judgement:
        messages, neutralized = build_messages(response, annotations)
        bound = prompt_token_bound(messages)
        if bound > self.max_prompt_tokens:
            self.counters["oversized_prompts"] += 1
            return Judgement(
                score=0.0,
                failed=True,
                neutralized=neutralized,
                error=(
                    f"judge {self.url}: prompt of up to {bound} tokens ({len(annotations)} annotations, "
                    f"{len(response.encode('utf-8', 'surrogatepass'))} response bytes) is over "
                    f"rewards.judge.max_prompt_tokens={self.max_prompt_tokens}; not sent"
                ),
            )
        reply = await self.client.complete(messages, temperature=self.temperature, max_tokens=self.max_tokens)
        if reply.failed:
            return Judgement(score=0.0, failed=True, neutralized=neutralized, error=reply.error)
        return judgement_from_reply(reply.text, len(annotations), neutralized=neutralized)

    async def judge_many(self, pairs: Iterable[tuple[str, Sequence[str]]]) -> list[Judgement]:
        # Connections are reused within a batch and closed at its end (see ChatClient.session).
        async with self.client.session():
            return await super().judge_many(pairs)

    async def aclose(self) -> None:
        await self.client.aclose()


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
_UNICODE = str.maketrans(
    {
        "−": "-",
        "–": "-",
        "×": "*",
        "·": "*",
        "÷": "/",
        "π": "pi",
        "√": "sqrt",
        "⊥": " perpendicular ",
        "∥": " parallel ",
        "＝": "=",
    }
)
_WORDS = [(r"\bm\s*∠", "∠"), (r"\bangles?\s+(?=[A-Z]{1,3}\b)", "∠"), (r"\bdeg(?:rees?)?\b", "°")]
_OPS = re.compile(r"\s*([-+*/^=<>])\s*|(?<=\()\s+|\s+(?=\))")
_RUN = re.compile(r"[A-Za-z0-9.+\-*/^=()]+")
_NUMBER = re.compile(r"(?<![A-Za-z])\d+(?:\.\d+)?")
_NAME = re.compile(r"(?<![A-Za-z])([A-Z]{1,5}|[b-z])(?![A-Za-z])")
_RELATIONS = {
    "perpendicular",
    "parallel",
    "tangent",
    "diameter",
    "radius",
    "midpoint",
    "bisects",
    "bisector",
    "isosceles",
    "equilateral",
    "congruent",
    "similar",
    "square",
    "rectangle",
    "rhombus",
    "trapezoid",
    "parallelogram",
    "circle",
    "chord",
    "arc",
    "right",
    "inscribed",
}
_STOP = {
    "that",
    "this",
    "with",
    "from",
    "have",
    "which",
    "their",
    "there",
    "where",
    "into",
    "length",
    "measure",
    "value",
    "given",
    "figure",
    "shown",
    "equal",
    "equals",
}


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
