"""A loopback stand-in for an SGLang server, backed by the embedded sampler and `hf.load`.

It speaks the native endpoints the SGLang engine uses (`/generate`, `/pause_generation`,
`/continue_generation`, `/update_weights_from_disk`, `/get_weight_version`, `/health`,
`/abort_request`) with SGLang's JSON shapes, and does the server's work for real: it decodes the
data-URI images, tokenizes the prompt text with the checkpoint's tokenizer, expands each
`<|image_pad|>` to its feature count, samples with `EmbeddedEngine`, and on a weight update reads the
checkpoint dir from disk (`pr1.train.state.load_params`), so a test can tell whether the weights
really travelled. Faults are injected on `/generate` at given rates: 5xx answers, answers slower
than the client's timeout, connections closed without an answer, truncated JSON bodies and `abort`
finish reasons; `fail_updates` makes the next weight updates fail as SGLang does (HTTP 400,
success false, old weights kept).

    backend = StubBackend(checkpoint_dir)                 # share it between stubs to compile once
    with SGLangStub(backend, p_5xx=0.2) as stub:
        engine = SGLangEngine([stub.url], ...)
        stub.stats()                                      # requests, faults, max_in_flight, ...
"""

from __future__ import annotations

import base64
import collections
import json
import random
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax
import jax.numpy as jnp
import numpy as np

from pr1 import sharding
from pr1.data.processor import Processor
from pr1.models.generation import Prompt, SamplingParams, default_stop_token_ids
from pr1.models.model_def import ModelDef
from pr1.rollout.sampler import EmbeddedEngine
from pr1.train import state as state_lib

_DATA_URI = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,(.*)$", re.S)


