"""Judge-client throughput against a loopback stub of `/v1/chat/completions`.

    python -m pr1.bench.judge                       # latency 50 ms, concurrency 16, 64, 256
    python -m pr1.bench.judge --latency=0.2 --concurrency=64,256,512 --requests_per_slot=4

For each concurrency limit c the client judges max(min_requests, requests_per_slot * c) distinct
responses against a stub that answers every request after `latency` seconds, and prints achieved
requests/s against the ideal c / latency (median and min-max over --repeats rounds after a
warm-up, `pr1.bench.ratio`). A ratio well below 1 means the client (or this machine),
not the judge, would bound a training step. The stub runs in its own process, as a real server
would, so the two do not share a GIL.

`StubJudgeServer` is also the loopback server of tests/test_judge.py: scripted replies, injected
faults (HTTP 500, a hang until the client gives up, a body cut short) and an in-flight counter.
"""

from __future__ import annotations

import asyncio
import collections
import json
import multiprocessing
import random
import re
import statistics
import sys
import threading
import time
from typing import Callable

from absl import flags

from pr1 import cli
from pr1.rewards.perception import fenced_response


def message_text(message: dict) -> str:
    """A message's text: its content string, or the joined text parts of a multimodal content list."""
    content = message.get("content")
    if isinstance(content, list):
        return "\n".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return content if isinstance(content, str) else ""


def word_usage(messages: list[dict], reply: str) -> tuple[int, int]:
    """The stub's token usage: whitespace-separated words of every message's text, and of the reply."""
    return sum(len(message_text(m).split()) for m in messages), len(reply.split())


def default_reply(messages: list[dict]) -> str:
    """A verdict of 1 for every numbered annotation in the last user message."""
    user = message_text(messages[-1])
    m = len(re.findall(r"^\d+\. ", user.split("<<<RESPONSE")[0], re.MULTILINE))
    return "".join(f"<info{k}>1</info{k}>" for k in range(1, m + 1))


def request_key(messages: list[dict]) -> str:
    """What identifies a judge request to the stub's counters: the fenced response text (else the
    last message's text; image parts are left out)."""
    user = message_text(messages[-1])
    try:
        return fenced_response(user)
    except ValueError:
        return user


