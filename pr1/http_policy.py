"""What every HTTP client of pr1 agrees on: which service URLs are valid, and how a failed request is
retried.

Where it sits: the OpenAI-compatible chat client (`pr1.chat`: judge, teacher, extractor, checker)
and the rollout server engines (`pr1.rollout.server`: SGLang, vLLM) both send requests through
these rules, and the config checks (`pr1.train.config`, `pr1.rewards.combine`) validate URLs with
the same `check_url`, so a URL accepted at start-up is one the client can open. It depends on
nothing else in pr1.

The retry policy: 408, 409, 425, 429 and every 5xx are worth repeating (the server was busy,
overloaded or restarting), as are timeouts and dropped connections, which each client detects in
its own transport; any other 4xx is the request's own fault. Attempt k (1-based) that failed waits
uniformly in [d/2, d] with d = min(cap_s, base_s * 2^(k-1)) (the jitter spreads the retries of many
concurrent requests), and at least the server's Retry-After, itself capped at cap_s.
"""

from __future__ import annotations

import dataclasses
import random
import urllib.parse

# Statuses a repeat of the same request may get past; every 5xx is retryable too.
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})


def retryable_status(status: int) -> bool:
    """True for an HTTP status that repeating the request may fix (see the module docstring)."""
    return status in RETRYABLE_STATUS or status >= 500


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """`attempts` tries in all (the first one included), with exponential back-off and jitter."""

    attempts: int
    base_s: float
    cap_s: float

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be >= 1, got {self.attempts}")
        if self.base_s < 0 or self.cap_s < 0:
            raise ValueError(f"retry back-off must be >= 0 s, got base {self.base_s}, cap {self.cap_s}")

    def delay(self, attempt: int, rng: random.Random, retry_after: float = 0.0) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based) before the next one."""
        d = min(self.cap_s, self.base_s * 2 ** (attempt - 1))
        return max(d / 2 + rng.uniform(0, d / 2), min(retry_after, self.cap_s))


def check_url(url, name: str, example: str = "http://host:port", hint: str = "") -> urllib.parse.SplitResult:
    """The parts of an http(s) service URL; ValueError naming `name` (the config key, flag or role)
    for anything else. Credentials in the URL are not repeated in the message."""
    parts = urllib.parse.urlsplit(str(url))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{name} {redact(str(url))!r} must look like {example}{hint}")
    return parts


def redact(url: str) -> str:
    """The URL without credentials (https://user:key@host), for error messages."""
    u = urllib.parse.urlsplit(url)
    netloc = u.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if u.port:
        netloc += f":{u.port}"
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path, "", ""))
