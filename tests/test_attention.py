"""The attention entry point: blockwise (flash) equals the dense reference, memory grows linearly in T,
and implementations that cannot run on this backend are config errors naming `model.attention`."""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr1.models import attention as attn


def _inputs(seed, b, tq, tk, h, kvh, d, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, tq, h, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, tk, kvh, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, tk, kvh, d)), dtype)
    return q, k, v


def _segments(b, t):
    """Row 0: left padding then one segment; row 1: two packed segments then right padding."""
    seg = np.zeros((b, t), np.int32)
    seg[0, : t // 7] = -1
    seg[1, t // 2 :] = 1
    seg[1, t - t // 9 :] = -1
    return jnp.asarray(seg)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])  # MHA and grouped-query
def test_blockwise_equals_xla_with_segments(causal, heads):
    h, kvh = heads
    q, k, v = _inputs(0, 2, 300, 300, h, kvh, 16)
    seg = _segments(2, 300)

    # Block sizes that do not divide T, and query blocks larger than key blocks, so the padding and the
    # causal block skipping are both exercised.
    def run(impl):
        return attn.attention(
            q, k, v, causal=causal, segment_ids=seg, implementation=impl, block_q=64, block_k=48
        )

    want, got = run("xla"), run("blockwise")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
    # Padding queries give zeros in both.
    assert np.all(np.asarray(got)[0, : 300 // 7] == 0)
    assert np.abs(np.asarray(want)).max() > 0.5


@pytest.mark.parametrize("causal", [False, True])
def test_blockwise_gradients_equal_xla(causal):
    q, k, v = _inputs(1, 2, 200, 200, 6, 2, 16)
    seg = _segments(2, 200)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(16,)), jnp.float32)

    def loss(impl):
        return lambda q, k, v: (
            attn.attention(
                q, k, v, causal=causal, segment_ids=seg, implementation=impl, block_q=32, block_k=64
            )
            * weights
        ).sum()

    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss("blockwise"), argnums=(0, 1, 2))(q, k, v)
    for name, w, g in zip("qkv", want, got):
        assert np.abs(np.asarray(w)).max() > 0.1, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=2e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("offset", [0, 37, 200])
def test_blockwise_cached_queries_with_offset(offset):
    """A cached forward: Tq queries at slots offset.. of a longer key sequence (the sampler's prefill)."""
    q, k, v = _inputs(3, 2, 90, 320, 4, 2, 16)
    kv_seg = _segments(2, 320)
    q_seg = jnp.zeros((2, 90), jnp.int32)

    def run(impl, off):
        return attn.attention(
            q,
            k,
            v,
            causal=True,
            q_segment_ids=q_seg,
            kv_segment_ids=kv_seg,
            q_offset=off,
            implementation=impl,
            block_q=32,
            block_k=64,
        )

    want = run("xla", offset)
    got = jax.jit(lambda off: run("blockwise", off))(jnp.int32(offset))  # a traced offset (cache index)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def test_blockwise_bf16_close_to_fp32_reference():
    q, k, v = _inputs(4, 1, 256, 256, 4, 2, 64, jnp.bfloat16)
    want = attn.attention(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True, implementation="xla")
    got = attn.attention(q, k, v, causal=True, implementation="blockwise", block_q=64, block_k=64)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=0, atol=3e-2)


def _temporaries(fn, *shapes):
    compiled = jax.jit(fn).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("grad", [False, True])
def test_blockwise_memory_grows_linearly_in_t(grad):
    """Compiled temporaries of causal attention (forward, or forward + backward) at T and 2T: blockwise
    grows <= 2.3x (linear), the dense path ~4x (quadratic), which shows the measurement can fail."""

    def program(impl):
        def fwd(q, k, v):
            return attn.attention(q, k, v, causal=True, implementation=impl, block_q=256, block_k=256)

        if not grad:
            return fwd
        return jax.grad(lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))

    def temps(impl, t):
        def s(heads):
            return jax.ShapeDtypeStruct((1, t, heads, 64), jnp.bfloat16)

        return _temporaries(program(impl), s(8), s(2), s(2))

    block = temps("blockwise", 4096), temps("blockwise", 8192)
    dense = temps("xla", 2048), temps("xla", 4096)
    assert block[1] <= 2.3 * block[0], block
    assert dense[1] >= 3.5 * dense[0], dense
    assert block[1] < dense[1] / 4


def test_auto_picks_by_backend():
    assert attn.resolve("auto", "cpu") == "blockwise"
    assert attn.resolve("auto", "gpu") == "cudnn"
    assert attn.resolve("auto", "tpu") == "splash"
    assert attn.resolve("xla", "tpu") == "xla"


