"""The SGLang rollout engine against a loopback stub server (tests/sglang_stub.py) backed by the
embedded sampler: protocol, weight sync through disk, retries under injected faults, concurrency,
dead servers; plus a live test against a real server when PR1_SGLANG_URL is set."""

import dataclasses
import functools
import os
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pr1 import sharding
from pr1.data.processor import Processor
from pr1.models.generation import Prompt, SamplingParams, default_stop_token_ids
from pr1.models.model_def import ModelDef
from pr1.models.rope import rope_index
from pr1.models.tiny import write_tiny_checkpoint
from pr1.models.vision import vision_layout
from pr1.rl import grpo
from pr1.rollout.server_client import RETRY_KINDS
from pr1.rollout.sglang import SGLangEngine, SGLangError, sglang_config
from pr1.train import state as state_lib
from tests.sglang_stub import SGLangStub, StubBackend

MAX_NEW = 6
# Two sampling settings for every test, so the stub's sampler compiles each prompt shape once.
SAMPLE = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=MAX_NEW)
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("sglang") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def processor(ckpt):
    return Processor.from_dir(ckpt)


@pytest.fixture(scope="module")
def prompts(processor):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (56, 84, 3), np.uint8))
    image2 = rng.integers(0, 255, (84, 56, 3), np.uint8)  # an array, to cover that input kind
    return [
        Prompt.build(processor, "What is the value of x?", [image]),
        Prompt.build(processor, "Hi"),
        Prompt.build(processor, "Find the length of AB.", [image2]),
    ]


@pytest.fixture(scope="module")
def backend(ckpt):
    """Shared by the tests that do not change weights, so the sampler compiles once."""
    return StubBackend(ckpt)


def make_engine(urls, processor, **kw):
    options = dict(
        stop_token_ids=default_stop_token_ids(processor.tokenizer, processor.config),
        # Generous: a request that outlives it is retried, and a loaded machine can be slow.
        request_timeout_s=300.0,
        connect_timeout_s=2.0,
        health_timeout_s=2.0,
        backoff_base_s=0.01,
        backoff_cap_s=0.05,
        concurrency=4,
    )
    options.update(kw)
    return SGLangEngine(urls, **options)


@functools.partial(jax.jit, static_argnames=("model_def", "start"))
def _response_logprobs(params, ids, pos, pixel_values, layout, temperature, *, model_def, start):
    model = model_def.bind(params)
    logits = model(ids, position_ids=pos, pixel_values=pixel_values, vision_layout_arrays=layout)
    return grpo.token_logprobs(logits[:, start - 1 : -1], ids[:, start:], temperature)


def teacher_forced(model_def, params, prompt: Prompt, tokens, temperature=1.0):
    """The learner's logprobs of `tokens` after `prompt`: one full forward, no cache."""
    ids = np.concatenate([prompt.input_ids, np.asarray(tokens, np.int32)])[None]
    pos, _ = rope_index(model_def.config, ids, prompt.image_grid_thw)
    layout = (
        None
        if prompt.image_grid_thw is None
        else vision_layout(prompt.image_grid_thw, model_def.config.vision)
    )
    lp = _response_logprobs(
        params,
        ids,
        pos.astype(np.int32),
        prompt.pixel_values,
        layout,
        np.float32(temperature),
        model_def=model_def,
        start=len(prompt.input_ids),
    )
    return np.asarray(lp)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generate_protocol_and_order(backend, processor, prompts):
    """Every sample comes back exactly once, in prompt-major order; every request the server saw
    was a well-formed one-sample request, and any retry (a slow machine may time one out) is
    counted: requests = samples + retries."""
    with SGLangStub(backend) as stub:
        engine = make_engine([stub.url], processor)
        out = engine.generate(prompts, SAMPLE, n=3)
        assert [(c.prompt_index, c.sample_index) for c in out] == [(p, s) for p in range(3) for s in range(3)]
        for c in out:
            assert c.token_ids.dtype == np.int32 and c.logprobs.dtype == np.float32
            assert 1 <= len(c.token_ids) == len(c.logprobs) <= MAX_NEW
            assert np.all(c.logprobs <= 0) and c.finish_reason in ("stop", "length")
            assert c.weight_version == "default"
        stats = engine.stats
        retries = sum(stats[f"retries/{k}"] for k in RETRY_KINDS) + stats["retries/stale_weights"]
        assert stats["samples"] == 9 and stats["requests"] == 9 + retries
        bodies = stub.bodies
        assert len(bodies) == stats["requests"] == stub.stats()["requests"]["/generate"]
        assert len({b["rid"] for b in bodies}) == len(bodies)  # a retry is a new request id
        for b in bodies:
            sp = b["sampling_params"]
            assert b["return_logprob"] is True and b["logprob_start_len"] == -1
            assert (
                sp["n"] == 1 and sp["top_k"] == -1 and sp["top_p"] == 0.9 and sp["max_new_tokens"] == MAX_NEW
            )
            assert sp["stop_token_ids"] == list(engine.stop_token_ids) and sp["skip_special_tokens"] is False
        by_prompt = [[b for b in bodies if b["text"] == p.text] for p in prompts]
        assert sum(map(len, by_prompt)) == len(bodies) and all(len(group) >= 3 for group in by_prompt)
        assert all(len(b["image_data"]) == 1 for b in by_prompt[0])
        assert by_prompt[0][0]["image_data"][0].startswith("data:image/png;base64,")
        assert all("image_data" not in b for b in by_prompt[1])


