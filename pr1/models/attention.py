"""The one attention entry point of the vision tower, the decoder and the sampler.

    attention(q, k, v, *, causal, q_segment_ids, kv_segment_ids, q_offset, implementation)

q [B, Tq, H, D], k/v [B, Tk, KVH, D] (grouped-query: H is a multiple of KVH; K/V are never repeated).
Query i may attend key j iff
  - q_segment_ids[b, i] == kv_segment_ids[b, j] and q_segment_ids[b, i] >= 0 (segment id -1 marks
    padding: a padding query attends nothing and yields zeros, a padding key is attended by nothing);
  - and, if `causal`, j <= q_offset + i (query i sits at slot q_offset + i of the key sequence: 0 for
    a full sequence, the cache index for a cached forward).
Missing segment ids mean "one segment, no padding".

Implementations (`model.attention` in the training config, `Qwen25VLConfig.attention` in the model):
  xla        the dense reference (`layers.dot_product_attention`): a [B, H, Tq, Tk] fp32 score array;
             for tiny shapes, decode steps (Tq = 1) and parity.
  blockwise  pure-JAX flash attention: query blocks × key blocks with an online softmax in fp32 and
             a hand-written backward that recomputes the blocks, so neither pass holds more than one
             [B, H, block_q, block_k] score block per step and memory grows linearly in T. Causal
             masks skip the key blocks above the diagonal. Runs everywhere; the CPU path and fallback.
  cudnn      jax.nn.dot_product_attention(implementation="cudnn") (NVIDIA GPUs). cuDNN takes sequence
             lengths (padding at the end), not segments: with `contiguous=True` (each row's real tokens
             one run of one segment, padding only before and/or after it, as the learner's rows and
             left-padded prompts are) the rows are rotated so the run starts at slot 0 and lengths are
             passed; otherwise segment ids become a dense [B, 1, Tq, Tk] bool mask (`cudnn_arguments`).
  splash     the Pallas TPU splash-attention kernel with segment ids (TPU only); GQA through its MQA
             kernel vmapped over the KV heads. Needs Tq, Tk multiples of 128 and a static q_offset.
  auto       splash on TPU, cudnn on GPU, otherwise blockwise.
'auto', 'cudnn' and 'splash' use xla for fewer than 128 queries or keys (a decode step, a tiny test
model), where dense is cheapest and the kernels' tiling does not apply; an explicit 'blockwise' is
blockwise at every length (so tiny parity tests exercise it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pr1.models.layers import dot_product_attention

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")
_BACKENDS = {"cudnn": ("gpu", "cuda"), "splash": ("tpu",)}
# Below this many queries a dense pass is cheaper than any kernel launch or block loop.
_DENSE_BELOW = 128
# Default block sizes of the blockwise path (module attributes so tests can shrink them and make tiny
# models run through several blocks).
BLOCK_Q = 512
BLOCK_K = 512
# Response-cache slots per key block of a blockwise decode step (`shared_prefix_attention`): a step
# reads only the blocks that hold filled slots.
DECODE_BLOCK = 256


class AttentionConfigError(ValueError):
    """An attention implementation that cannot run on this backend; the message names `model.attention`."""


def check_implementation(name: str, backend: str | None = None) -> None:
    """Raise AttentionConfigError naming `model.attention` if `name` is unknown, or cannot run on
    `backend` (jax's platform name; None: only the name is checked, e.g. when planning for elsewhere)."""
    if name not in IMPLEMENTATIONS:
        raise AttentionConfigError(f"model.attention: must be one of {IMPLEMENTATIONS}, got {name!r}")
    if backend is not None and name in _BACKENDS and backend not in _BACKENDS[name]:
        raise AttentionConfigError(
            f"model.attention: {name!r} needs a {'/'.join(_BACKENDS[name])} backend, this one "
            f"is {backend!r}; use 'auto', 'blockwise' or 'xla'"
        )


def resolve(name: str, backend: str | None = None) -> str:
    """The concrete implementation `name` stands for: 'auto' picks by `backend` (default: jax's), any
    other name is itself. Whether it can run there is `check_implementation`'s job (config validation),
    not checked here, so a program can be compiled for a TPU topology from a CPU host."""
    if name not in IMPLEMENTATIONS:
        raise AttentionConfigError(f"model.attention: must be one of {IMPLEMENTATIONS}, got {name!r}")
    if name != "auto":
        return name
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "splash"
    if backend in ("gpu", "cuda"):
        return "cudnn"
    return "blockwise"


def attention(
    q,
    k,
    v,
    *,
    causal: bool,
    q_segment_ids=None,
    kv_segment_ids=None,
    segment_ids=None,
    q_offset=0,
    implementation: str = "xla",
    block_q: int | None = None,
    block_k: int | None = None,
    contiguous: bool = False,
):
    """Softmax attention [B, Tq, H, D]; see the module docstring for the mask and the implementations.

    `segment_ids` sets both q_ and kv_segment_ids (self-attention). Softmax and accumulation run in
    fp32 whatever the input dtype; the output has q's dtype. `contiguous`: the caller promises that
    every row's real tokens are one run of segment 0 (padding -1 only before and after it) with the
    same layout for queries and keys; the cudnn path then passes sequence lengths instead of a mask.
    """
    if segment_ids is not None:
        q_segment_ids = kv_segment_ids = segment_ids
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    if h % kvh:
        raise ValueError(f"{h} query heads are not a multiple of {kvh} key/value heads")
    impl = resolve(implementation)
    short = tq < _DENSE_BELOW or tk < _DENSE_BELOW
    if short and (implementation == "auto" or impl in ("cudnn", "splash")):
        impl = "xla"
    if q_segment_ids is None:
        q_segment_ids = jnp.zeros((b, tq), jnp.int32)
    if kv_segment_ids is None:
        kv_segment_ids = jnp.zeros((b, tk), jnp.int32)
    q_segment_ids = jnp.asarray(q_segment_ids, jnp.int32)
    kv_segment_ids = jnp.asarray(kv_segment_ids, jnp.int32)
    if impl == "xla":
        return dot_product_attention(
            q, k, v, _allowed(q_segment_ids, kv_segment_ids, causal, q_offset, tq, tk)
        )
    if impl == "blockwise":
        return blockwise_attention(
            q,
            k,
            v,
            q_segment_ids,
            kv_segment_ids,
            jnp.asarray(q_offset, jnp.int32),
            causal=causal,
            block_q=min(block_q or BLOCK_Q, _round_up(tq, 8)),
            block_k=min(block_k or BLOCK_K, _round_up(tk, 8)),
        )
    if impl == "cudnn":
        return _cudnn(q, k, v, q_segment_ids, kv_segment_ids, causal, q_offset, contiguous)
    return _splash(q, k, v, q_segment_ids, kv_segment_ids, causal, q_offset)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _allowed(q_seg, kv_seg, causal, q_offset, tq, tk):
    """The dense [B, Tq, Tk] mask (xla and cudnn paths only)."""
    allowed = (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] >= 0)
    if causal:
        allowed = allowed & (jnp.arange(tk)[None, None, :] <= (q_offset + jnp.arange(tq))[None, :, None])
    return allowed