@pytest.mark.parametrize(
    "name,backend", [("cudnn", "cpu"), ("splash", "cpu"), ("splash", "gpu"), ("flash", "cpu")]
)
def test_impossible_choice_names_the_config_key(name, backend):
    with pytest.raises(attn.AttentionConfigError, match="model.attention"):
        attn.check_implementation(name, backend)


@pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="cuDNN attention needs an NVIDIA GPU; this backend is " + jax.default_backend(),
)
def test_cudnn_equals_xla_on_gpu():
    q, k, v = _inputs(5, 2, 512, 512, 8, 2, 64, jnp.bfloat16)
    seg = _segments(2, 512)

    def run(impl):
        return attn.attention(q, k, v, causal=True, segment_ids=seg, implementation=impl)

    np.testing.assert_allclose(
        np.asarray(run("cudnn"), np.float32), np.asarray(run("xla"), np.float32), rtol=0, atol=2e-2
    )


def _tpu_python():
    """A Python with libtpu (whose compiler builds TPU programs on this host): this one, or PR1_TPU_PYTHON."""
    if importlib.util.find_spec("libtpu") is not None:
        return sys.executable
    return os.environ.get("PR1_TPU_PYTHON")


_SPLASH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, PartitionSpec as P, NamedSharding
from pr1.models import attention as attn
devices = list(topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices)
mesh = Mesh(np.array(devices).reshape(1, -1, 1), ("data", "fsdp", "tensor"))
b, t, h, kvh, d = len(devices), 1024, 28, 4, 128  # the 7B decoder's heads, one row per chip
sh = NamedSharding(mesh, P(("data", "fsdp")))
for causal in (True, False):
    # Under the mesh (as the jitted steps trace), splash shard_maps itself over the batch axes; with
    # the gradient, as the update step needs it.
    fwd = lambda q, k, v, s: attn.attention(q, k, v, causal=causal, segment_ids=s, implementation="splash")
    f = attn.in_mesh(jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2)), mesh)
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=sh) for shape, dtype in
            (((b, t, h, d), jnp.bfloat16), ((b, t, kvh, d), jnp.bfloat16), ((b, t, kvh, d), jnp.bfloat16),
             ((b, t), jnp.int32))]
    compiled = jax.jit(f).lower(*args).compile()
    text = compiled.as_text()
    print("causal" if causal else "full", "compiled", "splash" in text or "tpu_custom_call" in text)
"""


@pytest.mark.skipif(
    not _tpu_python(),
    reason="splash lowering needs libtpu's compiler: pip install libtpu (the "
    "version jax[tpu] pins) here, or set PR1_TPU_PYTHON to a Python that has it",
)
def test_splash_compiles_for_a_tpu_topology():
    """The splash path (segment ids, causal and full masks, GQA heads of the 7B decoder, forward and
    backward, sharded over a mesh's batch axes) lowers and compiles with libtpu for a v5p slice this
    host does not have."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run(
        [_tpu_python(), "-c", _SPLASH_SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "causal compiled True" in out.stdout and "full compiled True" in out.stdout, out.stdout


def _decode_inputs(seed, p=2, n=3, tp=11, m=20, h=6, kvh=2, d=8):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(p * n, 1, h, d)), jnp.float32)
    pk, pv = (jnp.asarray(rng.normal(size=(p, tp, kvh, d)), jnp.float32) for _ in range(2))
    seg = np.zeros((p, tp), np.int32)
    seg[1, :4] = -1  # prompt 1 is left-padded
    rk, rv = (jnp.asarray(rng.normal(size=(p * n, m, kvh, d)), jnp.float32) for _ in range(2))
    return q, pk, pv, jnp.asarray(seg), rk, rv


def _dense_decode_reference(q, pk, pv, seg, rk, rv, length, n):
    """Each sample's query against its prompt's keys repeated for it and its filled response slots."""
    keys = jnp.concatenate([jnp.repeat(pk, n, axis=0), rk[:, :length]], axis=1)
    values = jnp.concatenate([jnp.repeat(pv, n, axis=0), rv[:, :length]], axis=1)
    kv_seg = jnp.concatenate([jnp.repeat(seg, n, axis=0), jnp.zeros((rk.shape[0], length), jnp.int32)], 1)
    q_seg = jnp.zeros((q.shape[0], 1), jnp.int32)
    return attn.attention(
        q, keys, values, causal=False, q_segment_ids=q_seg, kv_segment_ids=kv_seg, implementation="xla"
    )


