"""The policy's side of PRIME: leave-one-out baselines, returns, whitening, the PPO-clip loss and the
accuracy filter.

Pure array functions (jax or numpy arrays in, float32 out), part of the contract in ``PRIME_SPEC.md``
(re-exported by ``prime_jax.algo``, whose docstring states the conventions and degenerate-input rules).
"""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from prime_jax.algo.masked_arrays import F32, as_bool, as_f32, check_groups, last_token_onehot, revcumsum


# ----------------------------------------------------------------------------------------------
# the policy's half of the contract (the PRM's: prime_jax/algo/prm_objectives.py)
# ----------------------------------------------------------------------------------------------
def rloo(rewards, reward_mask, n: int) -> jax.Array:
    """Leave-one-out baseline as in PRIME's ``masked_rloo``.

    Per row ``m_b`` = mean of ``rewards[b]`` over positions where ``reward_mask[b]`` is set; per
    group ``S_g = sum_{b in g} m_b``. At masked positions the output is
    ``rewards * n/(n-1) - S_g/(n-1)``, elsewhere 0. With one reward per row this is exactly
    ``r_b - mean_{j != b} r_j``. A row with no masked position has ``m_b = 0`` (the reference
    would produce NaN).

    Args:
      rewards: ``[B, T]``.
      reward_mask: ``[B, T]`` bool (or 0/1).
      n: samples per prompt (static, >= 2); rows of a group are contiguous.
    Returns:
      ``[B, T]`` float32.
    """
    r = as_f32(rewards)
    mask = as_bool(reward_mask)
    B, T = r.shape
    G, n = check_groups(B, n)
    r = jnp.where(mask, r, 0.0)
    count = jnp.sum(mask, axis=-1).astype(F32)  # [B]
    row_mean = jnp.sum(r, axis=-1) / jnp.maximum(count, 1.0)  # [B]
    group_sum = jnp.sum(row_mean.reshape(G, n), axis=-1)  # [G]
    baseline = jnp.repeat(group_sum / (n - 1), n)[:, None]  # [B, 1]
    out = r * (n / (n - 1)) - baseline
    return jnp.where(mask, out, 0.0).astype(F32)


def outcome_token_rewards(outcome, response_mask) -> Tuple[jax.Array, jax.Array]:
    """Place each response's outcome on its last real token.

    Args:
      outcome: ``[B]`` verifier scores.
      response_mask: ``[B, T]``.
    Returns:
      ``(rewards [B, T] float32, reward_mask [B, T] bool)``: ``outcome[b]`` at the last position
      where ``response_mask[b]`` is set, 0 elsewhere; ``reward_mask`` is True only there (a row
      without real tokens gets no reward position).
    """
    onehot = last_token_onehot(response_mask)
    rewards = jnp.where(onehot, as_f32(outcome)[:, None], 0.0).astype(F32)
    return rewards, onehot


def prime_returns(
    process_rewards,
    outcome,
    response_mask,
    n: int,
    process_coef: float = 1.0,
    outcome_coef: float = 1.0,
) -> jax.Array:
    """PRIME's returns: RLOO on each reward source, summed, reverse cumulative sum (gamma 1).

    ``process_coef * revcumsum(rloo(process_rewards, mask, n)) + outcome_coef *
    revcumsum(rloo(*outcome_token_rewards(outcome, mask), n))``, times mask.

    Args:
      process_rewards: ``[B, T]`` normalised implicit rewards q.
      outcome: ``[B]``.
      response_mask: ``[B, T]``.
      n: samples per prompt (static).
      process_coef, outcome_coef: weights of the two sources (reference: 5 and 5).
    Returns:
      ``[B, T]`` float32 returns, 0 on padding.
    """
    mask = as_bool(response_mask)
    mf = mask.astype(F32)
    proc = rloo(process_rewards, mask, n)
    out_r, out_m = outcome_token_rewards(outcome, mask)
    outc = rloo(out_r, out_m, n)
    # Summed first, then one reverse cumsum: the reference's order of operations (equal to the
    # spec's sum of two revcumsums by linearity, and closest to the reference in float32).
    rewards = process_coef * proc + outcome_coef * outc
    return (revcumsum(rewards * mf) * mf).astype(F32)


