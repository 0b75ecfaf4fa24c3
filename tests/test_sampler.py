"""The embedded sampler: greedy = transformers' generate, logprobs = the learner's, sampling law, stops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from pr1 import sharding
from pr1.data.processor import Processor
from pr1.models import attention as attention_lib
from pr1.models.config import Qwen25VLConfig
from pr1.models.generation import Prompt, SamplingParams, default_stop_token_ids
from pr1.models.model_def import ModelDef
from pr1.models.rope import rope_index
from pr1.models.tiny_tokenizer import write_tokenizer_files
from pr1.models.vision import batched_vision_inputs
from pr1.rollout.sampler import EmbeddedEngine, sample_tokens
from pr1.train import state as state_lib
from pr1.train import step as step_lib
from tests.hf_reference import make_hf_model

MAX_NEW = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """transformers' unit-scale tiny model saved as a checkpoint dir, and our engine on its weights."""
    ref = make_hf_model(seed=2)
    path = tmp_path_factory.mktemp("sampler") / "ckpt"
    ref.save_pretrained(path)
    write_tokenizer_files(path, max_pixels=200_704)
    config = Qwen25VLConfig.from_dir(path)
    processor = Processor.from_dir(path)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (56, 84, 3), np.uint8))
    image2 = Image.fromarray(rng.integers(0, 255, (84, 56, 3), np.uint8))
    prompts = [
        Prompt.build(processor, "What is the value of x?", [image]),
        Prompt.build(processor, "Hi"),
        Prompt.build(processor, "Find the length of segment AB in the figure, please.", [image2]),
    ]
    return ref, path, config, processor, prompts


def engine_for(path, config, processor, mesh, **kwargs):
    model_def = ModelDef.create(config, dtype=jnp.float32)
    params = state_lib.load_params(path, model_def, mesh)
    kwargs = {"min_prompt_bucket": 16, "min_patch_bucket": 16, **kwargs}
    return EmbeddedEngine(
        model_def,
        params,
        mesh,
        processor.tokenizer,
        stop_token_ids=default_stop_token_ids(processor.tokenizer, config),
        pad_token_id=processor.pad_token_id,
        **kwargs,
    )


def one_device():
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def hf_greedy(ref, processor, prompts, max_new):
    """transformers' greedy generate on the left-padded batch of `prompts` (its own decode positions)."""
    questions = [p for p in prompts]
    length = max(len(p.input_ids) for p in questions)
    ids = np.full((len(prompts), length), processor.pad_token_id, np.int64)
    mask = np.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, length - len(p.input_ids) :] = p.input_ids
        mask[b, length - len(p.input_ids) :] = 1
    pixels = [p.pixel_values for p in prompts if p.pixel_values is not None]
    grids = [p.image_grid_thw for p in prompts if p.image_grid_thw is not None]
    kwargs = {}
    if pixels:
        kwargs = dict(
            pixel_values=torch.as_tensor(np.concatenate(pixels)),
            image_grid_thw=torch.as_tensor(np.concatenate(grids)),
        )
    input_ids = torch.as_tensor(ids)
    with torch.no_grad():
        out = ref.generate(
            input_ids=input_ids,
            attention_mask=torch.as_tensor(mask),
            mm_token_type_ids=(input_ids == ref.config.image_token_id).to(torch.int32),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=processor.pad_token_id,
            **kwargs,
        )
    return out[:, length:].numpy()


@pytest.mark.parametrize("which", [[0], [0, 1, 2]], ids=["one_image", "left_padded_batch"])
def test_greedy_equals_transformers_generate(setup, which):
    ref, path, config, processor, prompts = setup
    chosen = [prompts[i] for i in which]
    want = hf_greedy(ref, processor, chosen, MAX_NEW)
    engine = engine_for(path, config, processor, one_device())
    # No stop tokens that random weights would hit: compare all MAX_NEW tokens.
    got = engine.generate(
        chosen, SamplingParams(temperature=0, max_new_tokens=MAX_NEW, stop_token_ids=(511,))
    )
    assert [c.finish_reason for c in got] == ["length"] * len(chosen)
    np.testing.assert_array_equal(np.stack([c.token_ids for c in got]), want)
    # Rows are not all the same sequence (the comparison is not vacuous).
    assert len({tuple(c.token_ids) for c in got}) == len(chosen) or len(chosen) == 1


