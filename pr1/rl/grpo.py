"""GRPO: group-relative advantages and the clipped policy-gradient objective, as pure jnp functions.

Place in the data flow: the rollout engine samples `group_size` responses per prompt and reports their
token log-probabilities; the reward functions give one scalar per response; `group_advantages` turns
those into one advantage per response. The learner recomputes log-probabilities with
`token_logprobs` (old policy, before the update, and current policy, inside the gradient), and
`grpo_loss` gives the scalar to differentiate plus the metrics to log.

Conventions, shared by every function here:
- Shapes: B sequences (responses), T response positions, V vocabulary. `mask` is [B, T], nonzero on
  response tokens that count, zero on padding (binary; weights are not supported).
- All arithmetic is float32 whatever the input dtype (bf16 logits, int rewards, NumPy arrays).
- Padding never reaches a value, a metric or a gradient: masked positions are replaced with
  `jnp.where` before any arithmetic, because padded log-probabilities may hold inf/NaN and
  `0 * inf` is NaN (and a `where` taken only at the end still leaks NaN into gradients).
- Everything is jittable. String options (`mode`, `kind`, `loss_agg`) and `group_size` are static;
  errors about them are raised at trace time.
- Recipe defaults follow Perception-R1 as released (EasyR1): clip 0.2 / 0.3, dual clip 3.0,
  token-mean aggregation, advantages normalised by the unbiased group std plus 1e-6.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

F32 = jnp.float32

# "chunk-token-mean" is the released recipe's scope (EasyR1/verl): the token-mean within each
# micro-batch of 8 responses, averaged over micro-batches and data-parallel ranks.
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "chunk-token-mean")
KL_KINDS = ("k1", "k2", "k3")

# exp() of a log-ratio above ~88 overflows float32; the unselected branch of max/min/where then
# carries 0 * inf = NaN into the gradient. Beyond +-20 every token is clipped anyway (ratio e^20),
# so clamping there changes no loss value that matters. Same bound as verl/EasyR1.
_LOG_RATIO_CLAMP = 20.0
# verl clips the k3 estimator to this range so one runaway token cannot dominate the KL term.
_K3_CLIP = 10.0


def _is_static_number(x) -> bool:
    # Hyperparameters are normally Python numbers; a traced value cannot be range-checked.
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


# ----------------------------------------------------------------------------------------------
# Advantages


def _check_groups(shape: tuple[int, ...], group_size) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise ValueError(f"group_size must be a Python int, got {group_size!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (the group std needs two responses), got {group_size}")
    if len(shape) != 1:
        raise ValueError(f"rewards must be 1-D [prompts * group_size], got shape {shape}")
    if shape[0] % group_size:
        raise ValueError(
            f"{shape[0]} rewards is not a multiple of group_size={group_size}; each prompt needs "
            "exactly group_size contiguous responses"
        )


def group_advantages(rewards, group_size: int, *, eps: float = 1e-6, scale_by_std: bool = True):
    """One advantage per response, normalised within its prompt's group (GRPO).

    rewards: [N], N = prompts * group_size, the group_size responses of one prompt contiguous.
    For response i of group g with rewards R_g1..R_gG (G = group_size):

        mean_g = (1/G) sum_j R_gj
        std_g  = sqrt( (1/(G-1)) sum_j (R_gj - mean_g)^2 )      (unbiased, ddof=1, torch default)
        A_gi   = (R_gi - mean_g) / (std_g + eps)                 if scale_by_std (GRPO)
        A_gi   =  R_gi - mean_g                                  otherwise (Dr.GRPO)

    A group whose rewards are all equal gets A = 0.0 exactly, by construction: the float32 mean of
    eight 1.7s is 1 ulp off 1.7, and 1 ulp / (std 1 ulp + 1e-6) would be an advantage of ~0.1 for
    a group that carries no signal (the release's torch code has that bug). Tied groups are found by
    exact equality (max == min) and zeroed. Returns [N] float32.
    Raises ValueError at trace time if group_size < 2 or N is not a multiple of it.
    """
    r = jnp.asarray(rewards).astype(F32)
    _check_groups(r.shape, group_size)
    groups = r.reshape(-1, group_size)
    tied = groups.max(axis=-1, keepdims=True) == groups.min(axis=-1, keepdims=True)
    centered = groups - groups.mean(axis=-1, keepdims=True)
    if scale_by_std:
        centered = centered / (groups.std(axis=-1, ddof=1, keepdims=True) + eps)
    return jnp.where(tied, 0.0, centered).reshape(-1)


def zero_std_fraction(rewards, group_size: int):
    """Fraction of groups whose rewards are all equal (metric `frac_reward_zero_std`).

        frac = (1/#groups) sum_g [max_j R_gj == min_j R_gj]

    Such groups have zero advantage and contribute no policy gradient. Exact equality, not
    std < tol, so the count is the same on every backend. Returns a float32 scalar.
    """
    r = jnp.asarray(rewards).astype(F32)
    _check_groups(r.shape, group_size)
    groups = r.reshape(-1, group_size)
    return jnp.mean((groups.max(axis=-1) == groups.min(axis=-1)).astype(F32))


# ----------------------------------------------------------------------------------------------
# Log-probabilities and entropy from logits


def _check_temperature(temperature) -> None:
    if _is_static_number(temperature) and not temperature > 0:
        raise ValueError(
            f"temperature must be > 0 (greedy decoding has no log-probs to match), got {temperature}"
        )


def token_logprobs(logits, targets, temperature: float = 1.0):
    """Log-probability of each target token under softmax(logits / temperature).

        z = float32(logits) / temperature
        logp[b, t] = z[b, t, targets[b, t]] - logsumexp_v z[b, t, v]

    which equals log_softmax(z)[targets]. This is what the rollout engine reports for a sampled
    token when its logprobs are taken after temperature and before top-k/top-p, so the importance
    ratio against rollout logprobs is 1 when both models agree. Gathering the target logit and
    subtracting the logsumexp avoids materialising a second [B, T, V] float32 array.
    logits [B, T, V], targets [B, T] int → [B, T] float32.
    """
    _check_temperature(temperature)
    z = jnp.asarray(logits).astype(F32) / temperature
    targets = jnp.asarray(targets).astype(jnp.int32)
    picked = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(z, axis=-1)


def token_entropy(logits, temperature: float = 1.0):
    """Entropy of the next-token distribution softmax(logits / temperature) at each position.

        logp = log_softmax(float32(logits) / temperature)
        H[b, t] = - sum_v exp(logp[b, t, v]) * logp[b, t, v]

    Vocabulary entries masked with -inf logits contribute 0 (p log p -> 0), not NaN.
    logits [B, T, V] → [B, T] float32.
    """
    _check_temperature(temperature)
    z = jnp.asarray(logits).astype(F32) / temperature
    logp = jax.nn.log_softmax(z, axis=-1)
    # Double where: -inf log-probs must not reach the product, or its gradient is 0 * inf = NaN.
    safe_logp = jnp.where(jnp.isfinite(logp), logp, 0.0)
    return -jnp.sum(jnp.exp(logp) * safe_logp, axis=-1)


# ----------------------------------------------------------------------------------------------
# Policy loss


def _check_clip(clip_low, clip_high, dual_clip) -> None:
    if _is_static_number(clip_low) and not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if _is_static_number(clip_high) and clip_high < 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None and _is_static_number(dual_clip) and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")


def _per_token_advantages(advantages, shape):
    a = jnp.asarray(advantages).astype(F32)
    if a.ndim == 1:
        if a.shape[0] != shape[0]:
            raise ValueError(f"advantages shape {a.shape} does not match {shape[0]} sequences")
        return jnp.broadcast_to(a[:, None], shape)
    if a.shape != tuple(shape):
        raise ValueError(f"advantages shape {a.shape} is neither [B] nor the token shape {tuple(shape)}")
    return a


def policy_loss_per_token(
    logprobs, old_logprobs, advantages, *, clip_low: float = 0.2, clip_high: float = 0.3, dual_clip=3.0
):
    """PPO clipped surrogate with asymmetric clip and dual clip, per token (to be minimised).

        r    = exp(clamp(logp - old_logp, -20, 20))
        pg1  = -A * r
        pg2  = -A * clip(r, 1 - clip_low, 1 + clip_high)
        l    = max(pg1, pg2)
        l    = min(l, -A * dual_clip)        only where A < 0 (dual clip; dual_clip=None skips it)

    The clamp on the log-ratio only guards against exp overflow (e^20 is far past any clip), so
    values inside the trust region are exactly the textbook formula.
    advantages: [B] (one per sequence, broadcast over tokens) or [B, T].
    Returns (token_losses [B, T] float32, info) where info holds per-token arrays:
      ratio         r
      clipped_low   pg2 > pg1 and r < 1 - clip_low   (only possible for A < 0)
      clipped_high  pg2 > pg1 and r > 1 + clip_high  (only possible for A > 0)
      clipped       clipped_low | clipped_high        (the PPO clip is active; gradient 0)
      dual_clipped  A < 0 and max(pg1, pg2) > -A * dual_clip  (disjoint from `clipped`)
    No masking here: padded positions hold whatever the inputs imply; `grpo_loss` sanitises them.
    """
    _check_clip(clip_low, clip_high, dual_clip)
    logp = jnp.asarray(logprobs).astype(F32)
    old = jnp.asarray(old_logprobs).astype(F32)
    adv = _per_token_advantages(advantages, logp.shape)

    ratio = jnp.exp(jnp.clip(logp - old, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped_loss = jnp.maximum(pg1, pg2)
    clipped = pg2 > pg1
    info = {
        "ratio": ratio,
        "clipped_low": clipped & (ratio < 1.0 - clip_low),
        "clipped_high": clipped & (ratio > 1.0 + clip_high),
        "clipped": clipped,
    }
    if dual_clip is None:
        info["dual_clipped"] = jnp.zeros(logp.shape, dtype=bool)
        return clipped_loss, info
    negative = adv < 0
    bound = -adv * dual_clip
    info["dual_clipped"] = negative & (clipped_loss > bound)
    losses = jnp.where(negative, jnp.minimum(clipped_loss, bound), clipped_loss)
    return losses, info


# ----------------------------------------------------------------------------------------------
# Aggregation


def _valid(mask):
    return jnp.asarray(mask) != 0


def loss_normalizers(mask):
    """The global normalizers `aggregate_loss` expects, computed on the WHOLE batch's mask.

        num_tokens    = sum_{b,t} m[b, t]
        num_sequences = #{b : sum_t m[b, t] > 0}     (rows with no valid token are padding)

    Returns (num_tokens, num_sequences) as float32 scalars.
    """
    valid = _valid(mask)
    return valid.sum().astype(F32), jnp.any(valid, axis=-1).sum().astype(F32)


def chunk_token_weights(mask, chunk_responses: int):
    """Per-row loss weights [B] of "chunk-token-mean", computed on the WHOLE batch's mask.

    Rows are cut into consecutive chunks of `chunk_responses` (the last may be shorter); with N_c the
    valid tokens of chunk c and C the number of chunks holding any token, row b of chunk c gets

        w_b = 1 / (C * N_c)          (0 for the rows of an empty chunk)

    so that sum_{b,t} l*m*w_b is the mean over chunks of each chunk's token-mean: the released
    recipe's loss, whose per-GPU micro-batch of 8 responses takes its own token-mean before the
    gradients are averaged. The chunks are fixed by row order, so the value does not depend on how
    the rows are later split into micro-batches or laid over devices.
    """
    if (
        isinstance(chunk_responses, bool)
        or not isinstance(chunk_responses, numbers.Integral)
        or chunk_responses < 1
    ):
        raise ValueError(f"chunk_responses must be a Python int >= 1, got {chunk_responses!r}")
    valid = _valid(mask)
    rows = valid.shape[0]
    n_chunks = -(-rows // chunk_responses)
    row_tokens = valid.sum(axis=-1).astype(F32)
    padded = jnp.pad(row_tokens, (0, n_chunks * chunk_responses - rows))
    chunk_tokens = padded.reshape(n_chunks, chunk_responses).sum(axis=-1)
    used = (chunk_tokens > 0).sum().astype(F32)
    per_chunk = jnp.where(
        chunk_tokens > 0, 1.0 / (jnp.maximum(used, 1.0) * jnp.maximum(chunk_tokens, 1.0)), 0.0
    )
    return jnp.repeat(per_chunk, chunk_responses)[:rows]


def aggregate_loss(
    token_losses,
    mask,
    mode: str,
    *,
    num_tokens=None,
    num_sequences=None,
    horizon=None,
    row_weights=None,
    chunk_responses=None,
):
    """Reduce per-token losses [B, T] to a scalar; masked positions never contribute.

    With m = mask, l = token_losses, n_b = sum_t m[b, t] and S = {b : n_b > 0}:
      "token-mean"               sum_{b,t} l*m / N_tok
      "seq-mean-token-mean"      sum_{b in S} (sum_t l*m / n_b) / N_seq
      "seq-mean-token-sum-norm"  sum_{b,t} l*m / (N_seq * H)     (Dr.GRPO: constant normaliser)
      "chunk-token-mean"         sum_{b,t} l*m * w_b             (w = chunk_token_weights: the mean
                                 over chunks of `chunk_responses` rows of each chunk's token-mean)
    where, by default (this batch alone), N_tok = sum m, N_seq = |S|, H = T = mask.shape[-1], and w
    is computed from this batch's mask.

    Gradient accumulation: pass `num_tokens` / `num_sequences` (`loss_normalizers(full_mask)`) or
    `row_weights` (`chunk_token_weights(full_mask, c)`, split with the rows) computed on the whole
    batch to every micro-batch; then the SUM of the micro-batch losses equals the whole-batch loss,
    and so do the gradients. Pass a fixed `horizon` (e.g. the max response length) so that
    micro-batches padded to different T share one normaliser. A normaliser the mode does not use is
    ignored, so a learner may always pass all of them.
    Denominators are floored at 1: an all-padding batch gives 0, not NaN.
    Raises ValueError for an unknown mode, or chunk-token-mean with neither weights nor chunk size.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid modes: {', '.join(LOSS_AGG_MODES)}")
    valid = _valid(mask)
    losses = jnp.where(valid, jnp.asarray(token_losses).astype(F32), 0.0)
    if mode == "token-mean":
        n_tok = valid.sum().astype(F32) if num_tokens is None else jnp.asarray(num_tokens, F32)
        return losses.sum() / jnp.maximum(n_tok, 1.0)
    if mode == "chunk-token-mean":
        if row_weights is None:
            if chunk_responses is None:
                raise ValueError("loss_agg 'chunk-token-mean' needs row_weights or chunk_responses")
            row_weights = chunk_token_weights(valid, chunk_responses)
        w = jnp.asarray(row_weights, F32)
        if w.shape != valid.shape[:1]:
            raise ValueError(f"row_weights shape {w.shape} does not match the {valid.shape[0]} rows")
        return (losses.sum(axis=-1) * w).sum()

    seq_tokens = valid.sum(axis=-1).astype(F32)
    if num_sequences is None:
        num_sequences = (seq_tokens > 0).sum()
    n_seq = jnp.maximum(jnp.asarray(num_sequences, F32), 1.0)
    if mode == "seq-mean-token-mean":
        # An empty row has sum 0 over max(0, 1): it adds nothing and is not counted in n_seq.
        per_seq = losses.sum(axis=-1) / jnp.maximum(seq_tokens, 1.0)
        return per_seq.sum() / n_seq
    h = valid.shape[-1] if horizon is None else horizon
    return losses.sum() / (n_seq * jnp.asarray(h, F32))


# ----------------------------------------------------------------------------------------------
# KL to a reference policy, rollout/learner mismatch


def kl_penalty(logprobs, ref_logprobs, kind: str):
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probabilities.

    With d = logp - ref_logp:
      "k1"  d
      "k2"  0.5 * d^2
      "k3"  clip(exp(-d) + d - 1, -10, 10)   (Schulman's low-variance estimator, >= 0; verl clips it,
            and clamps d to [-20, 20] before exp, which changes nothing after the clip)
    Returns [B, T] float32. Raises ValueError for an unknown kind.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; valid kinds: {', '.join(KL_KINDS)}")
    d = jnp.asarray(logprobs).astype(F32) - jnp.asarray(ref_logprobs).astype(F32)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * jnp.square(d)
    neg = jnp.clip(-d, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # ref - logp
    return jnp.clip(jnp.exp(neg) - neg - 1.0, -_K3_CLIP, _K3_CLIP)


def truncated_importance_weights(old_logprobs, rollout_logprobs, cap):
    """Truncated importance sampling (TIS) weights for the rollout-engine / learner mismatch.

        w = stop_gradient( min(exp(old_logp - rollout_logp), cap) )

    The rollout engine (different kernels, bf16) samples from a slightly different distribution
    than the learner's old policy; w reweights each token towards the learner's, truncated at
    `cap` to bound the variance. It is a constant weight: no gradient flows through it.
    Returns [B, T] float32.
    """
    if _is_static_number(cap) and not cap > 0:
        raise ValueError(f"tis_cap must be > 0, got {cap}")
    d = jnp.asarray(old_logprobs).astype(F32) - jnp.asarray(rollout_logprobs).astype(F32)
    # Clamp before exp: an overflowed weight is capped anyway, and the clamp keeps it finite.
    w = jnp.minimum(jnp.exp(jnp.minimum(d, _LOG_RATIO_CLAMP)), cap)
    return jax.lax.stop_gradient(w)


def _masked_mean(x, valid):
    return jnp.where(valid, x, 0.0).sum() / jnp.maximum(valid.sum(), 1).astype(F32)


def _masked_max(x, valid):
    # An all-padding batch reports 0 rather than -inf.
    return jnp.where(valid.any(), jnp.max(jnp.where(valid, x, -jnp.inf)), 0.0)


def _masked_min(x, valid):
    return jnp.where(valid.any(), jnp.min(jnp.where(valid, x, jnp.inf)), 0.0)


def logprob_mismatch(old_logprobs, rollout_logprobs, mask):
    """How far the learner's log-probs are from the rollout engine's, over masked tokens.

        sampler_trainer/logp_diff      = mean_{m=1} |old_logp - rollout_logp|
        sampler_trainer/logp_diff_max  = max_{m=1}  |old_logp - rollout_logp|
    Returns a dict of float32 scalars (0 for an all-padding batch).
    """
    valid = _valid(mask)
    d = jnp.where(
        valid, jnp.asarray(old_logprobs).astype(F32) - jnp.asarray(rollout_logprobs).astype(F32), 0.0
    )
    diff = jnp.abs(d)
    return {
        "sampler_trainer/logp_diff": _masked_mean(diff, valid),
        "sampler_trainer/logp_diff_max": _masked_max(diff, valid),
    }


# ----------------------------------------------------------------------------------------------
# The full objective


def grpo_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip,
    loss_agg: str,
    ref_logprobs=None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    rollout_logprobs=None,
    tis_cap=None,
    entropy=None,
    num_tokens=None,
    num_sequences=None,
    horizon=None,
    row_weights=None,
    chunk_responses=None,
):
    """The GRPO objective for one (micro-)batch and its metrics.

        l_tok   = policy_loss_per_token(logp, old_logp, A; clip_low, clip_high, dual_clip)
        l_tok  *= truncated_importance_weights(old_logp, rollout_logp, tis_cap)   if both given
        pg_loss = aggregate_loss(l_tok, mask, loss_agg; num_tokens, num_sequences, horizon,
                                 row_weights, chunk_responses)
        loss    = pg_loss + kl_coef * aggregate_loss(kl_penalty(logp, ref_logp, kl_kind), ...same)
                  (the KL term only when ref_logprobs is given)

    Inputs [B, T] (advantages [B] or [B, T]); masked positions may hold anything, including
    inf/NaN: they are replaced before any arithmetic. Returns (loss, metrics). "loss", "pg_loss" and
    "kl_loss" use the aggregation (with global normalizers they sum over micro-batches); every other
    metric is a masked token mean / max / min over this micro-batch:
      pg_clipfrac (either PPO clip side), pg_clipfrac_low, pg_clipfrac_high, pg_clipfrac_dual,
      approx_kl = mean(old_logp - logp), kl (mean per-token estimator, if ref given),
      entropy (if given), ratio/{mean,max,min}, advantages/{mean,std,max,min} (std: population),
      tis/{mean,max,min,capped_frac} and sampler_trainer/logp_diff{,_max} (if rollout_logprobs).
    """
    logp = jnp.asarray(logprobs)
    valid = _valid(mask)
    if valid.shape != logp.shape:
        raise ValueError(f"mask shape {valid.shape} does not match logprobs shape {logp.shape}")
    if tis_cap is not None and rollout_logprobs is None:
        raise ValueError(
            "tis_cap is set but rollout_logprobs were not given; TIS needs the rollout engine's logprobs"
        )

    def clean(x, name):
        x = jnp.asarray(x)
        if x.shape != valid.shape:
            raise ValueError(f"{name} shape {x.shape} does not match logprobs shape {valid.shape}")
        return jnp.where(valid, x.astype(F32), 0.0)

    logp = clean(logp, "logprobs")
    old = clean(old_logprobs, "old_logprobs")
    adv = jnp.where(valid, _per_token_advantages(advantages, valid.shape), 0.0)

    token_losses, info = policy_loss_per_token(
        logp, old, adv, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip
    )
    metrics = {}
    if rollout_logprobs is not None:
        rollout = clean(rollout_logprobs, "rollout_logprobs")
        metrics.update(logprob_mismatch(old, rollout, valid))
        if tis_cap is not None:
            w = truncated_importance_weights(old, rollout, tis_cap)
            token_losses = token_losses * w
            metrics["tis/mean"] = _masked_mean(w, valid)
            metrics["tis/max"] = _masked_max(w, valid)
            metrics["tis/min"] = _masked_min(w, valid)
            metrics["tis/capped_frac"] = _masked_mean((w >= tis_cap).astype(F32), valid)

    def agg(x):
        return aggregate_loss(
            x,
            valid,
            loss_agg,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
            horizon=horizon,
            row_weights=row_weights,
            chunk_responses=chunk_responses,
        )

    pg_loss = agg(token_losses)
    loss = pg_loss
    if ref_logprobs is not None:
        kl_tok = kl_penalty(logp, clean(ref_logprobs, "ref_logprobs"), kl_kind)
        kl_loss = agg(kl_tok)
        loss = loss + kl_coef * kl_loss
        metrics["kl"] = _masked_mean(kl_tok, valid)
        metrics["kl_loss"] = kl_loss
    if entropy is not None:
        metrics["entropy"] = _masked_mean(clean(entropy, "entropy"), valid)

    def frac(flags):
        return _masked_mean(flags.astype(F32), valid)

    ratio = info["ratio"]
    adv_mean = _masked_mean(adv, valid)
    metrics.update(
        {
            "loss": loss,
            "pg_loss": pg_loss,
            "pg_clipfrac": frac(info["clipped"]),
            "pg_clipfrac_low": frac(info["clipped_low"]),
            "pg_clipfrac_high": frac(info["clipped_high"]),
            "pg_clipfrac_dual": frac(info["dual_clipped"]),
            "approx_kl": _masked_mean(old - logp, valid),
            "ratio/mean": _masked_mean(ratio, valid),
            "ratio/max": _masked_max(ratio, valid),
            "ratio/min": _masked_min(ratio, valid),
            "advantages/mean": adv_mean,
            "advantages/std": jnp.sqrt(_masked_mean(jnp.square(adv - adv_mean), valid)),
            "advantages/max": _masked_max(adv, valid),
            "advantages/min": _masked_min(adv, valid),
        }
    )
    return loss, metrics