class StubJudgeServer:
    """A loopback OpenAI-compatible chat server on its own event-loop thread.

    reply(messages) -> str gives the assistant text; usage(messages, text) -> (prompt_tokens,
    completion_tokens) the reply's `usage` (default `word_usage`). Each request, after `latency`
    seconds, fails with probability p_500 (HTTP 500), p_hang (no reply until the client closes the
    connection) or p_truncate (Content-Length promises the whole body, half is sent, the socket
    closes); seeded. schedule(key, attempt) -> "500" | "hang" | "truncate" | "huge" | "binary" | None,
    if given, decides
    instead: the fault of the attempt-th request (1-based) with that request key, fixed in advance
    whatever order concurrent requests arrive in, so a test can know every outcome exactly; "huge"
    answers 200 with a 20 MiB body, "binary" a body that is not UTF-8.
    require_key: if set, requests without "Authorization: Bearer <require_key>" get 401.
    stats(): requests, max_in_flight, faults by kind, attempts and successes per request key.
    A request counts as in flight from its last byte read until its reply is written or the client
    has closed the connection (a hung request stays in flight until the client gives up).
    """

    def __init__(
        self,
        reply: Callable[[list[dict]], str] = default_reply,
        *,
        latency: float = 0.0,
        p_500: float = 0.0,
        p_hang: float = 0.0,
        p_truncate: float = 0.0,
        seed: int = 0,
        require_key: str | None = None,
        hang_max: float = 60.0,
        usage: Callable[[list[dict], str], tuple[int, int]] = word_usage,
        schedule: Callable[[str, int], str | None] | None = None,
    ):
        self.reply = reply
        self.schedule = schedule
        self.usage = usage
        self.latency = latency
        self.p = (p_500, p_hang, p_truncate)
        self.require_key = require_key
        self.hang_max = hang_max
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.reset_stats()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def reset_stats(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self.requests = 0
            self.in_flight = 0
            self.max_in_flight = 0
            self.faults: collections.Counter = collections.Counter()
            self.attempts: collections.Counter = collections.Counter()
            self.successes: collections.Counter = collections.Counter()

    def stats(self) -> dict:
        with self._lock:
            return dict(
                requests=self.requests,
                max_in_flight=self.max_in_flight,
                faults=dict(self.faults),
                attempts=dict(self.attempts),
                successes=dict(self.successes),
            )

    # -- lifecycle

    def start(self) -> "StubJudgeServer":
        ready = threading.Event()

        def run():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=4096)
            )
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()
            server.close()
            # Handlers still waiting on keep-alive sockets end on EOF once their sockets close
            # (cancelling them instead makes 3.11's stream callback log a CancelledError each).
            for writer in list(self._writers):
                writer.close()
            tasks = asyncio.all_tasks(self._loop)
            if tasks:
                self._loop.run_until_complete(asyncio.wait(tasks, timeout=5))
            self._loop.run_until_complete(server.wait_closed())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="judge-stub", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- HTTP

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 1 else ""
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                with self._lock:
                    self.requests += 1
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    keep = await self._respond(reader, writer, path, headers, body)
                finally:
                    with self._lock:
                        self.in_flight -= 1
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _respond(self, reader, writer, path, headers, body) -> bool:
        if path != "/v1/chat/completions":
            return await _send(writer, 404, {"error": f"no route {path}"})
        if self.require_key and headers.get("authorization") != f"Bearer {self.require_key}":
            return await _send(writer, 401, {"error": "bad key"})
        messages = json.loads(body)["messages"]
        key = request_key(messages)
        with self._lock:
            self.attempts[key] += 1
            attempt = self.attempts[key]
            u = self._rng.random()
        if self.latency:
            await asyncio.sleep(self.latency)
        p_500, p_hang, p_trunc = self.p
        fault = (
            self.schedule(key, attempt)
            if self.schedule is not None
            else "500"
            if u < p_500
            else "hang"
            if u < p_500 + p_hang
            else "truncate"
            if u < p_500 + p_hang + p_trunc
            else None
        )
        if fault == "500":
            self._fault("500")
            return await _send(writer, 500, {"error": "injected"})
        if fault == "hang":
            self._fault("hang")
            try:  # until the client gives up and closes
                await asyncio.wait_for(reader.read(), self.hang_max)
            except asyncio.TimeoutError:
                pass
            return False
        text = self.reply(messages)
        prompt_tokens, completion_tokens = self.usage(messages, text)
        payload = {
            "id": "stub",
            "object": "chat.completion",
            "model": "stub",
            "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
            ],
            "usage": {
                "prompt_tokens": int(prompt_tokens),
                "completion_tokens": int(completion_tokens),
                "total_tokens": int(prompt_tokens) + int(completion_tokens),
            },
        }
        if fault in ("huge", "binary"):
            self._fault(fault)
            data = b"\xff\xfe\x80 not utf-8 \xc3\x28" * 16 if fault == "binary" else b" " * (20 << 20)
            writer.write(_head(200, len(data)) + data)
            await writer.drain()
            return True
        if fault == "truncate":
            self._fault("truncate")
            data = json.dumps(payload).encode()
            writer.write(_head(200, len(data)) + data[: len(data) // 2])
            await writer.drain()
            return False
        with self._lock:  # before sending: the client may finish before this task resumes
            self.successes[key] += 1
        return await _send(writer, 200, payload)

    def _fault(self, kind: str) -> None:
        with self._lock:
            self.faults[kind] += 1


def _head(status: int, length: int) -> bytes:
    return (
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
        "Connection: keep-alive\r\n\r\n"
    ).encode()


async def _send(writer, status: int, payload: dict) -> bool:
    data = json.dumps(payload).encode()
    writer.write(_head(status, len(data)) + data)
    await writer.drain()
    return True


# ----------------------------------------------------------------------------------------------
# The benchmark


def _serve(conn, latency: float) -> None:
    stub = StubJudgeServer(latency=latency).start()
    conn.send(stub.port)
    while conn.recv() == "reset":  # one round per concurrency level
        conn.send(stub.stats()["max_in_flight"])
        stub.reset_stats()
    stub.stop()


class StubJudgeProcess:
    """A `StubJudgeServer` answering after `latency` seconds in its own process (as a real judge
    would: it does not share the GIL with the client). `with StubJudgeProcess(0.5) as url: ...`"""

    def __init__(self, latency: float):
        self.latency = latency

    def __enter__(self) -> str:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self.latency), daemon=True)
        self._proc.start()
        return f"http://127.0.0.1:{self._conn.recv()}/v1"

    def __exit__(self, *exc):
        self._conn.send("stop")
        self._proc.join(10)