def test_greedy_equals_transformers_generate_with_prefill_chunks(setup, monkeypatch):
    """Prefill one prompt at a time (chunks smaller than the batch), blockwise attention, decode steps
    reading the response cache in blocks of 3 of its 8 slots (only the filled ones): still generate's
    tokens."""
    import dataclasses

    monkeypatch.setattr(attention_lib, "DECODE_BLOCK", 3)
    ref, path, config, processor, prompts = setup
    want = hf_greedy(ref, processor, prompts, MAX_NEW)
    engine = engine_for(
        path, dataclasses.replace(config, attention="blockwise"), processor, one_device(), prefill_chunk=1
    )
    assert engine.prefill_chunks(3) == 3
    got = engine.generate(
        prompts, SamplingParams(temperature=0, max_new_tokens=MAX_NEW, stop_token_ids=(511,))
    )
    np.testing.assert_array_equal(np.stack([c.token_ids for c in got]), want)


def test_prompt_kv_is_held_once_for_n_samples(setup):
    """The compiled rollout's temporaries grow with n by the response cache only: the prompt's K/V
    (long prompts, few new tokens) are not repeated for the n samples."""
    _, path, config, processor, prompts = setup
    engine = engine_for(path, config, processor, one_device(), min_prompt_bucket=1024)
    batch, _ = engine._prefill_inputs(prompts[:2])
    t = config.text
    prompt_kv = (
        2 * t.num_hidden_layers * 2 * 1024 * t.num_key_value_heads * t.head_dim * 4
    )  # k+v, 2 prompts, fp32
    stop = jnp.asarray([511], jnp.int32)

    def temps(n):
        lowered = engine.lower(
            engine._params, batch, stop, n=n, max_new_tokens=4, greedy=True, filtering=False
        )
        return lowered.compile().memory_analysis().temp_size_in_bytes

    one, eight = temps(1), temps(8)
    assert one >= prompt_kv  # the prompt cache is among the temporaries
    assert eight - one < prompt_kv, (one, eight, prompt_kv)  # repeating it would add 7x


def learner_logprobs(path, config, prompts, completions, n, temperature):
    """Teacher-forced logprobs of each completion under the learner's logprob step."""
    rows = [(prompts[c.prompt_index], c) for c in completions]
    length = max(len(p.input_ids) + len(c.token_ids) for p, c in rows)
    b = len(rows)
    ids = np.zeros((b, length), np.int32)
    mask = np.zeros((b, length), np.int32)
    loss_mask = np.zeros((b, length), np.int32)
    for i, (p, c) in enumerate(rows):
        seq = np.concatenate([p.input_ids, c.token_ids])
        ids[i, length - len(seq) :] = seq  # left-padded like the learner's batches may be
        mask[i, length - len(seq) :] = 1
        loss_mask[i, length - len(c.token_ids) :] = 1
    grids = [p.image_grid_thw for p, _ in rows if p.image_grid_thw is not None]
    pos, _ = rope_index(config, ids, np.concatenate(grids) if grids else None, mask)
    vision = batched_vision_inputs(
        [p.pixel_values for p, _ in rows], [p.image_grid_thw for p, _ in rows], config.vision, num_patches=64
    )
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": np.swapaxes(pos, 0, 1).astype(np.int32),
        "loss_mask": loss_mask,
        **vision,
    }
    mesh = one_device()
    model_def = ModelDef.create(config, dtype=jnp.float32)
    params = state_lib.load_params(path, model_def, mesh)
    cfg = step_lib.learner_config()
    cfg.temperature = temperature
    lp = np.asarray(
        step_lib.make_logprob_step(model_def, cfg, model_def.param_shardings(mesh), mesh)(params, batch)
    )
    return [lp[i, length - len(c.token_ids) :] for i, (_, c) in enumerate(rows)]


@pytest.mark.parametrize("decode_block", [256, 3], ids=["one_block", "blocks_of_3"])
def test_sampled_logprobs_equal_learner_logprobs(setup, monkeypatch, decode_block):
    monkeypatch.setattr(attention_lib, "DECODE_BLOCK", decode_block)  # auto = blockwise on CPU
    _, path, config, processor, prompts = setup
    engine = engine_for(path, config, processor, one_device())
    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=MAX_NEW, seed=3)
    got = engine.generate(prompts, sampling, n=3)
    assert [(c.prompt_index, c.sample_index) for c in got] == [(p, s) for p in range(3) for s in range(3)]
    # The n samples of one prompt differ (they share a prefill, not a random stream).
    assert len({tuple(c.token_ids) for c in got[:3]}) > 1
    want = learner_logprobs(path, config, prompts, got, 3, temperature=0.7)
    for c, w in zip(got, want):
        np.testing.assert_allclose(c.logprobs, w, atol=1e-4, rtol=0)


@pytest.mark.parametrize("weights_layout", ["gathered", "learner"])
def test_sharded_engine_matches_single_device(setup, weights_layout):
    """On a data x fsdp x tensor mesh, with the rollout's weights gathered once per rollout (default)
    or read in the learner's FSDP layout, the rollout is the single-device one."""
    _, path, config, processor, prompts = setup
    sampling = SamplingParams(temperature=0, max_new_tokens=MAX_NEW, stop_token_ids=(511,))
    want = engine_for(path, config, processor, one_device()).generate(prompts, sampling, n=2)
    engine = engine_for(path, config, processor, sharding.make_mesh(2, 2, 2), weights_layout=weights_layout)
    got = engine.generate(prompts, sampling, n=2)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.token_ids, w.token_ids)
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)