# -- blockwise (flash) attention in pure JAX -------------------------------------------------------


def blockwise_attention(
    q, k, v, q_seg, kv_seg, q_offset, *, causal: bool, block_q: int = 512, block_k: int = 512
):
    """Flash attention without a [Tq, Tk] array (see the module docstring); arguments as `attention`'s,
    segment ids required, q_offset an int32 scalar (may be traced)."""
    tq, tk = q.shape[1], k.shape[1]
    nq, nk = -(-tq // block_q), -(-tk // block_k)
    pad_q, pad_k = nq * block_q - tq, nk * block_k - tk
    # Padding queries/keys get segment -1: never attend, never attended; sliced off at the end.
    qp = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
    kp = jnp.pad(k, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
    qs = jnp.pad(q_seg, ((0, 0), (0, pad_q)), constant_values=-1)
    ks = jnp.pad(kv_seg, ((0, 0), (0, pad_k)), constant_values=-1)
    out = _flash(qp, kp, vp, qs, ks, q_offset, causal, block_q, block_k)
    return out[:, :tq]


def _blocks(x, n, size):
    """[B, n·size, ...] → [n, B, size, ...]."""
    return jnp.moveaxis(x.reshape((x.shape[0], n, size) + x.shape[2:]), 1, 0)


def _unblocks(x):
    """[n, B, size, ...] → [B, n·size, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def _key_block_range(i, causal, q_offset, block_q, block_k, nk):
    """Key blocks [0, hi) that query block i can see (all of them without a causal mask)."""
    if not causal:
        return nk
    last_query = q_offset + (i + 1) * block_q - 1
    return jnp.clip(last_query // block_k + 1, 0, nk)


def _mask(qs_blk, ks_blk, causal, q_offset, i, j, block_q, block_k):
    """[B, bq, bk] bool mask of query block i against key block j."""
    m = (qs_blk[:, :, None] == ks_blk[:, None, :]) & (qs_blk[:, :, None] >= 0)
    if causal:
        qpos = q_offset + i * block_q + jnp.arange(block_q)
        kpos = j * block_k + jnp.arange(block_k)
        m = m & (kpos[None, None, :] <= qpos[None, :, None])
    return m


def _scores(q_blk, k_blk, scale):
    """q [B, bq, KVH, G, D] · k [B, bk, KVH, D] → fp32 [B, KVH, G, bq, bk]."""
    return jnp.einsum("bqhgd,bkhd->bhgqk", q_blk, k_blk, preferred_element_type=jnp.float32) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q, k, v, q_seg, kv_seg, q_offset, causal, block_q, block_k):
    return _flash_fwd(q, k, v, q_seg, kv_seg, q_offset, causal, block_q, block_k)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, q_offset, causal, block_q, block_k):
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    nq, nk = tq // block_q, tk // block_k
    scale = d**-0.5
    qb = _blocks(q.reshape(b, tq, kvh, g, d), nq, block_q)
    kb, vb = _blocks(k, nk, block_k), _blocks(v, nk, block_k)
    qsb, ksb = _blocks(q_seg, nq, block_q), _blocks(kv_seg, nk, block_k)

    def per_query_block(args):
        i, q_blk, qs_blk = args

        def step(j, carry):
            m_prev, l_prev, acc = carry
            k_blk, v_blk, ks_blk = kb[j], vb[j], ksb[j]
            mask = _mask(qs_blk, ks_blk, causal, q_offset, i, j, block_q, block_k)[:, None, None]
            s = jnp.where(mask, _scores(q_blk, k_blk, scale), -jnp.inf)
            m_new = jnp.maximum(m_prev, s.max(-1))
            # A row with nothing allowed so far keeps m = -inf; shift by 0 there so no inf - inf.
            shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - shift[..., None])
            corr = jnp.exp(jnp.where(jnp.isfinite(m_prev), m_prev, 0.0) - shift)
            l_new = l_prev * corr + p.sum(-1)
            acc = acc * corr[..., None] + jnp.einsum(
                "bhgqk,bkhd->bhgqd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32
            )
            return m_new, l_new, acc

        init = (
            jnp.full((b, kvh, g, block_q), -jnp.inf, jnp.float32),
            jnp.zeros((b, kvh, g, block_q), jnp.float32),
            jnp.zeros((b, kvh, g, block_q, d), jnp.float32),
        )
        hi = _key_block_range(i, causal, q_offset, block_q, block_k, nk)
        m, total, acc = jax.lax.fori_loop(0, hi, step, init)
        out = acc / jnp.where(total > 0, total, 1.0)[..., None]
        # Rows that attend nothing: output 0, lse +inf (their probabilities are exp(s - inf) = 0).
        lse = jnp.where(total > 0, m + jnp.log(jnp.where(total > 0, total, 1.0)), jnp.inf)
        return out, lse

    out, lse = jax.lax.map(per_query_block, (jnp.arange(nq), qb, qsb))
    # out [nq, B, KVH, G, bq, D] → [B, Tq, H, D]; lse [nq, B, KVH, G, bq]
    out = jnp.moveaxis(out, 4, 2).reshape(nq, b, block_q, h, d)
    out = _unblocks(out).astype(q.dtype)
    return out, (q, k, v, q_seg, kv_seg, q_offset, out, lse)


def _flash_bwd(causal, block_q, block_k, res, dout):
    q, k, v, q_seg, kv_seg, q_offset, out, lse = res
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    nq, nk = tq // block_q, tk // block_k
    scale = d**-0.5
    q5 = q.reshape(b, tq, kvh, g, d)
    do5 = dout.reshape(b, tq, kvh, g, d)
    # delta_i = sum_d dout·out: the softmax backward's row term, [B, KVH, G, Tq] in fp32.
    delta = jnp.einsum(
        "bqhgd,bqhgd->bhgq", do5.astype(jnp.float32), out.reshape(b, tq, kvh, g, d).astype(jnp.float32)
    )
    qb, dob = _blocks(q5, nq, block_q), _blocks(do5, nq, block_q)
    kb, vb = _blocks(k, nk, block_k), _blocks(v, nk, block_k)
    qsb, ksb = _blocks(q_seg, nq, block_q), _blocks(kv_seg, nk, block_k)
    # lse is [nq, B, KVH, G, bq] from the forward; delta [B, KVH, G, Tq] goes to the same blocks.
    lseb = lse
    deltab = jnp.moveaxis(delta.reshape(b, kvh, g, nq, block_q), 3, 0)

    def probs(i, j, q_blk, k_blk, qs_blk, ks_blk):
        mask = _mask(qs_blk, ks_blk, causal, q_offset, i, j, block_q, block_k)[:, None, None]
        s = _scores(q_blk, k_blk, scale)
        return jnp.where(mask, jnp.exp(s - lseb[i][..., None]), 0.0)

    def dq_block(args):
        i, q_blk, do_blk, qs_blk = args

        def step(j, dq):
            k_blk, v_blk = kb[j], vb[j]
            p = probs(i, j, q_blk, k_blk, qs_blk, ksb[j])
            dp = jnp.einsum("bqhgd,bkhd->bhgqk", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = p * (dp - deltab[i][..., None])
            return (
                dq
                + jnp.einsum(
                    "bhgqk,bkhd->bqhgd", ds.astype(k_blk.dtype), k_blk, preferred_element_type=jnp.float32
                )
                * scale
            )

        hi = _key_block_range(i, causal, q_offset, block_q, block_k, nk)
        return jax.lax.fori_loop(0, hi, step, jnp.zeros((b, block_q, kvh, g, d), jnp.float32))

    dq = jax.lax.map(dq_block, (jnp.arange(nq), qb, dob, qsb))
    dq = _unblocks(dq).reshape(b, tq, h, d).astype(q.dtype)

    def dkv_block(args):
        j, k_blk, v_blk, ks_blk = args

        def step(i, carry):
            dk, dv = carry
            q_blk, do_blk = qb[i], dob[i]
            p = probs(i, j, q_blk, k_blk, qsb[i], ks_blk)
            dv = dv + jnp.einsum(
                "bhgqk,bqhgd->bkhd", p.astype(do_blk.dtype), do_blk, preferred_element_type=jnp.float32
            )
            dp = jnp.einsum("bqhgd,bkhd->bhgqk", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = p * (dp - deltab[i][..., None])
            dk = (
                dk
                + jnp.einsum(
                    "bhgqk,bqhgd->bkhd", ds.astype(q_blk.dtype), q_blk, preferred_element_type=jnp.float32
                )
                * scale
            )
            return dk, dv

        lo = 0 if not causal else jnp.clip((j * block_k - q_offset) // block_q, 0, nq)
        zeros = jnp.zeros((b, block_k, kvh, d), jnp.float32)
        return jax.lax.fori_loop(lo, nq, step, (zeros, zeros))

    dk, dv = jax.lax.map(dkv_block, (jnp.arange(nk), kb, vb, ksb))
    dk, dv = _unblocks(dk).astype(k.dtype), _unblocks(dv).astype(v.dtype)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# -- backend kernels -------------------------------------------------------------------------------


def cudnn_arguments(q, k, v, q_seg, kv_seg, causal, q_offset, contiguous):
    """(q, k, v, keyword arguments of jax.nn.dot_product_attention, restore) for the cudnn path.

    Sequence lengths, no mask, when `contiguous` (see `attention`) and the queries are the keys'
    own positions (q_offset 0 and Tq == Tk, i.e. not a cached step): each row is rotated left by
    its leading padding, so its real run [start, start + length) moves to [0, length) and the
    padding is all at the end; causal order within the run is unchanged (positions are already in
    q and k through RoPE). `restore` rotates the output back. Otherwise a dense bool mask from the
    segment ids (cuDNN has no segments and no left padding) and `restore` is the identity.
    """
    tq, tk = q.shape[1], k.shape[1]
    static_zero = not isinstance(q_offset, jax.core.Tracer) and int(q_offset) == 0
    if contiguous and static_zero and tq == tk:
        real = kv_seg >= 0
        length = real.sum(axis=1).astype(jnp.int32)
        start = jnp.where(length > 0, jnp.argmax(real, axis=1), 0).astype(jnp.int32)
        slots = (jnp.arange(tk)[None, :] + start[:, None]) % tk  # [B, T]: new slot i holds old slot i+start

        def rotate(x):
            return jnp.take_along_axis(x, slots[:, :, None, None], axis=1)

        def restore(out):
            back = (jnp.arange(tk)[None, :] - start[:, None]) % tk
            return jnp.take_along_axis(out, back[:, :, None, None], axis=1)

        kwargs = dict(is_causal=causal, query_seq_lengths=length, key_value_seq_lengths=length)
        return rotate(q), rotate(k), rotate(v), kwargs, restore
    mask = _allowed(q_seg, kv_seg, causal, q_offset, tq, tk)[:, None]
    return q, k, v, dict(mask=mask), lambda out: out


def _cudnn(q, k, v, q_seg, kv_seg, causal, q_offset, contiguous=False, implementation="cudnn"):
    """cuDNN flash attention with the arguments `cudnn_arguments` picks; padding queries give zeros.
    (`implementation` is a parameter so the same code runs through jax's xla path in CPU tests.)"""
    q2, k2, v2, kwargs, restore = cudnn_arguments(q, k, v, q_seg, kv_seg, causal, q_offset, contiguous)
    out = restore(jax.nn.dot_product_attention(q2, k2, v2, implementation=implementation, **kwargs))
    return jnp.where((q_seg >= 0)[:, :, None, None], out, 0).astype(q.dtype)


def _splash(q, k, v, q_seg, kv_seg, causal, q_offset):
    """Pallas TPU splash attention, GQA as the MQA kernel vmapped over KV heads, vmapped over the batch.

    A Mosaic kernel cannot be partitioned by the compiler, so under a mesh (`in_mesh`, which the
    jitted steps and the sampler set) it runs in a shard_map over the batch axes: every device
    attends its own rows."""
    if isinstance(q_offset, jax.core.Tracer):
        raise ValueError(
            "model.attention='splash' needs a static q_offset (use xla/blockwise for cached steps)"
        )
    if q.shape[1] % 128 or k.shape[1] % 128:
        raise ValueError(
            "model.attention='splash' needs lengths that are multiples of 128, got "
            f"{q.shape[1]} x {k.shape[1]}"
        )
    local = functools.partial(_splash_local, causal=causal, q_offset=int(q_offset))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return local(q, k, v, q_seg, kv_seg)
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    if q.shape[0] % max(1, int(np.prod([mesh.shape[a] for a in axes]))):
        raise ValueError(f"model.attention='splash': {q.shape[0]} rows do not divide over mesh axes {axes}")
    spec = jax.sharding.PartitionSpec(axes or None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec, check_vma=False)(
        q, k, v, q_seg, kv_seg
    )


def _splash_local(q, k, v, q_seg, kv_seg, *, causal, q_offset):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    mask = sm.CausalMask((tq, tk), offset=q_offset) if causal else sm.FullMask((tq, tk))
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([mask] * g))
    qh = (
        (q * jnp.asarray(d**-0.5, q.dtype)).reshape(b, tq, kvh, g, d).transpose(0, 2, 3, 1, 4)
    )  # [B, KVH, G, Tq, D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KVH, Tk, D]

    def one(qr, kr, vr, qs, ks):
        seg = sk.SegmentIds(q=qs, kv=ks)
        return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=seg))(qr, kr, vr)

    out = jax.vmap(one)(qh, kh, vh, q_seg, kv_seg)  # [B, KVH, G, Tq, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, tq, h, d)
    return jnp.where((q_seg >= 0)[:, :, None, None], out, 0).astype(q.dtype)


