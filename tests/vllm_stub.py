"""A loopback stand-in for a vLLM server (the endpoints pr1's vLLM engine uses), for fault injection.

The live tier (tests/test_vllm_live.py) checks the protocol against the real server; this stub
exists for what a real server cannot be made to do on demand: 5xx answers, hangs, dropped and
truncated replies, `abort` finish reasons, a failed reload, a silent restart, a server that is down
for a while. It reuses the SGLang stub's machinery (faults, pause, in-flight counting) and model
(`StubBackend`: the embedded sampler on weights read from disk), and speaks vLLM's JSON:
`/v1/chat/completions` (rendering the request's `chat_template` with jinja2 over the content parts,
as vLLM's "openai" content format does, so the engine's template is really exercised),
`/v1/models`, `/health`, `/pause`, `/resume`, `/collective_rpc` (reload_weights), `/reset_prefix_cache`,
`/reset_encoder_cache`, `/update_weight_version`, `/weight_info`. Like vLLM, a reload that fails
leaves the model broken (here: every later chat request is a 500 until a good reload).

    with VLLMStub(backend) as stub:
        stub.routes               # every request's "METHOD /path", in arrival order
        stub.go_down()            # every connection closed without an answer (a dead server)
        stub.come_back()          # answering again, with the launch checkpoint and version "default"
"""

from __future__ import annotations

import json
import threading

import jinja2
import numpy as np

from pr1.models.generation import SamplingParams
from tests.sglang_stub import SGLangStub, StubBackend  # noqa: F401  (StubBackend for callers)


class VLLMStub(SGLangStub):
    def __init__(self, backend, *, model: str = "tiny", fail_reloads: int = 0, **kw):
        super().__init__(backend, **kw)
        self.model = model
        self.fail_reloads = fail_reloads
        self.routes: list[str] = []
        self.broken = False
        self.down = threading.Event()

    def go_down(self) -> None:
        self.down.set()

    def come_back(self) -> None:
        """A restarted server: the launch checkpoint again, version "default", not paused."""
        self.backend.load(self.backend.checkpoint_dir, "default")
        with self._lock:
            self.paused = False
            self.broken = False
            self._resume.notify_all()
        self.down.clear()

    def _dispatch(self, h, method: str) -> None:
        if self.down.is_set():
            h.close_connection = True  # no status line: the client sees the connection drop
            return
        path = h.path.split("?")[0]
        with self._lock:
            self.routes.append(f"{method} {path}")
        self._count(path)
        try:
            length = int(h.headers.get("Content-Length") or 0)
            body = json.loads(h.rfile.read(length)) if length else {}
        except json.JSONDecodeError as e:
            return self._reply(h, 400, {"error": {"message": f"invalid JSON: {e}", "code": 400}})
        ok = lambda: self._reply(h, 200, {})  # noqa: E731
        routes = {
            ("GET", "/health"): lambda: self._reply(h, 200),
            ("GET", "/v1/models"): lambda: self._reply(
                h, 200, {"object": "list", "data": [{"id": self.model}]}
            ),
            ("GET", "/weight_info"): lambda: self._reply(
                h, 200, {"weight_version": self.backend.weight_version}
            ),
            ("POST", "/pause"): lambda: self._pause(h, True),
            ("POST", "/resume"): lambda: self._pause(h, False),
            ("POST", "/collective_rpc"): lambda: self._rpc(h, body),
            ("POST", "/reset_prefix_cache"): ok,
            ("POST", "/reset_encoder_cache"): ok,
            ("POST", "/update_weight_version"): lambda: self._set_version(h, body),
            ("POST", "/v1/chat/completions"): lambda: self._generate(h, body),
        }
        route = routes.get((method, path))
        if route is None:
            return self._reply(h, 404, {"detail": "Not Found"})
        route()

    def _set_version(self, h, body: dict) -> None:
        self.backend.weight_version = body["new_version"]
        self._reply(h, 200, {"success": True, "new_version": body["new_version"]})

    def _rpc(self, h, body: dict) -> None:
        if body.get("method") != "reload_weights":
            return self._reply(h, 400, {"detail": f"unknown method {body.get('method')!r}"})
        path = (body.get("kwargs") or {}).get("weights_path")
        with self._lock:
            fail = self.fail_reloads > 0
            self.fail_reloads -= int(fail)
        try:
            if fail:
                raise RuntimeError("injected reload failure")
            self.backend.load(path, self.backend.weight_version)
        except Exception as e:  # noqa: BLE001 - vLLM answers 500 and keeps whatever it had loaded
            self.broken = True
            return self._reply(h, 500, {"error": {"message": f"reload_weights failed: {e}", "code": 500}})
        self.broken = False
        self._reply(h, 200, {"results": [None]})

    def _generate_unpaused(self, body: dict) -> tuple | None:
        fault = self._pick_fault()
        if fault:
            self._count(f"fault/{fault}")
        if fault == "5xx" or self.broken:
            return (
                503 if fault else 500,
                {"error": {"message": "injected overload" if fault else "empty weights", "code": 500}},
            )
        if fault == "4xx":
            return (400, {"error": {"message": "injected bad request", "code": 400}})
        if fault == "drop":
            return None
        if fault == "timeout":
            self._closing.wait(self.hang_s)
        if body.get("model") != self.model:
            return (
                404,
                {"error": {"message": f"The model `{body.get('model')}` does not exist.", "code": 404}},
            )
        if fault == "abort":
            return (
                200,
                {
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": ""},
                            "finish_reason": "abort",
                            "token_ids": [],
                            "logprobs": {"content": []},
                        }
                    ],
                    "prompt_token_ids": [],
                    "usage": {},
                },
            )
        try:
            # vLLM's "openai" content format: image parts reach the template as {"type": "image"}.
            messages = [
                dict(m, content=[p if p["type"] == "text" else {"type": "image"} for p in m["content"]])
                for m in body["messages"]
            ]
            images = [
                p["image_url"]["url"] for m in body["messages"] for p in m["content"] if p["type"] != "text"
            ]
            text = jinja2.Template(body["chat_template"]).render(
                messages=messages, add_generation_prompt=False
            )
            prompt = self.backend.prompt(text, images)
            sampling = SamplingParams(
                temperature=float(body["temperature"]),
                max_new_tokens=int(body["max_tokens"]),
                stop_token_ids=tuple(body["stop_token_ids"]) or None,
                seed=int(body.get("seed") or self.backend.next_seed()),
            )
        except (KeyError, TypeError, ValueError) as e:
            return (400, {"error": {"message": f"bad request: {e}", "code": 400}})
        if self.latency_s:
            self._closing.wait(self.latency_s)
        with self.backend.lock:
            c = self.backend.engine.generate([prompt], sampling, n=1)[0]
        ids = [int(t) for t in c.token_ids]
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": c.text},
            "finish_reason": c.finish_reason,
            "token_ids": ids,
            "logprobs": {
                "content": [
                    {"token": f"token_id:{t}", "logprob": float(lp)}
                    for t, lp in zip(ids, np.asarray(c.logprobs))
                ]
            },
        }
        raw = json.dumps(
            {
                "id": "chatcmpl-stub",
                "object": "chat.completion",
                "model": self.model,
                "choices": [choice],
                "prompt_token_ids": [int(t) for t in prompt.input_ids],
                "usage": {
                    "prompt_tokens": len(prompt.input_ids),
                    "completion_tokens": len(ids),
                    "total_tokens": len(prompt.input_ids) + len(ids),
                },
            }
        ).encode()
        if fault == "truncate":
            raw = raw[: len(raw) // 2]
        return 200, None, raw
