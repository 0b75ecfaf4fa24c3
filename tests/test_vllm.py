"""The vLLM rollout engine against a loopback stub (tests/vllm_stub.py): the request it sends, weight
reload through a checked dir, and the faults a real server cannot be made to show on demand.
The real-server checks (token agreement, weight sync in training, a killed server) are the live
tier, tests/test_vllm_live.py."""

import dataclasses
import os
import shutil
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pr1 import sharding
from pr1.data.processor import Processor
from pr1.models.generation import IMAGE_PAD, Prompt, SamplingParams, default_stop_token_ids
from pr1.models.model_def import ModelDef
from pr1.models.tiny import write_tiny_checkpoint
from pr1.rollout.server_client import RETRY_KINDS
from pr1.rollout.vllm import RAW_CHAT_TEMPLATE, VLLMEngine, VLLMError, check_weights_dir, vllm_config
from pr1.train import state as state_lib
from tests.test_sglang import teacher_forced
from tests.vllm_stub import StubBackend, VLLMStub

MAX_NEW = 6
SAMPLE = SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, seed=7)
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)
SYNC_ROUTES = [
    "POST /pause",
    "POST /collective_rpc",
    "POST /reset_prefix_cache",
    "POST /reset_encoder_cache",
    "POST /update_weight_version",
    "GET /weight_info",
    "POST /resume",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("vllm") / "ckpt", seed=0, preset="vllm")


@pytest.fixture(scope="module")
def processor(ckpt):
    return Processor.from_dir(ckpt)


@pytest.fixture(scope="module")
def prompts(processor):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (56, 84, 3), np.uint8))
    return [Prompt.build(processor, "What is the value of x?", [image]), Prompt.build(processor, "Hi")]


@pytest.fixture(scope="module")
def backend(ckpt):
    return StubBackend(ckpt)


@pytest.fixture(scope="module")
def model_def(processor):
    return ModelDef.create(processor.config, dtype=jnp.float32)


@pytest.fixture(scope="module")
def params(ckpt, model_def):
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    old = state_lib.load_params(ckpt, model_def, mesh)
    rng = np.random.default_rng(1)
    new = jax.tree.map(
        lambda x: jax.device_put(
            np.asarray(x) * (1 + 0.5 * rng.standard_normal(x.shape)).astype(np.float32), x.sharding
        ),
        old,
    )
    return old, new


@pytest.fixture
def served(backend, ckpt):
    """The shared backend serves the launch checkpoint again after each test."""
    yield backend
    backend.load(ckpt, "default")


def make_engine(urls, processor, **kw):
    # Generous timeouts: nothing here may depend on how fast this machine is.
    options = dict(
        stop_token_ids=default_stop_token_ids(processor.tokenizer, processor.config),
        request_timeout_s=120.0,
        connect_timeout_s=5.0,
        health_timeout_s=5.0,
        backoff_base_s=0.01,
        backoff_cap_s=0.05,
        concurrency=4,
        restart_timeout_s=0.0,
    )
    options.update(kw)
    return VLLMEngine(urls, **options)


def test_request_carries_our_prompt_verbatim(backend, processor, prompts):
    with VLLMStub(backend) as stub:
        engine = make_engine([stub.url], processor)
        out = engine.generate(prompts, SAMPLE, n=3)
        assert [(c.prompt_index, c.sample_index) for c in out] == [(p, s) for p in range(2) for s in range(3)]
        for c in out:
            assert c.token_ids.dtype == np.int32 and c.logprobs.dtype == np.float32
            assert 1 <= len(c.token_ids) == len(c.logprobs) <= MAX_NEW and np.all(c.logprobs <= 0)
            assert c.weight_version is None  # never synced: nothing to claim
        bodies = stub.bodies
        assert len(bodies) == 6 and {b["model"] for b in bodies} == {"tiny"}  # the name from /v1/models
        assert len({b["seed"] for b in bodies}) == 6  # n samples of one prompt must not share a seed
        for b in bodies:
            assert b["chat_template"] == RAW_CHAT_TEMPLATE and b["add_generation_prompt"] is False
            assert b["return_token_ids"] is True and b["logprobs"] is True and b["n"] == 1
            assert (b["top_p"], b["top_k"], b["min_p"], b["repetition_penalty"]) == (1.0, 0, 0.0, 1.0)
            assert b["stop_token_ids"] == list(engine.stop_token_ids) and b["skip_special_tokens"] is False
            # The parts put back together are our prompt text, an image part at each pad.
            parts = b["messages"][0]["content"]
            text = "".join(p["text"] if p["type"] == "text" else IMAGE_PAD for p in parts)
            assert text in (prompts[0].text, prompts[1].text)
            images = [p for p in parts if p["type"] == "image_url"]
            assert len(images) == text.count(IMAGE_PAD)
            assert all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in images)
        again = make_engine([stub.url], processor).generate(prompts, SAMPLE, n=3)
        assert [c.token_ids.tolist() for c in again] == [c.token_ids.tolist() for c in out]  # seeded
        with pytest.raises(ValueError, match="rollout.top_p=1.0"):
            engine.generate(prompts, dataclasses.replace(SAMPLE, top_p=0.9))
        bad = dataclasses.replace(prompts[0], input_ids=prompts[0].input_ids[:-1])
        with pytest.raises(VLLMError, match="first difference at position") as e:
            engine.generate([bad], GREEDY)
        assert stub.url in str(e.value)