class StubBackend:
    """The model side of a stub server: processor, embedded engine and the served weight version."""

    def __init__(self, checkpoint_dir: str, *, dtype=jnp.float32, mesh=None):
        self.checkpoint_dir = checkpoint_dir
        self.processor = Processor.from_dir(checkpoint_dir)
        self.mesh = mesh if mesh is not None else sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        self.model_def = ModelDef.create(self.processor.config, dtype=dtype)
        params = state_lib.load_params(checkpoint_dir, self.model_def, self.mesh)
        self.engine = EmbeddedEngine(
            self.model_def,
            params,
            self.mesh,
            self.processor.tokenizer,
            stop_token_ids=default_stop_token_ids(self.processor.tokenizer, self.processor.config),
            pad_token_id=self.processor.pad_token_id,
            min_prompt_bucket=16,
            min_patch_bucket=16,
        )
        self.weight_version = "default"  # SGLang's initial server_args.weight_version
        self.lock = threading.Lock()  # one generation at a time, like one GPU
        self._seed = 0

    def next_seed(self) -> int:
        with self.lock:
            self._seed += 1
            return self._seed

    def prompt(self, text: str, image_data: list[str]) -> Prompt:
        """What the server does with a text prompt: decode images, tokenize, expand the image pads."""
        proc = self.processor
        images = []
        for item in image_data:
            m = _DATA_URI.match(item)
            if not m:
                raise ValueError(f"image_data entry is not a base64 data URI: {item[:40]!r}")
            images.append(base64.b64decode(m.group(1)))
        ids = proc.tokenizer(text, add_special_tokens=False)["input_ids"]
        slots = sum(1 for t in ids if t == proc.image_token_id)
        if slots != len(images):
            raise ValueError(f"the text holds {slots} image placeholders but {len(images)} images were given")
        pixels, grids = [], []
        for image in images:
            pv, grid = proc.preprocess_image(image)
            pixels.append(pv)
            grids.append(grid)
        counts = iter(int(np.prod(g)) // proc.config.vision.spatial_merge_size**2 for g in grids)
        expanded = []
        for t in ids:
            expanded.extend([t] * next(counts) if t == proc.image_token_id else [t])
        return Prompt(
            input_ids=np.asarray(expanded, np.int32),
            text=text,
            pixel_values=np.concatenate(pixels) if pixels else None,
            image_grid_thw=np.stack(grids).astype(np.int64) if grids else None,
        )

    def load(self, model_path: str, version: str) -> None:
        params = state_lib.load_params(model_path, self.model_def, self.mesh)
        with self.lock:
            self.engine.sync_weights(params, 0)
            self.weight_version = version


class SGLangStub:
    """A ThreadingHTTPServer on 127.0.0.1 (random port) in a background thread; see the module doc."""

    FAULTS = ("5xx", "timeout", "drop", "truncate", "abort", "4xx")

    def __init__(
        self,
        backend: StubBackend,
        *,
        p_5xx: float = 0.0,
        p_timeout: float = 0.0,
        p_drop: float = 0.0,
        p_truncate: float = 0.0,
        p_abort: float = 0.0,
        script: tuple[str, ...] = (),
        hang_s: float | None = 3.0,
        latency_s: float = 0.0,
        fail_updates: int = 0,
        seed: int = 0,
    ):
        """`p_*` are per-request fault rates on /generate; `script` lists the faults (names in FAULTS, or
        None for none) of the first requests, in arrival order, before the random draws take over.
        hang_s: how long an injected timeout holds its answer; None holds it until the client aborts
        the request (/abort_request with its rid), so the fault is a timeout however slow the machine."""
        self.backend = backend
        self.faults = {
            "5xx": p_5xx,
            "timeout": p_timeout,
            "drop": p_drop,
            "truncate": p_truncate,
            "abort": p_abort,
        }
        unknown = set(script) - set(self.FAULTS) - {None}
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {self.FAULTS}")
        self._script = collections.deque(script)
        self.bodies: list[dict] = []  # every /generate body, for protocol checks
        self.hang_s = hang_s
        self.latency_s = latency_s
        self.fail_updates = fail_updates
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counts: collections.Counter = collections.Counter()
        self._in_flight = 0
        self._max_in_flight = 0
        self.aborted_rids: list[str] = []
        self._aborted = collections.defaultdict(threading.Event)  # rid -> set once /abort_request names it
        self.paused = False
        self._resume = threading.Condition(self._lock)
        self._closing = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                stub._dispatch(self, "GET")

            def do_POST(self):
                stub._dispatch(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            self.paused = False
            self._resume.notify_all()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def stats(self) -> dict:
        with self._lock:
            return {
                "requests": dict(self._counts),
                "max_in_flight": self._max_in_flight,
                "paused": self.paused,
                "weight_version": self.backend.weight_version,
                "aborted_rids": list(self.aborted_rids),
            }

    # -- HTTP ---------------------------------------------------------------------------------------

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, payload=None, raw: bytes | None = None) -> None:
        body = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
        try:
            h.send_response(status)
            if payload is not None or raw is not None:
                h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        except OSError:
            pass  # the client gave up (an injected timeout)

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = h.path.split("?")[0]
        self._count(path)
        try:
            length = int(h.headers.get("Content-Length") or 0)
            body = json.loads(h.rfile.read(length)) if length else {}
        except json.JSONDecodeError as e:
            return self._reply(h, 400, {"object": "error", "message": f"invalid JSON: {e}", "code": 400})
        routes = {
            ("GET", "/health"): lambda: self._reply(h, 200),
            ("GET", "/get_weight_version"): lambda: self._reply(
                h, 200, {"weight_version": self.backend.weight_version}
            ),
            ("POST", "/pause_generation"): lambda: self._pause(h, True),
            ("POST", "/continue_generation"): lambda: self._pause(h, False),
            ("POST", "/update_weights_from_disk"): lambda: self._update(h, body),
            ("POST", "/abort_request"): lambda: self._abort_request(h, body),
            ("POST", "/generate"): lambda: self._generate(h, body),
        }
        route = routes.get((method, path))
        if route is None:
            return self._reply(h, 404, {"detail": "Not Found"})
        route()

    def _pause(self, h, paused: bool) -> None:
        with self._lock:
            self.paused = paused
            self._resume.notify_all()
        word = "paused" if paused else "continued"
        self._reply(h, 200, {"message": f"Generation {word} successfully.", "status": "ok"})

    def _abort_request(self, h, body: dict) -> None:
        with self._lock:
            self.aborted_rids.append(body.get("rid", ""))
            self._aborted[body.get("rid", "")].set()
        self._reply(h, 200)

    def _update(self, h, body: dict) -> None:
        path, version = body.get("model_path"), body.get("weight_version")
        with self._lock:
            fail = self.fail_updates > 0
            self.fail_updates -= int(fail)
        if fail:
            return self._reply(
                h,
                400,
                {
                    "success": False,
                    "message": "Failed to update weights: injected failure. Rolling back to the old weights.",
                    "num_paused_requests": 0,
                },
            )
        try:
            self.backend.load(path, version if version is not None else self.backend.weight_version)
        except Exception as e:  # noqa: BLE001 - SGLang reports any load failure as success false
            return self._reply(
                h,
                400,
                {
                    "success": False,
                    "message": f"Failed to update weights: {e}. Rolling back to the old weights.",
                    "num_paused_requests": 0,
                },
            )
        message = "Succeeded to update model weights."
        if version is not None:
            message += f" Weight version updated to {version}."
        self._reply(h, 200, {"success": True, "message": message, "num_paused_requests": 0})

    def _generate(self, h, body: dict) -> None:
        with self._lock:
            self.bodies.append(body)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            with self._lock:
                while self.paused:
                    self._resume.wait()
            reply = self._generate_unpaused(body)
        finally:
            # Leave before answering: once the client has the answer it may send its next request.
            with self._lock:
                self._in_flight -= 1
        if reply is None:
            h.close_connection = True  # an injected drop: the socket closes with no status line
        else:
            self._reply(h, *reply)

    def _pick_fault(self) -> str | None:
        with self._lock:
            if self._script:
                return self._script.popleft()
            u = self._rng.random()
        for kind, p in self.faults.items():
            if u < p:
                return kind
            u -= p
        return None

    def _generate_unpaused(self, body: dict) -> tuple | None:
        """(status, payload, raw body) of the answer, or None to drop the connection."""
        fault = self._pick_fault()
        if fault:
            self._count(f"fault/{fault}")
        if fault == "5xx":
            return (503, {"object": "error", "message": "injected overload", "code": 503})
        if fault == "4xx":
            return (400, {"object": "error", "message": "injected bad request", "code": 400})
        if fault == "drop":
            return None
        rid = body.get("rid") or uuid.uuid4().hex
        if fault == "timeout" and self.hang_s is not None:
            self._closing.wait(self.hang_s)
        elif fault == "timeout":
            with self._lock:
                aborted = self._aborted[rid]
            while not aborted.wait(0.05) and not self._closing.is_set():
                pass
        if fault == "abort":
            return (
                200,
                {
                    "text": "",
                    "output_ids": [],
                    "meta_info": {
                        "id": rid,
                        "finish_reason": {"type": "abort", "message": "Abort before prefill"},
                        "prompt_tokens": 0,
                        "completion_tokens": 0,
                        "cached_tokens": 0,
                        "output_token_logprobs": [],
                        "weight_version": self.backend.weight_version,
                    },
                },
            )
        if "text" not in body or "input_ids" in body:
            return (400, {"object": "error", "message": "the stub takes `text` only", "code": 400})
        sp = dict(body.get("sampling_params") or {})
        if int(sp.get("n", 1)) != 1 or isinstance(body["text"], list):
            return (
                400,
                {"object": "error", "message": "the stub serves one sample per request", "code": 400},
            )
        try:
            image_data = body.get("image_data") or []
            prompt = self.backend.prompt(
                body["text"], [image_data] if isinstance(image_data, str) else image_data
            )
            stop = sp.get("stop_token_ids")
            sampling = SamplingParams(
                temperature=float(sp.get("temperature", 1.0)),
                top_p=float(sp.get("top_p", 1.0)),
                top_k=int(sp.get("top_k", -1)),
                max_new_tokens=int(sp.get("max_new_tokens", 128)),
                stop_token_ids=tuple(stop) if stop else None,
                seed=self.backend.next_seed(),
            )
        except (ValueError, TypeError) as e:
            return (400, {"object": "error", "message": str(e), "code": 400})
        if self.latency_s:
            self._closing.wait(self.latency_s)
        with self.backend.lock:
            c = self.backend.engine.generate([prompt], sampling, n=1)[0]
            version = self.backend.weight_version
        ids = [int(t) for t in c.token_ids]
        text = c.text
        if c.finish_reason == "stop":
            finish = {"type": "stop", "matched": ids[-1]}
            if sp.get("no_stop_trim"):
                text = self.backend.processor.tokenizer.decode(ids, skip_special_tokens=False)
        else:
            finish = {"type": "length", "length": sampling.max_new_tokens}
        meta = {
            "id": rid,
            "finish_reason": finish,
            "prompt_tokens": len(prompt.input_ids),
            "completion_tokens": len(ids),
            "cached_tokens": 0,
            "weight_version": version,
        }
        if body.get("return_logprob"):
            meta["output_token_logprobs"] = [[float(lp), t, None] for lp, t in zip(c.logprobs, ids)]
        raw = json.dumps({"text": text, "output_ids": ids, "meta_info": meta}).encode()
        if fault == "truncate":
            raw = raw[: len(raw) // 2]
        return 200, None, raw