def masked_whiten(values, mask, eps: float = 1e-8) -> jax.Array:
    """Whiten over all masked entries of the batch (veRL's ``masked_whiten``), then mask.

    ``mean = sum(v*m)/N``, ``var = sum((v-mean)^2 * m)/N * N/(N-1)`` (unbiased, as veRL's
    ``masked_var``), ``out = (v - mean) / sqrt(var + eps) * m``. For ``N < 2`` (the reference
    raises) the Bessel factor is ``N/max(N-1, 1)`` and the mean uses ``max(N, 1)``.

    Args:
      values: ``[B, T]``.
      mask: ``[B, T]``.
      eps: added to the variance.
    Returns:
      ``[B, T]`` float32, 0 on padding.
    """
    v = as_f32(values)
    m = as_bool(mask).astype(F32)
    N = jnp.sum(m)
    mean = jnp.sum(v * m) / jnp.maximum(N, 1.0)
    centered = v - mean
    var = jnp.sum(centered * centered * m) / jnp.maximum(N, 1.0)
    var = var * (N / jnp.maximum(N - 1.0, 1.0))
    return (centered / jnp.sqrt(var + eps) * m).astype(F32)


def policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    response_mask,
    clip_eps: float = 0.2,
    agg: str = "seq-mean-token-mean",
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """PPO-clip policy loss (no KL, no entropy).

    ``ratio = exp(logprobs - old_logprobs)``; per token ``pg = max(-A*ratio, -A*clip(ratio,
    1-eps, 1+eps))``.

    * ``agg="seq-mean-token-mean"``: mean over each response's real tokens, then mean over the
      responses (rows without real tokens are left out of the second mean).
    * ``agg="token-mean"``: mean over all real tokens of the batch.

    Metrics, all masked means over all real tokens of the batch (veRL's definitions), whatever
    ``agg`` is: ``clip_frac`` = fraction with ``-A*clip(ratio) > -A*ratio``; ``approx_kl`` =
    ``old_logprobs - logprobs``; ``ratio_max`` = max ratio over real tokens.

    Gradients flow only through ``logprobs``.

    Args:
      logprobs: ``[B, T]`` current policy log-probs.
      old_logprobs: ``[B, T]`` rollout policy log-probs.
      advantages: ``[B, T]``.
      response_mask: ``[B, T]``.
      clip_eps: PPO clip range.
      agg: ``"seq-mean-token-mean"`` or ``"token-mean"`` (static).
    Returns:
      ``(loss scalar float32, {"clip_frac", "approx_kl", "ratio_max"} scalars float32)``.
    """
    if agg not in ("seq-mean-token-mean", "token-mean"):
        raise ValueError(f"unknown agg {agg!r}; expected 'seq-mean-token-mean' or 'token-mean'")
    lp = as_f32(logprobs)
    old = jax.lax.stop_gradient(as_f32(old_logprobs))
    adv = jax.lax.stop_gradient(as_f32(advantages))
    mb = as_bool(response_mask)
    m = mb.astype(F32)

    log_ratio = lp - old
    ratio = jnp.exp(log_ratio)
    pg_losses = -adv * ratio
    pg_losses2 = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = jnp.maximum(pg_losses, pg_losses2)

    n_tok = jnp.maximum(jnp.sum(m), 1.0)
    if agg == "token-mean":
        loss = jnp.sum(per_token * m) / n_tok
    else:
        row_count = jnp.sum(m, axis=-1)  # [B]
        row_loss = jnp.sum(per_token * m, axis=-1) / jnp.maximum(row_count, 1.0)
        has = (row_count > 0).astype(F32)
        loss = jnp.sum(row_loss * has) / jnp.maximum(jnp.sum(has), 1.0)

    sg = jax.lax.stop_gradient
    metrics = {
        "clip_frac": sg(jnp.sum((pg_losses2 > pg_losses).astype(F32) * m) / n_tok).astype(F32),
        "approx_kl": sg(jnp.sum(-log_ratio * m) / n_tok).astype(F32),
        "ratio_max": sg(jnp.max(jnp.where(mb, ratio, -jnp.inf))).astype(F32),
    }
    return loss.astype(F32), metrics


def accuracy_filter(outcome, n: int, low: float = 0.2, high: float = 0.8) -> jax.Array:
    """Which prompts to keep: mean outcome over the group's ``n`` samples in ``[low, high]``.

    Both bounds inclusive; the mean is computed in float32 and compared with the bounds as
    float32 (as the reference's torch comparison does).

    Args:
      outcome: ``[B]`` with ``B = G*n``, groups contiguous.
      n: samples per prompt (static, >= 1).
      low, high: inclusive bounds.
    Returns:
      ``[G]`` bool.
    """
    o = as_f32(outcome)
    G, n = check_groups(o.shape[0], n, need_two=False)
    acc = jnp.mean(o.reshape(G, n), axis=-1)
    return (acc >= jnp.asarray(low, F32)) & (acc <= jnp.asarray(high, F32))