def in_mesh(fn, mesh):
    """`fn` traced with `mesh` as the abstract mesh, so kernels that must run per device (splash) can
    shard_map themselves over its batch axes."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


# -- decoding with a prompt shared by n samples ----------------------------------------------------


def shared_prefix_attention(
    q,
    prompt_k,
    prompt_v,
    prompt_segment_ids,
    response_k,
    response_v,
    response_length,
    *,
    n: int,
    block: int | None = None,
):
    """One decode query per sample against its prompt's keys (shared by the prompt's n samples, never
    repeated) and its own response keys, under a single fp32 softmax.

    q [P·n, 1, H, D] (rows p·n .. p·n+n-1 are prompt p's samples); prompt_k/v [P, Tp, KVH, D] with
    prompt_segment_ids [P, Tp] (-1 padding); response_k/v [P·n, M, KVH, D], of which the first
    `response_length` slots (an int32 scalar, may be traced) are filled.

    `block` None: dense, scores [P·n, H, Tp + M] over every response slot. `block` b: the response
    cache is read in key blocks of b slots with an online softmax, and only the ceil(length / b)
    blocks that hold filled slots are read (a loop of traced length over a static cache shape), so
    a step early in a long response costs the prompt plus one block, not the whole cache.
    """
    rows, _, h, d = q.shape
    p, kvh = prompt_k.shape[0], prompt_k.shape[2]
    m_slots = response_k.shape[1]
    g = h // kvh
    scale = d**-0.5
    qg = q.reshape(p, n, kvh, g, d)
    length = jnp.asarray(response_length, jnp.int32)
    s_p = (
        jnp.einsum("pnhgd,pkhd->pnhgk", qg, prompt_k.astype(q.dtype), preferred_element_type=jnp.float32)
        * scale
    )
    s_p = jnp.where((prompt_segment_ids >= 0)[:, None, None, None, :], s_p, -jnp.inf)
    response_k = response_k.reshape(p, n, m_slots, kvh, d)
    response_v = response_v.reshape(p, n, m_slots, kvh, d)

    def response_scores(k_blk):
        return (
            jnp.einsum("pnhgd,pnkhd->pnhgk", qg, k_blk.astype(q.dtype), preferred_element_type=jnp.float32)
            * scale
        )

    def weighted(e, v_blk):
        return jnp.einsum(
            "pnhgk,pnkhd->pnhgd", e.astype(q.dtype), v_blk.astype(q.dtype), preferred_element_type=jnp.float32
        )

    if block is None or block >= m_slots:
        s_r = jnp.where(jnp.arange(m_slots) < length, response_scores(response_k), -jnp.inf)
        m = jnp.maximum(s_p.max(-1), s_r.max(-1))
        m = jnp.where(jnp.isfinite(m), m, 0.0)[..., None]
        e_p, e_r = jnp.exp(s_p - m), jnp.exp(s_r - m)
        denom = e_p.sum(-1) + e_r.sum(-1)
        out = jnp.einsum(
            "pnhgk,pkhd->pnhgd",
            e_p.astype(q.dtype),
            prompt_v.astype(q.dtype),
            preferred_element_type=jnp.float32,
        ) + weighted(e_r, response_v)
    else:
        # Online softmax: the prompt's scores start it, then each filled response block joins.
        m = s_p.max(-1)
        shift = jnp.where(jnp.isfinite(m), m, 0.0)
        e_p = jnp.exp(s_p - shift[..., None])
        denom = e_p.sum(-1)
        acc = jnp.einsum(
            "pnhgk,pkhd->pnhgd",
            e_p.astype(q.dtype),
            prompt_v.astype(q.dtype),
            preferred_element_type=jnp.float32,
        )

        def step(j, carry):
            m_prev, denom, acc = carry
            # The last block may overhang the cache: its start is pulled back to fit (dynamic_slice
            # would clamp it anyway) and the slots an earlier block already covered are masked.
            start = jnp.minimum(j * block, m_slots - block)
            slots = start + jnp.arange(block)
            keep = (slots >= j * block) & (slots < length)
            k_blk = jax.lax.dynamic_slice_in_dim(response_k, start, block, axis=2)
            v_blk = jax.lax.dynamic_slice_in_dim(response_v, start, block, axis=2)
            s = jnp.where(keep, response_scores(k_blk), -jnp.inf)
            m_new = jnp.maximum(m_prev, s.max(-1))
            shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            corr = jnp.exp(jnp.where(jnp.isfinite(m_prev), m_prev, 0.0) - shift)
            e = jnp.exp(s - shift[..., None])
            return m_new, denom * corr + e.sum(-1), acc * corr[..., None] + weighted(e, v_blk)

        filled_blocks = jnp.clip((length + block - 1) // block, 0, -(-m_slots // block))
        _, denom, out = jax.lax.fori_loop(0, filled_blocks, step, (m, denom, acc))
    out = out / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out.reshape(rows, 1, h, d).astype(q.dtype)