def test_faults_are_retried_and_counted(backend, processor, prompts):
    with VLLMStub(backend) as clean:
        reference = [
            c.token_ids.tolist() for c in make_engine([clean.url], processor).generate(prompts, GREEDY)
        ]
    script = ("5xx", "timeout", "drop", "truncate", "abort")
    with VLLMStub(backend, script=script, hang_s=3.0) as stub:
        engine = make_engine([stub.url], processor, request_timeout_s=1.0, max_attempts=8)
        out = engine.generate(prompts, GREEDY, n=3)
        assert [c.token_ids.tolist() for c in out] == [reference[c.prompt_index] for c in out]
        stats = engine.stats
        for kind in RETRY_KINDS:
            assert stats[f"retries/{kind}"] >= 1, (kind, stats)
        assert stats["samples"] == 6
        assert stats["requests"] == stats["samples"] + sum(stats[f"retries/{k}"] for k in RETRY_KINDS)
    with VLLMStub(backend, script=("4xx",)) as stub:  # not retried: nothing would change
        with pytest.raises(VLLMError, match="HTTP 400") as e:
            make_engine([stub.url], processor).generate(prompts[1:], GREEDY)
        assert stub.url in str(e.value) and stub.stats()["requests"]["/v1/chat/completions"] == 1
    with VLLMStub(backend) as stub:
        with pytest.raises(VLLMError, match="does not serve model 'other'") as e:
            make_engine([stub.url], processor, model="other").generate(prompts[1:], GREEDY)
        assert stub.url in str(e.value)


def test_weight_sync_through_a_checked_dir(served, ckpt, processor, prompts, model_def, params, tmp_path):
    old, new = params
    workdir = tmp_path / "work"
    with VLLMStub(served) as stub:
        engine = make_engine([stub.url], processor, model_def=model_def, workdir=workdir, assets_from=ckpt)
        engine.sync_weights(new, step=1)
        assert stub.routes[-len(SYNC_ROUTES) :] == SYNC_ROUTES
        assert served.weight_version == "step-1" and not stub.stats()["paused"]
        for c in engine.generate(prompts, GREEDY):
            assert c.weight_version == "step-1"
            mine = teacher_forced(model_def, new, prompts[c.prompt_index], c.token_ids)
            np.testing.assert_allclose(c.logprobs, mine, atol=1e-4, rtol=0)
            assert (
                np.max(
                    np.abs(c.logprobs - teacher_forced(model_def, old, prompts[c.prompt_index], c.token_ids))
                )
                > 1e-2
            )

        # A bad dir is refused before any request: the server keeps serving step-1.
        routes = len(stub.routes)
        shard = next(n for n in os.listdir(workdir / "weights" / "step-1") if n.endswith(".safetensors"))
        bad = tmp_path / "bad"
        shutil.copytree(workdir / "weights" / "step-1", bad)
        with open(bad / shard, "r+b") as f:
            f.truncate(100)
        for path in (bad, tmp_path / "missing"):
            with pytest.raises(VLLMError, match="weight dir") as e:
                engine._update_server(stub.url, str(path), "step-9")
            assert str(path) in str(e.value)
        assert len(stub.routes) == routes and served.weight_version == "step-1"

        # A reload the server fails: the error names the URL, the server is resumed and its version marked
        # broken, so the next samples reload the current weights rather than pass as step-1.
        stub.fail_reloads = 1
        with pytest.raises(VLLMError, match="HTTP 500") as e:
            engine.sync_weights(old, step=2)
        assert stub.url in str(e.value) and not stub.stats()["paused"]
        assert served.weight_version == "broken:step-2" and engine.weight_version == "step-1"
        before = engine.stats
        for c in engine.generate(prompts, GREEDY):
            assert c.weight_version == "step-1"
            np.testing.assert_allclose(
                c.logprobs, teacher_forced(model_def, new, prompts[c.prompt_index], c.token_ids), atol=1e-4
            )
        assert engine.stats["resyncs"] - before["resyncs"] == 1