def run_bench(
    latency: float,
    concurrencies: list[int],
    requests_per_slot: int,
    min_requests: int,
    repeats: int = 1,
    warmup: int = 0,
) -> list[dict]:
    """Per concurrency c: `warmup` unrecorded rounds, then `repeats` rounds of max(min_requests,
    requests_per_slot * c) requests; each round's achieved req/s is paired with the ideal c / latency
    (`pr1.bench.ratio`). Returns one row per c with the medians and the Ratio under "ratio_stats"."""
    from pr1.bench import ratio as ratio_lib
    from pr1.rewards.judge import OpenAIJudge

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(child, latency), daemon=True)
    server.start()
    port = parent.recv()
    rows = []
    try:
        for c in concurrencies:
            n = max(min_requests, requests_per_slot * c)
            judge = OpenAIJudge(
                f"http://127.0.0.1:{port}/v1",
                "stub",
                max_concurrency=c,
                cache_size=0,
                retries=0,
                timeout=60.0,
            )
            rounds = []

            def one_round() -> float:
                k = len(rounds)
                pairs = [
                    (f"bench response {c}-{k}-{i}: AB = 5 and x = 3", ["AB = 5", "x = 3"]) for i in range(n)
                ]

                async def go():
                    out = await judge.judge_many(pairs)
                    await judge.aclose()  # this round's loop and its sockets end here
                    return out

                t0 = time.perf_counter()
                results = asyncio.run(go())
                dt = time.perf_counter() - t0
                parent.send("reset")
                rounds.append(
                    dict(seconds=dt, max_in_flight=parent.recv(), failed=sum(r.failed for r in results))
                )
                return n / dt

            ideal = c / latency
            (stats,) = ratio_lib.interleaved(
                one_round, lambda: ideal, repeats=repeats, warmup=warmup, label=f"judge c={c}", log=None
            ).values()
            recorded = rounds[warmup:]
            rows.append(
                dict(
                    concurrency=c,
                    requests=n,
                    seconds=statistics.median(r["seconds"] for r in recorded),
                    achieved=stats.ours_median,
                    ideal=ideal,
                    ratio=stats.median,
                    ratio_min=stats.lo,
                    ratio_max=stats.hi,
                    repeats=stats.repeats,
                    ratio_stats=stats,
                    max_in_flight=max(r["max_in_flight"] for r in recorded),
                    failed=sum(r["failed"] for r in recorded),
                )
            )
    finally:
        parent.send("stop")
        server.join(10)
    return rows


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_float("latency", 0.05, "stub reply latency in seconds", flag_values=fv)
    flags.DEFINE_list(
        "concurrency", ["16", "64", "256"], "client concurrency limits to measure", flag_values=fv
    )
    flags.DEFINE_integer(
        "requests_per_slot", 8, "requests per concurrency slot at each level", flag_values=fv
    )
    flags.DEFINE_integer("min_requests", 200, "at least this many requests per level", flag_values=fv)
    flags.DEFINE_integer("repeats", 5, "recorded rounds per level (after one warm-up round)", flag_values=fv)


def main(argv=None) -> int:
    f = cli.parse("pr1.bench.judge", argv, define_flags, doc=__doc__)
    rows = run_bench(
        f.latency,
        [int(c) for c in f.concurrency],
        f.requests_per_slot,
        f.min_requests,
        repeats=f.repeats,
        warmup=1,
    )
    print(
        f"judge client vs loopback stub, latency {f.latency * 1000:.0f} ms per request, medians of "
        f"{f.repeats} rounds after one warm-up"
    )
    print(
        f"{'concurrency':>11} {'requests':>8} {'seconds':>8} {'req/s':>9} {'ideal':>9} {'ratio':>6} "
        f"{'min-max':>11} {'max in flight':>13} {'failed':>6}"
    )
    for r in rows:
        print(
            f"{r['concurrency']:>11} {r['requests']:>8} {r['seconds']:>8.2f} {r['achieved']:>9.1f} "
            f"{r['ideal']:>9.1f} {r['ratio']:>6.3f} {r['ratio_min']:>5.3f}-{r['ratio_max']:<5.3f} "
            f"{r['max_in_flight']:>13} {r['failed']:>6}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