def test_stop_token_kept_in_ids_not_text(backend, processor, prompts):
    with SGLangStub(backend) as stub:
        engine = make_engine([stub.url], processor)
        c = engine.generate(prompts[:1], GREEDY)[0]
        assert c.finish_reason == "length" and len(c.token_ids) == MAX_NEW
        first = int(c.token_ids[0])
        c = engine.generate(prompts[:1], dataclasses.replace(GREEDY, stop_token_ids=(first,)))[0]
        assert c.finish_reason == "stop" and c.token_ids.tolist() == [first] and c.text == ""


def test_weight_sync_goes_through_disk(backend, ckpt, processor, prompts, tmp_path):
    """After sync_weights, the server's logprobs are the trainer's new-param logprobs (<= 1e-4, fp32),
    not the old ones; old weight dirs are pruned; a failed update raises and leaves the server running."""
    try:
        _weight_sync(backend, ckpt, processor, prompts[:2], tmp_path)
    finally:
        backend.load(ckpt, "default")  # the shared backend serves the checkpoint again


def _weight_sync(backend, ckpt, processor, prompts, tmp_path):
    mesh = sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4])  # the trainer's (sharded) params
    model_def = ModelDef.create(processor.config, dtype=jnp.float32)
    old = state_lib.load_params(ckpt, model_def, mesh)
    rng = np.random.default_rng(1)  # every tensor changes, so every tensor must travel
    new = jax.tree.map(
        lambda x: jax.device_put(
            np.asarray(x) * (1 + 0.5 * rng.standard_normal(x.shape)).astype(np.float32), x.sharding
        ),
        old,
    )
    workdir = tmp_path / "work"
    with SGLangStub(backend) as stub:
        engine = make_engine(
            [stub.url], processor, model_def=model_def, workdir=workdir, assets_from=ckpt, keep_versions=2
        )
        engine.sync_weights(new, step=1)
        assert stub.stats()["weight_version"] == "step-1" and engine.weight_version == "step-1"
        assert os.path.exists(workdir / "weights" / "step-1" / "tokenizer.json")
        for sampling in (GREEDY, dataclasses.replace(SAMPLE, temperature=0.7)):
            for c in engine.generate(prompts, sampling, n=1):
                assert c.weight_version == "step-1"
                t = 1.0 if sampling.greedy else sampling.temperature
                mine = teacher_forced(model_def, new, prompts[c.prompt_index], c.token_ids, t)
                before = teacher_forced(model_def, old, prompts[c.prompt_index], c.token_ids, t)
                np.testing.assert_allclose(c.logprobs, mine, atol=1e-4, rtol=0)
                assert np.max(np.abs(c.logprobs - before)) > 1e-2

        engine.sync_weights(old, step=2)
        engine.sync_weights(new, step=3)
        assert sorted(os.listdir(workdir / "weights")) == ["step-2", "step-3"]
        assert stub.stats()["weight_version"] == "step-3"

        stub.fail_updates = 1
        with pytest.raises(SGLangError, match="injected failure") as e:
            engine.sync_weights(old, step=4)
        assert stub.url in str(e.value)
        s = stub.stats()
        assert not s["paused"] and s["weight_version"] == "step-3" and engine.weight_version == "step-3"
        assert s["requests"]["/continue_generation"] == s["requests"]["/pause_generation"] == 4
        assert sorted(os.listdir(workdir / "weights")) == [
            "step-2",
            "step-3",
            "step-4",
        ]  # no pruning on failure
        c = engine.generate(prompts[:1], GREEDY)[0]  # the server still serves, with the step-3 weights
        assert c.weight_version == "step-3"
        np.testing.assert_allclose(
            c.logprobs, teacher_forced(model_def, new, prompts[0], c.token_ids), atol=1e-4
        )

        # The server restarts from its launch checkpoint: its samples would come from the old policy.
        # The engine notices the version, loads step-3 again (once) and samples again.
        backend.load(ckpt, "default")
        before = engine.stats
        out = engine.generate(prompts, GREEDY, n=2)
        assert {c.weight_version for c in out} == {"step-3"}
        for c in out:
            np.testing.assert_allclose(
                c.logprobs, teacher_forced(model_def, new, prompts[c.prompt_index], c.token_ids), atol=1e-4
            )
        after = engine.stats
        assert (
            after["resyncs"] - before["resyncs"] == 1
            and after["retries/stale_weights"] > before["retries/stale_weights"]
        )
        assert stub.stats()["weight_version"] == "step-3"