def test_a_silently_restarted_server_is_resynced(
    served, ckpt, processor, prompts, model_def, params, tmp_path
):
    """The server came back with its launch checkpoint between two requests: no connection error, only
    the served version tells. No sample of the launch weights may pass as the current version."""
    _, new = params
    with VLLMStub(served) as stub:
        engine = make_engine(
            [stub.url], processor, model_def=model_def, workdir=tmp_path / "work", assets_from=ckpt
        )
        engine.sync_weights(new, step=3)
        served.load(ckpt, "default")
        out = engine.generate(prompts, GREEDY, n=2)
        assert {c.weight_version for c in out} == {"step-3"}
        for c in out:
            np.testing.assert_allclose(
                c.logprobs, teacher_forced(model_def, new, prompts[c.prompt_index], c.token_ids), atol=1e-4
            )
        stats = engine.stats
        assert stats["resyncs"] == 1 and stats["retries/stale_weights"] >= 1


def test_a_lost_server_is_waited_for_or_named(served, ckpt, processor, prompts, model_def, params, tmp_path):
    _, new = params
    with VLLMStub(served) as stub:
        engine = make_engine(
            [stub.url],
            processor,
            model_def=model_def,
            workdir=tmp_path / "work",
            assets_from=ckpt,
            restart_timeout_s=120.0,
        )
        engine.sync_weights(new, step=4)
        stub.go_down()
        threading.Timer(1.0, stub.come_back).start()  # restarted: launch weights, version "default"
        out = engine.generate(prompts, GREEDY, n=2)
        assert {c.weight_version for c in out} == {"step-4"}
        for c in out:
            np.testing.assert_allclose(
                c.logprobs, teacher_forced(model_def, new, prompts[c.prompt_index], c.token_ids), atol=1e-4
            )
        stats = engine.stats
        assert stats["restarts_waited"] == 1 and stats["resyncs"] == 1 and stats["retries/connection"] >= 1

        stub.go_down()
        quick = make_engine([stub.url], processor, check_health=False, restart_timeout_s=0.5)
        with pytest.raises(VLLMError, match="not healthy again within rollout.vllm.restart_timeout_s") as e:
            quick.generate(prompts[1:], GREEDY)
        assert stub.url in str(e.value)


def test_check_weights_dir(ckpt, tmp_path):
    check_weights_dir(ckpt)
    shard = next(n for n in os.listdir(ckpt) if n.endswith(".safetensors"))
    cases = {
        "does not exist": None,
        "no readable config.json": "config.json",
        "truncated": shard,
        "no .safetensors": "*",
    }
    for why, victim in cases.items():
        path = tmp_path / why.replace(" ", "_").replace(".", "")
        if victim is not None:
            shutil.copytree(ckpt, path)
            if victim == "*":
                for n in os.listdir(path):
                    if "safetensors" in n:
                        os.remove(path / n)
            elif victim == shard:
                with open(path / shard, "r+b") as f:
                    f.truncate(os.path.getsize(path / shard) - 1)
            else:
                os.remove(path / victim)
        with pytest.raises(VLLMError, match=why) as e:
            check_weights_dir(str(path))
        assert str(path) in str(e.value)


def test_config_knobs_and_validation(ckpt):
    from pr1.train.config import ConfigError, default_config, validate_config

    cfg = vllm_config()
    assert (
        list(cfg.urls) == [] and cfg.model == "" and cfg.restart_timeout_s == 900 and cfg.keep_versions == 2
    )
    with pytest.raises(ValueError, match="rollout.vllm.urls is empty"):
        VLLMEngine.from_config(cfg, stop_token_ids=(1,))
    c = default_config()
    c.model.path = str(ckpt)
    c.data.train_files = ("a.parquet",)
    c.rollout.engine = "vllm"
    with pytest.raises(ConfigError, match="rollout.vllm.urls"):
        validate_config(c, check_files=False)
    c.rollout.vllm.urls = ("http://h:8000",)
    c.rollout.top_p = 0.9
    with pytest.raises(ConfigError, match="rollout.top_p"):
        validate_config(c, check_files=False)


def test_eval_takes_engine_vllm(backend, ckpt):
    from pr1.eval import run

    with pytest.raises(ValueError, match="--engine vllm needs --vllm_url"):
        run.load_policy(model=ckpt, engine="vllm")
    with VLLMStub(backend) as stub:
        policy = run.load_policy(model=ckpt, engine="vllm", vllm_urls=[stub.url])
        assert isinstance(policy.engine, VLLMEngine)
        [c] = policy.engine.generate([Prompt.build(policy.processor, "Hi")], GREEDY)
        assert 1 <= len(c.token_ids) <= MAX_NEW and c.finish_reason in ("stop", "length")