def test_stop_tokens_end_sequences_with_the_right_reason(setup):
    _, path, config, processor, prompts = setup
    engine = engine_for(path, config, processor, one_device())
    free = engine.generate(
        prompts, SamplingParams(temperature=0, max_new_tokens=MAX_NEW, stop_token_ids=(511,))
    )
    stop_id = int(free[0].token_ids[2])
    got = engine.generate(
        prompts, SamplingParams(temperature=0, max_new_tokens=MAX_NEW, stop_token_ids=(511, stop_id))
    )
    for f, g in zip(free, got):
        hits = np.flatnonzero(f.token_ids == stop_id)
        if len(hits):
            # Ends at the first stop token, which is kept in the ids and left out of the text.
            assert g.finish_reason == "stop"
            np.testing.assert_array_equal(g.token_ids, f.token_ids[: hits[0] + 1])
            assert g.text == processor.tokenizer.decode(f.token_ids[: hits[0]].tolist())
        else:
            assert g.finish_reason == "length"
            np.testing.assert_array_equal(g.token_ids, f.token_ids)
    assert got[0].finish_reason == "stop" and len(got[0].token_ids) <= 3


def test_deterministic_per_seed_and_bounded_compiles(setup):
    _, path, config, processor, prompts = setup
    engine = engine_for(path, config, processor, one_device())
    sampling = SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, seed=11)
    a = engine.generate(prompts[:2], sampling, n=2)
    b = engine.generate(prompts[:2], sampling, n=2)
    c = engine.generate(prompts[:2], SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, seed=12), n=2)
    assert all(np.array_equal(x.token_ids, y.token_ids) for x, y in zip(a, b))
    assert any(not np.array_equal(x.token_ids, y.token_ids) for x, y in zip(a, c))
    # Another temperature and prompt set of the same buckets reuse the compiled rollout.
    engine.generate(
        [prompts[1], prompts[0]], SamplingParams(temperature=0.5, max_new_tokens=MAX_NEW, seed=1), n=2
    )
    assert engine.compilations == 1


def _filtered_law(logits, temperature, top_p, top_k):
    """NumPy float64 reference: softmax(logits/T) restricted to top-k and the top-p nucleus."""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(len(p), bool)
    mass = 0.0
    for rank, v in enumerate(order):
        if (top_k > 0 and rank >= top_k) or (rank > 0 and mass >= top_p):
            break
        keep[v] = True
        mass += p[v]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize(
    "temperature,top_p,top_k", [(1.0, 1.0, -1), (0.7, 0.8, -1), (1.3, 1.0, 3), (0.9, 0.9, 4)]
)
def test_sampling_law_matches_expected_distribution(temperature, top_p, top_k):
    logits = np.array([2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0], np.float32)
    want = _filtered_law(logits, temperature, top_p, top_k)
    draws = 40_000
    batch = jnp.broadcast_to(jnp.asarray(logits), (draws, len(logits)))
    token, logp = jax.jit(sample_tokens, static_argnames=("greedy", "filtering"))(
        batch,
        jax.random.key(7),
        jnp.float32(temperature),
        jnp.float32(top_p),
        jnp.int32(top_k),
        greedy=False,
        filtering=top_p < 1 or top_k > 0,
    )
    counts = np.bincount(np.asarray(token), minlength=len(logits))
    assert counts[want == 0].sum() == 0  # filtered tokens are never drawn
    support = want > 0
    result = stats.chisquare(counts[support], draws * want[support])
    assert result.pvalue > 1e-3, (counts, draws * want)
    # Logprobs are of the unfiltered tempered distribution.
    z = logits.astype(np.float64) / temperature
    full = z - np.log(np.exp(z).sum())
    np.testing.assert_allclose(np.asarray(logp), full[np.asarray(token)], atol=1e-5)


def test_sampling_law_test_has_power():
    """The chi-square above would catch a temperature that is ignored."""
    logits = np.array([2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0], np.float32)
    token, _ = sample_tokens(
        jnp.broadcast_to(jnp.asarray(logits), (40_000, 8)),
        jax.random.key(7),
        jnp.float32(1.0),
        jnp.float32(1.0),
        jnp.int32(-1),
        greedy=False,
        filtering=False,
    )
    counts = np.bincount(np.asarray(token), minlength=8)
    assert stats.chisquare(counts, 40_000 * _filtered_law(logits, 0.7, 1.0, -1)).pvalue < 1e-6