@pytest.mark.parametrize("length", [1, 6, 7, 13, 20])
@pytest.mark.parametrize("block", [None, 6, 7])  # 20 slots: blocks that do not divide the cache
def test_shared_prefix_decode_attention_equals_dense(length, block):
    q, pk, pv, seg, rk, rv = _decode_inputs(0)
    want = _dense_decode_reference(q, pk, pv, seg, rk, rv, length, n=3)
    fn = jax.jit(lambda *a: attn.shared_prefix_attention(*a, n=3, block=block))
    got = fn(q, pk, pv, seg, rk, rv, jnp.int32(length))  # a traced length: one program for every step
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length", [1, 6, 9])
def test_blockwise_decode_reads_only_the_filled_blocks(length):
    """Slots in blocks past the filled length are never read: NaN there leaves the output finite and
    equal to the reference (the dense path multiplies them by zero weights, so NaN would show)."""
    q, pk, pv, seg, rk, rv = _decode_inputs(1)
    block = 6
    first_unread = -(-length // block) * block
    poison = lambda x: x.at[:, first_unread:].set(jnp.nan)  # noqa: E731
    got = attn.shared_prefix_attention(q, pk, pv, seg, poison(rk), poison(rv), length, n=3, block=block)
    want = _dense_decode_reference(q, pk, pv, seg, rk, rv, length, n=3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    dense = attn.shared_prefix_attention(q, pk, pv, seg, poison(rk), poison(rv), length, n=3)
    assert np.isnan(np.asarray(dense)).any()  # the poison is real: a full read sees it


def _runs(b, t):
    """One real run per row: right padding, left padding, both, none, and a row of padding only."""
    seg = np.full((b, t), -1, np.int32)
    for row, (start, end) in enumerate([(0, t - 5), (7, t), (3, t - 9), (0, t), (0, 0)][:b]):
        seg[row, start:end] = 0
    return jnp.asarray(seg)


def test_cudnn_arguments_pass_lengths_for_contiguous_rows_and_a_mask_otherwise():
    """The dispatch of the cudnn path, checked on CPU by calling the argument builder directly (the
    cuDNN kernel itself needs an NVIDIA GPU and is not run here)."""
    q, k, v = _inputs(7, 5, 40, 40, 4, 2, 8)
    seg = _runs(5, 40)
    q2, k2, v2, kwargs, restore = attn.cudnn_arguments(q, k, v, seg, seg, True, 0, True)
    assert set(kwargs) == {"is_causal", "query_seq_lengths", "key_value_seq_lengths"} and kwargs["is_causal"]
    np.testing.assert_array_equal(kwargs["query_seq_lengths"], [35, 33, 28, 40, 0])
    np.testing.assert_array_equal(kwargs["key_value_seq_lengths"], kwargs["query_seq_lengths"])
    # Each row's real run now starts at slot 0 (row 1 had 7 slots of left padding), and restore undoes it.
    np.testing.assert_array_equal(k2[1, :33], k[1, 7:])
    np.testing.assert_array_equal(q2[2, :28], q[2, 3:31])
    np.testing.assert_array_equal(restore(q2), q)
    # Segments, a cached step (offset, or a traced one) or no promise of contiguity: a dense mask.
    for args in [
        (seg, seg, True, 0, False),  # not promised contiguous
        (seg, seg, True, 5, True),  # cached: queries are not the keys' own positions
    ]:
        *_, kwargs, restore = attn.cudnn_arguments(q, k, v, *args)
        assert set(kwargs) == {"mask"} and kwargs["mask"].shape == (5, 1, 40, 40)
        assert restore(q) is q
    kinds = []  # a traced offset (a cache index) cannot be known to be 0: a mask
    jax.jit(lambda off: kinds.append(set(attn.cudnn_arguments(q, k, v, seg, seg, True, off, True)[3])))(0)
    assert kinds == [{"mask"}]
    q_short = q[:, :20]
    *_, kwargs, _ = attn.cudnn_arguments(q_short, k, v, seg[:, :20], seg, False, 0, True)
    assert set(kwargs) == {"mask"}  # Tq != Tk


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("contiguous", [False, True])
def test_cudnn_arguments_give_the_reference_attention_through_jax_xla(causal, contiguous):
    """The same arguments through jax.nn.dot_product_attention's XLA implementation (which takes the
    lengths too) equal our dense reference: rotation, lengths and masks mean what they should."""
    q, k, v = _inputs(8, 5, 40, 40, 6, 2, 8)
    seg = _runs(5, 40)
    want = attn.attention(q, k, v, causal=causal, segment_ids=seg, implementation="xla")
    got = attn._cudnn(q, k, v, seg, seg, causal, 0, contiguous, implementation="xla")
    real = np.asarray(seg >= 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[~real], 0)