def test_faults_are_retried_and_counted(backend, processor, prompts):
    """Every sample comes back exactly once, in prompt-major order, with the clean run's content."""
    with SGLangStub(backend) as clean:
        reference = [
            c.token_ids.tolist() for c in make_engine([clean.url], processor).generate(prompts, GREEDY)
        ]
    assert len({tuple(r) for r in reference}) == 3  # distinct per prompt, so a mix-up would show
    script = ("5xx", "timeout", "drop", "truncate", "abort")
    with SGLangStub(
        backend,
        script=script,
        p_5xx=0.06,
        p_timeout=0.03,
        p_drop=0.06,
        p_truncate=0.06,
        p_abort=0.06,
        hang_s=None,
        seed=3,
    ) as stub:
        # An injected timeout holds its answer until the engine aborts it, so the engine's timeout can
        # be generous (a loaded machine's slow answer is not mistaken for the fault).
        engine = make_engine([stub.url], processor, request_timeout_s=5.0, max_attempts=12)
        n = 4
        out = engine.generate(prompts, GREEDY, n=n)
        assert [(c.prompt_index, c.sample_index) for c in out] == [(p, s) for p in range(3) for s in range(n)]
        for c in out:
            assert c.token_ids.tolist() == reference[c.prompt_index]
        stats = engine.stats
        for kind in RETRY_KINDS:
            assert stats[f"retries/{kind}"] > 0, (kind, stats)
        assert stats["samples"] == 3 * n
        assert stats["requests"] == stats["samples"] + sum(stats[f"retries/{k}"] for k in RETRY_KINDS)
        assert stub.stats()["requests"]["/generate"] == stats["requests"]
        assert len(stub.stats()["aborted_rids"]) == stats["retries/timeout"]  # timed-out requests are aborted


def test_gives_up_with_a_clear_error(backend, processor, prompts):
    with SGLangStub(backend, p_5xx=1.0) as stub:
        engine = make_engine([stub.url], processor, max_attempts=3)
        with pytest.raises(SGLangError, match="failed 3 times") as e:
            engine.generate(prompts[1:2], SAMPLE)
        assert stub.url in str(e.value) and "HTTP 503" in str(e.value)
        assert stub.stats()["requests"]["/generate"] == 3
    with SGLangStub(backend, script=("4xx",)) as stub:  # not retried: nothing would change
        engine = make_engine([stub.url], processor)
        with pytest.raises(SGLangError, match="HTTP 400") as e:
            engine.generate(prompts[1:2], SAMPLE)
        assert stub.url in str(e.value) and "injected bad request" in str(e.value)
        assert stub.stats()["requests"]["/generate"] == 1
    with SGLangStub(backend) as stub:  # a prompt the server tokenizes differently
        engine = make_engine([stub.url], processor)
        bad = dataclasses.replace(prompts[0], input_ids=prompts[0].input_ids[:-1])
        with pytest.raises(SGLangError, match="prompt tokens"):
            engine.generate([bad], SAMPLE)


