"""GRPO math against golden values: hand-computed for tiny inputs, NumPy float64 re-derivations
from the formulas otherwise (the functions under test never produce their own expected values)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pr1.rl import grpo

MODES = grpo.LOSS_AGG_MODES
CLIP = dict(clip_low=0.2, clip_high=0.3, dual_clip=3.0)
CHUNK = 2  # responses per chunk of "chunk-token-mean" in the mode-parametrized tests


def mode_kw(mode):
    return {"chunk_responses": CHUNK} if mode == "chunk-token-mean" else {}


# ----------------------------------------------------------------------------------------------
# NumPy float64 references, written from the formulas in the paper / verl, not from pr1.


def np_policy_loss(logp, old, adv_tok, cl=0.2, ch=0.3, c=3.0):
    r = np.exp(logp - old)
    pg1 = -adv_tok * r
    pg2 = -adv_tok * np.clip(r, 1 - cl, 1 + ch)
    loss = np.maximum(pg1, pg2)
    if c is not None:
        loss = np.where(adv_tok < 0, np.minimum(loss, -adv_tok * c), loss)
    return loss


def np_aggregate(loss, mask, mode, n_tok=None, n_seq=None, horizon=None):
    m = mask.astype(bool)
    loss = np.where(m, loss, 0.0)
    lens = m.sum(-1)
    if n_seq is None:
        n_seq = (lens > 0).sum()
    if mode == "token-mean":
        return loss.sum() / (m.sum() if n_tok is None else n_tok)
    if mode == "seq-mean-token-mean":
        return sum(loss[b].sum() / lens[b] for b in range(len(lens)) if lens[b] > 0) / n_seq
    if mode == "chunk-token-mean":
        # The release: each micro-batch of CHUNK responses takes its own token-mean; then the mean.
        means = [
            loss[i : i + CHUNK].sum() / lens[i : i + CHUNK].sum()
            for i in range(0, len(lens), CHUNK)
            if lens[i : i + CHUNK].sum() > 0
        ]
        return sum(means) / len(means)
    return loss.sum() / (n_seq * (mask.shape[-1] if horizon is None else horizon))


def np_k3(logp, ref):
    x = ref - logp
    return np.clip(np.exp(x) - x - 1, -10, 10)


def random_batch(seed, b=8, t=6, lengths=None):
    rng = np.random.default_rng(seed)
    old = -rng.uniform(0.1, 3.0, (b, t))
    # log-ratios up to +-0.6 so all of: unclipped, low clip, high clip and (with A < 0) ratios
    # above 1.3 occur; ratios > 3 for the dual clip are planted explicitly.
    logp = old + rng.uniform(-0.6, 0.6, (b, t))
    logp[0, 0] = old[0, 0] + math.log(4.0)
    adv = rng.normal(size=b)
    adv[0] = -1.5
    if lengths is None:
        lengths = rng.integers(1, t + 1, size=b)
    mask = (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
    ref = logp + rng.normal(scale=0.3, size=(b, t))
    rollout = old + rng.normal(scale=0.4, size=(b, t))
    return dict(logp=logp, old=old, adv=adv, mask=mask, ref=ref, rollout=rollout)


def close(a, b, tol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------
# Advantages


def test_group_advantages_hand_values():
    rewards = np.array([1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5, 0, 0, 0, 1], np.float32)
    adv = grpo.group_advantages(rewards, 4)
    assert adv.dtype == jnp.float32 and adv.shape == (12,)
    # Group 1: mean .5, unbiased var = 4 * .25 / 3 = 1/3 -> A = +-.5 / (1/sqrt 3 + 1e-6) ~ +-sqrt(3)/2.
    # (The biased std, .5, would give +-1: this pins ddof=1.)
    h = 0.5 / (1 / math.sqrt(3) + 1e-6)
    # Group 2: all equal -> std 0 -> A = 0 / 1e-6 = 0.
    # Group 3: mean .25, deviations (-.25,-.25,-.25,.75), unbiased var = (3/16 + 9/16) / 3 = 1/4,
    # std .5 -> A = (-.5, -.5, -.5, 1.5) up to the eps.
    s = 0.5 + 1e-6
    expected = [h, -h, -h, h, 0, 0, 0, 0, -0.25 / s, -0.25 / s, -0.25 / s, 0.75 / s]
    close(adv, expected)
    assert abs(float(adv[0]) - 1.0) > 0.1
    close(grpo.zero_std_fraction(rewards, 4), 1 / 3)


def test_group_advantages_numpy_reference_and_dr_grpo():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(5, 8))
    ref = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, ddof=1, keepdims=True) + 1e-6)
    close(grpo.group_advantages(rewards.reshape(-1), 8), ref.reshape(-1), tol=1e-5)
    # Group of two: [1, 0] -> std = sqrt(.5) -> A = +-.5 / sqrt(.5) = +-1/sqrt 2.
    a2 = 0.5 / (math.sqrt(0.5) + 1e-6)
    close(grpo.group_advantages(np.array([1.0, 0.0]), 2), [a2, -a2])
    # Dr.GRPO: only the mean is removed.
    r = np.array([1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5, 0, 0, 0, 1])
    close(
        grpo.group_advantages(r, 4, scale_by_std=False),
        [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.25, -0.25, -0.25, 0.75],
    )
    # Integer / bool rewards, under jit, come back float32.
    f = jax.jit(functools.partial(grpo.group_advantages, group_size=2))
    out = f(jnp.array([True, False, True, True]))
    assert out.dtype == jnp.float32
    close(out, [a2, -a2, 0, 0])
    close(grpo.zero_std_fraction(np.array([1, 1, 0, 1, 2, 2]), 2), 2 / 3)


@pytest.mark.parametrize("n,g", [(10, 4), (4, 1), (4, 0)])
def test_group_advantages_bad_group_size(n, g):
    with pytest.raises(ValueError, match="group_size"):
        grpo.group_advantages(np.zeros(n), g)
    with pytest.raises(ValueError, match="group_size"):
        grpo.zero_std_fraction(np.zeros(n), g)


def test_group_advantages_rejects_2d():
    with pytest.raises(ValueError, match="1-D"):
        grpo.group_advantages(np.zeros((2, 4)), 4)


# ----------------------------------------------------------------------------------------------
# Log-probabilities and entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_and_entropy_match_torch(temperature):
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(2, 5))
    lsm = torch.log_softmax(torch.tensor(logits, dtype=torch.float64) / temperature, dim=-1)
    want_lp = lsm.gather(-1, torch.tensor(targets)[..., None])[..., 0].numpy()
    want_ent = -(lsm.exp() * lsm).sum(-1).numpy()
    lp = grpo.token_logprobs(logits, targets, temperature)
    ent = grpo.token_entropy(logits, temperature)
    assert lp.dtype == ent.dtype == jnp.float32 and lp.shape == ent.shape == (2, 5)
    close(lp, want_lp, tol=2e-5)
    close(ent, want_ent, tol=2e-5)
    # bf16 logits are upcast before the softmax: same as scoring the upcast values.
    bf = jnp.asarray(logits, jnp.bfloat16)
    up = np.asarray(bf.astype(jnp.float32))
    lsm_bf = torch.log_softmax(torch.tensor(up, dtype=torch.float64) / temperature, dim=-1)
    close(
        grpo.token_logprobs(bf, targets, temperature),
        lsm_bf.gather(-1, torch.tensor(targets)[..., None])[..., 0].numpy(),
        tol=2e-5,
    )


def test_entropy_with_masked_vocab_is_finite():
    # Two live entries with equal logits, one masked with -inf: H = ln 2, gradient finite.
    logits = jnp.array([[[0.0, 0.0, -jnp.inf]]])
    close(grpo.token_entropy(logits), [[math.log(2)]])
    g = jax.grad(lambda x: grpo.token_entropy(x).sum())(logits)
    assert np.all(np.isfinite(np.asarray(g)))


# ----------------------------------------------------------------------------------------------
# Clipped policy loss on a hand-built batch


def hand_batch():
    """Two sequences; ratios chosen so every clip case appears.

    seq 0, A = +1, ratios (1.0, 1.5, 0.5, 1.1):
      1.0 -> loss -1.0
      1.5 -> high clip: max(-1.5, -1.3) = -1.3
      0.5 -> below 1 - .2 but A > 0, max(-0.5, -0.8) = -0.5: NOT clipped
      1.1 -> -1.1
    seq 1, A = -2, ratios (0.5, 1.2, 4.0 | 5.0 padding), mask (1, 1, 1, 0):
      0.5 -> low clip: max(1.0, 2 * .8 = 1.6) = 1.6
      1.2 -> max(2.4, 2.4) = 2.4, not clipped (1.2 < 1.3)
      4.0 -> max(8, 2.6) = 8 > dual bound 2 * 3 = 6 -> 6, dual clipped
      5.0 -> padding (would be dual clipped: 10 -> 6)
    """
    ratios = np.array([[1.0, 1.5, 0.5, 1.1], [0.5, 1.2, 4.0, 5.0]])
    old = np.array([[-1.0, -2.0, -0.5, -3.0], [-1.5, -0.2, -2.5, -1.0]])
    logp = old + np.log(ratios)
    adv = np.array([1.0, -2.0])
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.float32)
    return logp, old, adv, mask


def test_policy_loss_per_token_hand_values():
    logp, old, adv, mask = hand_batch()
    losses, info = grpo.policy_loss_per_token(logp, old, adv, **CLIP)
    close(losses, [[-1.0, -1.3, -0.5, -1.1], [1.6, 2.4, 6.0, 6.0]], tol=1e-5)
    close(info["ratio"], [[1.0, 1.5, 0.5, 1.1], [0.5, 1.2, 4.0, 5.0]], tol=1e-5)
    np.testing.assert_array_equal(info["clipped_high"], [[0, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(info["clipped_low"], [[0, 0, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(info["clipped"], [[0, 1, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(info["dual_clipped"], [[0, 0, 0, 0], [0, 0, 1, 1]])
    # [B, T] advantages give the same result as the broadcast [B] form.
    losses2, _ = grpo.policy_loss_per_token(logp, old, np.repeat(adv[:, None], 4, 1), **CLIP)
    close(losses2, losses)
    # No dual clip: the 4.0 token keeps its -A * r = 8.
    losses3, info3 = grpo.policy_loss_per_token(logp, old, adv, clip_low=0.2, clip_high=0.3, dual_clip=None)
    close(losses3[1], [1.6, 2.4, 8.0, 10.0], tol=1e-5)
    assert not np.asarray(info3["dual_clipped"]).any()


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("token-mean", 6.1 / 7),  # (-3.9 + 10) / 7 valid tokens
        ("seq-mean-token-mean", (-3.9 / 4 + 10 / 3) / 2),  # per-sequence means, then their mean
        ("seq-mean-token-sum-norm", 6.1 / (2 * 4)),  # sum / (2 sequences * horizon 4)
    ],
)
def test_grpo_loss_hand_values(mode, expected):
    logp, old, adv, mask = hand_batch()
    loss, m = grpo.grpo_loss(logp, old, adv, mask, loss_agg=mode, **CLIP)
    close(loss, expected, tol=1e-5)
    close(m["pg_loss"], expected, tol=1e-5)
    # Counted over the 7 valid tokens; the padded 5.0 ratio (dual-clippable) is not counted.
    close(m["pg_clipfrac_high"], 1 / 7)
    close(m["pg_clipfrac_low"], 1 / 7)
    close(m["pg_clipfrac"], 2 / 7)
    close(m["pg_clipfrac_dual"], 1 / 7)
    close(m["ratio/mean"], (1 + 1.5 + 0.5 + 1.1 + 0.5 + 1.2 + 4.0) / 7, tol=1e-5)
    close(m["ratio/max"], 4.0, tol=1e-5)  # not the padded 5.0
    close(m["ratio/min"], 0.5, tol=1e-5)
    close(m["approx_kl"], -np.log([1, 1.5, 0.5, 1.1, 0.5, 1.2, 4.0]).sum() / 7, tol=1e-5)
    # Token-level advantages: four +1, three -2: mean -2/7, population std sqrt(16/7 - 4/49).
    close(m["advantages/mean"], -2 / 7)
    close(m["advantages/std"], math.sqrt(16 / 7 - 4 / 49))
    close(m["advantages/max"], 1.0)
    close(m["advantages/min"], -2.0)
    assert "kl" not in m and "entropy" not in m and "tis/mean" not in m


def test_grpo_loss_gradient_hand_values():
    # token-mean over N = 7: d loss / d logp = -A r / 7 where unclipped, 0 where clipped / dual
    # clipped / padded.
    logp, old, adv, mask = hand_batch()
    g = jax.grad(lambda lp: grpo.grpo_loss(lp, old, adv, mask, loss_agg="token-mean", **CLIP)[0])(
        jnp.asarray(logp, jnp.float32)
    )
    close(g, np.array([[-1.0, 0, -0.5, -1.1], [0, 2.4, 0, 0]]) / 7, tol=1e-5)


def test_horizon_and_empty_rows():
    logp, old, adv, mask = hand_batch()
    # A fixed horizon replaces T in the Dr.GRPO normaliser.
    loss, _ = grpo.grpo_loss(logp, old, adv, mask, loss_agg="seq-mean-token-sum-norm", horizon=10, **CLIP)
    close(loss, 6.1 / 20, tol=1e-5)
    # An all-padding row adds nothing and is not counted as a sequence.
    logp3 = np.vstack([logp, np.full((1, 4), np.nan)])
    old3 = np.vstack([old, np.zeros((1, 4))])
    adv3 = np.array([1.0, -2.0, np.nan])
    mask3 = np.vstack([mask, np.zeros((1, 4), np.float32)])
    for mode, expected in [
        ("token-mean", 6.1 / 7),
        ("seq-mean-token-mean", (-3.9 / 4 + 10 / 3) / 2),
        ("seq-mean-token-sum-norm", 6.1 / 8),
    ]:
        loss, m = grpo.grpo_loss(logp3, old3, adv3, mask3, loss_agg=mode, **CLIP)
        close(loss, expected, tol=1e-5)
        assert all(np.isfinite(np.asarray(v)) for v in m.values())
    # An entirely padded micro-batch: loss and metrics 0, not NaN.
    loss, m = grpo.grpo_loss(logp, old, adv, np.zeros_like(mask), loss_agg="token-mean", **CLIP)
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in m.values())


@pytest.mark.parametrize("mode", MODES)
def test_loss_matches_numpy_reference(mode):
    d = random_batch(2)
    adv_tok = np.repeat(d["adv"][:, None], d["logp"].shape[1], 1)
    ref_pg = np_aggregate(np_policy_loss(d["logp"], d["old"], adv_tok), d["mask"], mode)
    ref_kl = np_aggregate(np_k3(d["logp"], d["ref"]), d["mask"], mode)
    loss, m = grpo.grpo_loss(
        d["logp"],
        d["old"],
        d["adv"],
        d["mask"],
        loss_agg=mode,
        ref_logprobs=d["ref"],
        kl_coef=0.05,
        **CLIP,
        **mode_kw(mode),
    )
    close(m["pg_loss"], ref_pg, tol=1e-5)
    close(loss, ref_pg + 0.05 * ref_kl, tol=1e-5)
    valid = d["mask"].astype(bool)
    close(m["kl"], np_k3(d["logp"], d["ref"])[valid].mean(), tol=1e-5)
    # The random batch exercises every clip branch.
    r = np.exp(d["logp"] - d["old"])[valid]
    a = adv_tok[valid]
    low, high = (a < 0) & (r < 0.8), (a > 0) & (r > 1.3)
    dual = (a < 0) & (r > 3.0)
    assert low.any() and high.any() and dual.any()
    close(m["pg_clipfrac_low"], low.mean())
    close(m["pg_clipfrac_high"], high.mean())
    close(m["pg_clipfrac"], (low | high).mean())
    close(m["pg_clipfrac_dual"], dual.mean())


def test_jit_and_numpy_inputs_agree():
    d = random_batch(3)
    kw = dict(loss_agg="seq-mean-token-mean", ref_logprobs=d["ref"], kl_coef=0.1, **CLIP)
    eager = grpo.grpo_loss(d["logp"], d["old"], d["adv"], d["mask"], **kw)
    jitted = jax.jit(lambda *a: grpo.grpo_loss(*a, **kw))(d["logp"], d["old"], d["adv"], d["mask"])
    close(eager[0], jitted[0])
    for k in eager[1]:
        close(eager[1][k], jitted[1][k])
    # bf16 inputs still do float32 math.
    loss_bf, _ = grpo.grpo_loss(
        *(jnp.asarray(d[k], jnp.bfloat16) for k in ("logp", "old", "adv")),
        d["mask"],
        loss_agg="token-mean",
        **CLIP,
    )
    assert loss_bf.dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# Micro-batches with global normalisers


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("splits", [(0, 5, 8), (0, 1, 4, 6, 8)])
def test_micro_batch_sum_equals_full_batch(mode, splits):
    # Uneven lengths (one empty row) so micro-batches hold different token counts.
    d = random_batch(4, lengths=[6, 1, 3, 0, 5, 2, 6, 4])
    num_tokens, num_sequences = grpo.loss_normalizers(d["mask"])
    assert float(num_tokens) == 27 and float(num_sequences) == 7
    horizon = d["mask"].shape[1]
    # chunk-token-mean's weights come from the whole batch and travel with their rows.
    weights = np.asarray(grpo.chunk_token_weights(d["mask"], CHUNK))

    # One jitted value-and-grad per shape: op-by-op eager dispatch would compile every primitive
    # for every micro-batch shape and dominate the test's run time.
    @jax.jit
    def value_and_grad(logp, old, adv, mask, ref, rollout, w):
        f = lambda lp: grpo.grpo_loss(  # noqa: E731
            lp,
            old,
            adv,
            mask,
            ref_logprobs=ref,
            rollout_logprobs=rollout,
            loss_agg=mode,
            kl_coef=0.05,
            tis_cap=2.0,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
            horizon=horizon,
            row_weights=w,
            **CLIP,
        )[0]
        return jax.value_and_grad(f)(logp)

    def run(rows, t):
        return value_and_grad(
            *(jnp.asarray(d[k][rows, :t], jnp.float32) for k in ("logp", "old")),
            jnp.asarray(d["adv"][rows], jnp.float32),
            *(jnp.asarray(d[k][rows, :t], jnp.float32) for k in ("mask", "ref", "rollout")),
            jnp.asarray(weights[rows]),
        )

    full_loss, full_grad = run(slice(0, 8), horizon)
    total, grads = 0.0, []
    for lo, hi in zip(splits[:-1], splits[1:]):
        rows = slice(lo, hi)
        # Each micro-batch is trimmed to its own longest response, as a learner packing it would.
        t = max(1, int(d["mask"][rows].sum(1).max()))
        loss, g_mb = run(rows, t)
        total = total + loss
        g = np.zeros((hi - lo, horizon))
        g[:, :t] = g_mb
        grads.append(g)
    close(total, full_loss, tol=1e-6)
    close(np.vstack(grads), full_grad, tol=1e-7)
    # Cross-check the full loss against the NumPy reference, TIS included.
    adv_tok = np.repeat(d["adv"][:, None], horizon, 1)
    w = np.minimum(np.exp(d["old"] - d["rollout"]), 2.0)
    ref = np_aggregate(
        np_policy_loss(d["logp"], d["old"], adv_tok) * w, d["mask"], mode
    ) + 0.05 * np_aggregate(np_k3(d["logp"], d["ref"]), d["mask"], mode)
    close(full_loss, ref, tol=1e-5)


def test_local_normalisers_do_not_sum():
    # Without the global counts, token-mean micro-batch losses are per-micro-batch means: their sum
    # is not the batch loss. This is the failure the normalisers exist to prevent.
    d = random_batch(4, lengths=[6, 1, 3, 0, 5, 2, 6, 4])
    loss = jax.jit(lambda *a: grpo.grpo_loss(*a, loss_agg="token-mean", **CLIP)[0])
    f = lambda rows: loss(d["logp"][rows], d["old"][rows], d["adv"][rows], d["mask"][rows])  # noqa: E731
    assert abs(float(f(slice(0, 5)) + f(slice(5, 8)) - f(slice(0, 8)))) > 1e-3


# ----------------------------------------------------------------------------------------------
# KL, TIS, mismatch


def test_kl_estimators_hand_values():
    # d = logp - ref = (0, 1, -1, 30, -30, -100)
    ref = np.zeros(6)
    logp = np.array([0.0, 1.0, -1.0, 30.0, -30.0, -100.0])
    close(grpo.kl_penalty(logp, ref, "k1"), logp)
    close(grpo.kl_penalty(logp, ref, "k2"), [0, 0.5, 0.5, 450, 450, 5000])
    # k3 = exp(-d) + d - 1: 0; e^-1 = .3678794; e - 2 = .7182818; 29 + e^-30 -> clip 10;
    # e^30 - 31 -> clip 10; e^100 overflows float32 but is clipped to 10 all the same.
    close(grpo.kl_penalty(logp, ref, "k3"), [0, math.exp(-1), math.e - 2, 10, 10, 10], tol=1e-6)
    g = jax.grad(lambda x: grpo.kl_penalty(x, ref, "k3").sum())(jnp.asarray(logp, jnp.float32))
    # d k3 / d logp = 1 - exp(-d) inside the clip, 0 where clipped; never NaN.
    close(g, [0, 1 - math.exp(-1), 1 - math.e, 0, 0, 0], tol=1e-6)


def test_tis_weights_capped_and_gradient_free():
    rollout = np.zeros(4)
    old = np.array([0.0, math.log(1.5), math.log(3.0), 100.0])
    close(grpo.truncated_importance_weights(old, rollout, 2.0), [1.0, 1.5, 2.0, 2.0], tol=1e-6)
    go, gr = jax.grad(lambda o, r: grpo.truncated_importance_weights(o, r, 2.0).sum(), argnums=(0, 1))(
        jnp.asarray(old, jnp.float32), jnp.asarray(rollout, jnp.float32)
    )
    assert not np.asarray(go).any() and not np.asarray(gr).any()

    # In the loss: token losses are scaled by w; the gradient w.r.t. logprobs is w times the plain one.
    logp, old2, adv, mask = hand_batch()
    rollout2 = old2 - np.log([[1.0, 1.5, 3.0, 0.5], [0.8, 1.0, 1.0, 9.0]])  # w = exp(old - rollout)
    w = np.minimum([[1.0, 1.5, 3.0, 0.5], [0.8, 1.0, 1.0, 9.0]], 2.0)
    plain = np.array([[-1.0, -1.3, -0.5, -1.1], [1.6, 2.4, 6.0, 0.0]])
    kw = dict(loss_agg="token-mean", **CLIP)
    loss, m = grpo.grpo_loss(logp, old2, adv, mask, rollout_logprobs=rollout2, tis_cap=2.0, **kw)
    close(loss, (plain * w).sum() / 7, tol=1e-5)
    close(m["tis/mean"], (w * mask).sum() / 7, tol=1e-6)
    close(m["tis/max"], 2.0)  # the padded 9.0 (capped to 2) coincides here; min shows masking:
    close(m["tis/min"], 0.5)
    close(m["tis/capped_frac"], 1 / 7)
    close(
        m["sampler_trainer/logp_diff"],
        np.abs(np.log([1.0, 1.5, 3.0, 0.5, 0.8, 1.0, 1.0])).sum() / 7,
        tol=1e-6,
    )
    close(m["sampler_trainer/logp_diff_max"], math.log(3.0), tol=1e-6)  # not the padded ln 9
    grad = lambda **extra: jax.grad(  # noqa: E731
        lambda lp: grpo.grpo_loss(lp, old2, adv, mask, **kw, **extra)[0]
    )(jnp.asarray(logp, jnp.float32))
    close(grad(rollout_logprobs=rollout2, tis_cap=2.0), np.asarray(grad()) * w, tol=1e-6)


def test_logprob_mismatch_ignores_padding():
    old = np.array([[0.0, -1.0, 5.0]])
    rollout = np.array([[-0.1, -1.3, np.inf]])
    out = grpo.logprob_mismatch(old, rollout, np.array([[1, 1, 0]]))
    close(out["sampler_trainer/logp_diff"], (0.1 + 0.3) / 2)
    close(out["sampler_trainer/logp_diff_max"], 0.3)


# ----------------------------------------------------------------------------------------------
# Padding garbage


@pytest.mark.parametrize("mode", MODES)
def test_inf_nan_padding_changes_nothing(mode):
    logp, old, adv, mask = hand_batch()
    d = random_batch(5, b=2, t=4)
    adv_tok = np.repeat(adv[:, None], 4, 1)
    clean = dict(ref_logprobs=d["ref"], rollout_logprobs=d["rollout"], entropy=np.ones((2, 4)))
    dirty = {k: v.copy() for k, v in clean.items()}
    logp_d, old_d, adv_d = logp.copy(), old.copy(), adv_tok.copy()
    logp_d[1, 3], old_d[1, 3], adv_d[1, 3] = np.nan, np.inf, np.nan
    dirty["ref_logprobs"][1, 3] = -np.inf
    dirty["rollout_logprobs"][1, 3] = np.nan
    dirty["entropy"][1, 3] = np.inf
    kw = dict(loss_agg=mode, kl_coef=0.1, tis_cap=2.0, **CLIP, **mode_kw(mode))

    def run(lp, o, a, extra):
        f = lambda x: grpo.grpo_loss(x, o, a, mask, **kw, **extra)  # noqa: E731
        (loss, m), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(lp, jnp.float32))
        return loss, m, g

    loss_c, m_c, g_c = run(logp, old, adv_tok, clean)
    loss_d, m_d, g_d = run(logp_d, old_d, adv_d, dirty)
    assert np.isfinite(float(loss_d))
    close(loss_d, loss_c, tol=0)
    assert m_c.keys() == m_d.keys()
    for k in m_c:
        close(m_d[k], m_c[k], tol=0)
    assert np.all(np.isfinite(np.asarray(g_d)))
    close(g_d, g_c, tol=0)
    assert float(g_d[1, 3]) == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_loss_masks_garbage_itself(mode):
    # aggregate_loss is public: it must mask with `where`, since 0 * inf = NaN.
    losses = np.array([[1.0, 2.0, np.inf], [3.0, np.nan, -np.inf]])
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    clean = np.where(mask, losses, 0.0)
    # token-mean 6 / 3; seq-mean (1.5 + 3) / 2; sum-norm 6 / (2 * 3); chunk (one chunk of 2) 6 / 3
    expected = {
        "token-mean": 2.0,
        "seq-mean-token-mean": 2.25,
        "seq-mean-token-sum-norm": 1.0,
        "chunk-token-mean": 2.0,
    }[mode]
    close(grpo.aggregate_loss(losses, mask, mode, **mode_kw(mode)), expected)
    close(np_aggregate(clean, mask, mode), expected)
    g = jax.grad(lambda x: grpo.aggregate_loss(x, mask, mode, **mode_kw(mode)))(
        jnp.asarray(losses, jnp.float32)
    )
    assert np.all(np.isfinite(np.asarray(g))) and not np.asarray(g)[~mask.astype(bool)].any()


def test_masked_min_max_ignore_padding():
    # All valid ratios above 1 and all advantages negative: a padded slot (ratio 1, advantage 0
    # after sanitising) must not show up as ratio/min or advantages/max.
    old = np.zeros((2, 3))
    logp = np.log([[1.1, 1.2, 1.0], [1.05, 1.0, 1.0]])
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    _, m = grpo.grpo_loss(logp, old, np.array([-1.0, -0.5]), mask, loss_agg="token-mean", **CLIP)
    close(m["ratio/min"], 1.05, tol=1e-6)
    close(m["ratio/max"], 1.2, tol=1e-6)
    close(m["advantages/max"], -0.5)
    close(m["advantages/min"], -1.0)


# ----------------------------------------------------------------------------------------------
# Invalid arguments


def test_invalid_arguments_raise():
    logp, old, adv, mask = hand_batch()
    with pytest.raises(
        ValueError, match="token-means.*token-mean, seq-mean-token-mean, seq-mean-token-sum-norm"
    ):
        grpo.aggregate_loss(np.zeros((2, 4)), mask, "token-means")
    with pytest.raises(ValueError, match="'k4'.*k1, k2, k3"):
        grpo.kl_penalty(logp, old, "k4")
    with pytest.raises(ValueError, match="'sum'"):
        grpo.grpo_loss(logp, old, adv, mask, loss_agg="sum", **CLIP)
    with pytest.raises(ValueError, match="'mse'"):
        grpo.grpo_loss(logp, old, adv, mask, loss_agg="token-mean", ref_logprobs=old, kl_kind="mse", **CLIP)
    for c in (1.0, 0.5):
        with pytest.raises(ValueError, match="dual_clip"):
            grpo.policy_loss_per_token(logp, old, adv, clip_low=0.2, clip_high=0.3, dual_clip=c)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        grpo.grpo_loss(logp, old, adv, mask, loss_agg="token-mean", tis_cap=2.0, **CLIP)
    with pytest.raises(ValueError, match="temperature"):
        grpo.token_logprobs(np.zeros((1, 1, 3)), np.zeros((1, 1), int), 0.0)
    with pytest.raises(ValueError, match="advantages"):
        grpo.grpo_loss(logp, old, np.zeros(3), mask, loss_agg="token-mean", **CLIP)


# ----------------------------------------------------------------------------------------------
# Tied groups and the release's loss scope


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("value", [1.7, 0.9, 0.1 + 0.2, 2.1, 0.7 * 0.9 + 0.1, -1.3])
def test_tied_group_advantage_is_exactly_zero(value, dtype):
    # In float32 the mean of eight 1.7s is 1 ulp off, and 1 ulp / (1 ulp + 1e-6) is ~0.1: a group
    # without signal would be pushed. It must be exactly 0.0, in either dtype, with or without std.
    rewards = jnp.full((16,), value, dtype).at[8:].set(jnp.asarray(value, dtype) + 1)
    for scale in (True, False):
        adv = np.asarray(grpo.group_advantages(rewards, 8, scale_by_std=scale))
        assert adv.dtype == np.float32
        assert np.array_equal(adv, np.zeros(16, np.float32)), adv


def test_tied_groups_random_values_and_mixed_batch():
    rng = np.random.default_rng(0)
    values = rng.uniform(-3, 3, size=200).astype(np.float32)
    rewards = np.repeat(values, 8)
    for dtype in (jnp.float32, jnp.bfloat16):
        assert not np.asarray(grpo.group_advantages(jnp.asarray(rewards, dtype), 8)).any()
    # A tied group beside a live one: the live group keeps its textbook advantages.
    live = np.array([0.0, 1.0, 0.0, 1.0], np.float32)
    adv = np.asarray(grpo.group_advantages(np.concatenate([np.full(4, 1.7, np.float32), live]), 4))
    assert not adv[:4].any()
    close(adv[4:], (live - live.mean()) / (live.std(ddof=1) + 1e-6), tol=1e-6)


def test_chunk_token_mean_hand_golden():
    # Chunks of 2 responses with 3 and 4 tokens: ((1 + 2 + 3) / 3 + (4 * 4) / 4) / 2 = 3, where the
    # global token-mean would be 22 / 7. An empty third chunk counts for nothing.
    losses = np.array(
        [[1, 2, 0, 0], [3, 0, 0, 0], [4, 4, 4, 4], [0, 0, 0, 0], [9, 9, 9, 9], [9, 9, 9, 9]], np.float32
    )
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    close(grpo.aggregate_loss(losses, mask, "chunk-token-mean", chunk_responses=2), 3.0, tol=1e-6)
    close(grpo.aggregate_loss(losses, mask, "token-mean"), 22 / 7, tol=1e-6)
    close(grpo.chunk_token_weights(mask, 2), [1 / 6, 1 / 6, 1 / 8, 1 / 8, 0, 0], tol=1e-7)
    with pytest.raises(ValueError, match="chunk_responses"):
        grpo.aggregate_loss(losses, mask, "chunk-token-mean")