def test_concurrency_bound_and_spread(backend, processor, prompts):
    with SGLangStub(backend, latency_s=0.05) as stub:
        engine = make_engine([stub.url], processor, concurrency=3)
        engine.generate(prompts, SAMPLE, n=4)
        assert stub.stats()["max_in_flight"] == 3
    with SGLangStub(backend, latency_s=0.05) as a, SGLangStub(backend, latency_s=0.05) as b:
        engine = make_engine([a.url, b.url], processor, concurrency=4)
        engine.generate(prompts, SAMPLE, n=4)
        counts = [s.stats()["requests"]["/generate"] for s in (a, b)]
        assert sum(counts) == 12 and min(counts) >= 4, counts
        assert max(s.stats()["max_in_flight"] for s in (a, b)) <= 4


def test_dead_url_fails_fast_naming_it(backend, processor):
    dead = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(SGLangError, match="not healthy") as e:
        make_engine([dead], processor, backoff_base_s=0.5)
    assert time.monotonic() - start < 5 and dead in str(e.value)
    with SGLangStub(backend) as stub:
        with pytest.raises(SGLangError) as e:
            make_engine([stub.url, dead], processor)
        assert f"{dead} (" in str(e.value) and f"{stub.url} (" not in str(e.value)


def test_config_knobs():
    cfg = sglang_config()
    assert list(cfg.urls) == [] and cfg.concurrency == 64 and cfg.request_timeout_s == 600
    assert (
        cfg.max_attempts == 5
        and cfg.backoff_base_s == 0.5
        and cfg.backoff_cap_s == 30
        and cfg.keep_versions == 2
    )
    with pytest.raises(ValueError, match="urls is empty"):
        SGLangEngine.from_config(cfg, stop_token_ids=(1,))


@pytest.mark.live
def test_live_server():
    """Against a real SGLang server: PR1_SGLANG_URL (e.g. http://host:30000) and PR1_SGLANG_MODEL (the
    checkpoint dir it serves, for our tokenizer and processor). PR1_SGLANG_WORKDIR (a dir the server
    can read) also runs a weight sync round trip of the same weights."""
    url = os.environ.get("PR1_SGLANG_URL")
    model = os.environ.get("PR1_SGLANG_MODEL")
    if not url or not model:
        pytest.skip(
            "set PR1_SGLANG_URL and PR1_SGLANG_MODEL (the served checkpoint dir) to test a real SGLang server"
        )
    processor = Processor.from_dir(model)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 336, 3), np.uint8))
    prompts = [
        Prompt.build(processor, "Describe the image in one word.", [image]),
        Prompt.build(processor, "Hi"),
    ]
    workdir = os.environ.get("PR1_SGLANG_WORKDIR")
    model_def = ModelDef.create(processor.config, dtype=jnp.bfloat16) if workdir else None
    engine = SGLangEngine(
        [url],
        tokenizer=processor.tokenizer,
        stop_token_ids=default_stop_token_ids(processor.tokenizer, processor.config),
        model_def=model_def,
        workdir=workdir,
        assets_from=model,
    )
    out = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=16), n=2)
    assert [(c.prompt_index, c.sample_index) for c in out] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for c in out:
        assert 1 <= len(c.token_ids) == len(c.logprobs) <= 16 and np.all(c.logprobs <= 0)
        assert c.finish_reason in ("stop", "length")
    if workdir:
        mesh = sharding.make_mesh(1, -1, 1)
        engine.sync_weights(state_lib.load_params(model, model_def, mesh), step=1)
        assert engine.generate(prompts[1:], SamplingParams(max_new_tokens=4))[0].weight_version == "step-1"
