"""PRIME's formulas as pure array functions, and the advantage-estimator registry.

This module is the contract described in ``PRIME_SPEC.md`` ("Formulas (the contract of
prime_jax/algo.py)"). Every function is a pure function of its array arguments (jax or numpy
arrays), returns float32 results and can be wrapped in ``jax.jit`` with the integer / string
configuration arguments (``n``, ``agg``, estimator ``name``) marked static.

Conventions
-----------
* ``B`` responses, ``T`` response positions (right padded), ``G = B // n`` prompts.
* Rows of one prompt are contiguous: rows ``[g*n, (g+1)*n)`` are prompt ``g``'s ``n`` samples.
* ``response_mask[b, t]`` is 1 (or True) on real response tokens (EOS included), 0 on padding.
* ``outcome[b]`` in ``[0, 1]`` is the verifier's score (fractional for partially passed code).

Reference: PRIME-RL/PRIME (veRL). Where the reference and this module could differ, the
docstring says which behaviour is implemented and why.

Degenerate inputs the reference does not define (it would produce NaN or raise) are made finite
here: a row without real tokens has row mean 0 in ``rloo``, receives no outcome token in
``outcome_token_rewards`` and is skipped by ``policy_loss``'s per-sequence mean; ``masked_whiten``
with fewer than two real tokens uses ``N/max(N-1, 1)`` as the Bessel factor and a count of at
least 1 for the mean.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp

from prime_jax.masked_arrays import _F32, _bool, _check_groups, _f32, _last_token_onehot, revcumsum
# The implicit PRM's half of the contract lives in its own module; re-exported here.
from prime_jax.prm_objectives import (GROUP_SCORE_LOSS_TYPES, PRM_LOSS_TYPES, dpo_abs_accuracy, dpo_accuracy,
                                      implicit_token_rewards, normalize_process_rewards,
                                      normalize_process_rewards_floored, prm_contrast_rows, prm_dpo_loss, prm_loss,
                                      prm_pair_weights, prm_pairwise_loss, process_ramp_gate, q_sums_by_outcome,
                                      ranking_ema)

__all__ = [
    "implicit_token_rewards",
    "normalize_process_rewards",
    "normalize_process_rewards_floored",
    "process_ramp_gate",
    "ranking_ema",
    "prm_loss",
    "rloo",
    "outcome_token_rewards",
    "prime_returns",
    "masked_whiten",
    "policy_loss",
    "accuracy_filter",
    "dpo_accuracy",
    "PRM_LOSS_TYPES",
    "GROUP_SCORE_LOSS_TYPES",
    "prm_contrast_rows",
    "prm_dpo_loss",
    "prm_pair_weights",
    "prm_pairwise_loss",
    "dpo_abs_accuracy",
    "q_sums_by_outcome",
    "revcumsum",
    "ADVANTAGE_ESTIMATORS",
    "register_advantage_estimator",
    "needs_prm",
    "compute_advantages",
]


# ----------------------------------------------------------------------------------------------
# the contract (the PRM's functions: prime_jax/prm_objectives.py)
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
    r = _f32(rewards)
    mask = _bool(reward_mask)
    B, T = r.shape
    G, n = _check_groups(B, n)
    r = jnp.where(mask, r, 0.0)
    count = jnp.sum(mask, axis=-1).astype(_F32)  # [B]
    row_mean = jnp.sum(r, axis=-1) / jnp.maximum(count, 1.0)  # [B]
    group_sum = jnp.sum(row_mean.reshape(G, n), axis=-1)  # [G]
    baseline = jnp.repeat(group_sum / (n - 1), n)[:, None]  # [B, 1]
    out = r * (n / (n - 1)) - baseline
    return jnp.where(mask, out, 0.0).astype(_F32)


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
    onehot = _last_token_onehot(response_mask)
    rewards = jnp.where(onehot, _f32(outcome)[:, None], 0.0).astype(_F32)
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
    mask = _bool(response_mask)
    mf = mask.astype(_F32)
    proc = rloo(process_rewards, mask, n)
    out_r, out_m = outcome_token_rewards(outcome, mask)
    outc = rloo(out_r, out_m, n)
    # Summed first, then one reverse cumsum: the reference's order of operations (equal to the
    # spec's sum of two revcumsums by linearity, and closest to the reference in float32).
    rewards = process_coef * proc + outcome_coef * outc
    return (revcumsum(rewards * mf) * mf).astype(_F32)


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
    v = _f32(values)
    m = _bool(mask).astype(_F32)
    N = jnp.sum(m)
    mean = jnp.sum(v * m) / jnp.maximum(N, 1.0)
    centered = v - mean
    var = jnp.sum(centered * centered * m) / jnp.maximum(N, 1.0)
    var = var * (N / jnp.maximum(N - 1.0, 1.0))
    return (centered / jnp.sqrt(var + eps) * m).astype(_F32)


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
    lp = _f32(logprobs)
    old = jax.lax.stop_gradient(_f32(old_logprobs))
    adv = jax.lax.stop_gradient(_f32(advantages))
    mb = _bool(response_mask)
    m = mb.astype(_F32)

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
        has = (row_count > 0).astype(_F32)
        loss = jnp.sum(row_loss * has) / jnp.maximum(jnp.sum(has), 1.0)

    sg = jax.lax.stop_gradient
    metrics = {
        "clip_frac": sg(jnp.sum((pg_losses2 > pg_losses).astype(_F32) * m) / n_tok).astype(_F32),
        "approx_kl": sg(jnp.sum(-log_ratio * m) / n_tok).astype(_F32),
        "ratio_max": sg(jnp.max(jnp.where(mb, ratio, -jnp.inf))).astype(_F32),
    }
    return loss.astype(_F32), metrics


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
    o = _f32(outcome)
    G, n = _check_groups(o.shape[0], n, need_two=False)
    acc = jnp.mean(o.reshape(G, n), axis=-1)
    return (acc >= jnp.asarray(low, _F32)) & (acc <= jnp.asarray(high, _F32))


# ----------------------------------------------------------------------------------------------
# advantage-estimator registry
# ----------------------------------------------------------------------------------------------
AdvantageEstimator = Callable[..., jax.Array]
ADVANTAGE_ESTIMATORS: Dict[str, AdvantageEstimator] = {}
#: Estimators that read no process rewards: a run with one trains no PRM and scores no reference.
PRM_FREE_ESTIMATORS: set = set()


def register_advantage_estimator(name: str, *, needs_prm: bool = True
                                 ) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: register ``fn`` under ``name`` in ``ADVANTAGE_ESTIMATORS``.

    An estimator is called as ``fn(*, process_rewards [B,T], outcome [B], response_mask [B,T],
    n, process_coef=1.0, outcome_coef=1.0) -> advantages [B,T]`` (float32, 0 on padding).
    needs_prm=False: it ignores ``process_rewards`` (see ``needs_prm``).
    """

    def deco(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGE_ESTIMATORS and ADVANTAGE_ESTIMATORS[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        (PRM_FREE_ESTIMATORS.discard if needs_prm else PRM_FREE_ESTIMATORS.add)(name)
        return fn

    return deco


def needs_prm(name: str) -> bool:
    """Whether the registered estimator ``name`` reads process rewards (an implicit PRM)."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise KeyError(f"unknown advantage estimator {name!r}; registered: {sorted(ADVANTAGE_ESTIMATORS)}")
    return name not in PRM_FREE_ESTIMATORS


def compute_advantages(
    name: str,
    *,
    process_rewards,
    outcome,
    response_mask,
    n: int,
    process_coef: float = 1.0,
    outcome_coef: float = 1.0,
) -> jax.Array:
    """Advantages ``[B, T]`` from the estimator registered as ``name`` (static).

    Args:
      name: a key of ``ADVANTAGE_ESTIMATORS`` (``"prime_rloo"`` is PRIME's default).
      process_rewards: ``[B, T]`` already-normalised implicit rewards q.
      outcome: ``[B]``.
      response_mask: ``[B, T]``.
      n: samples per prompt (static).
      process_coef, outcome_coef: weights of the two reward sources.
    Returns:
      ``[B, T]`` float32 advantages, 0 on padding.
    """
    try:
        fn = ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise KeyError(
            f"unknown advantage estimator {name!r}; registered: {sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None
    return fn(
        process_rewards=process_rewards,
        outcome=outcome,
        response_mask=response_mask,
        n=n,
        process_coef=process_coef,
        outcome_coef=outcome_coef,
    )


@register_advantage_estimator("prime_rloo")
def prime_rloo_advantages(
    *, process_rewards, outcome, response_mask, n, process_coef=1.0, outcome_coef=1.0
) -> jax.Array:
    """PRIME (the spec, the reference's ``rloo`` estimator).

    ``masked_whiten(prime_returns(process_rewards, outcome, mask, n, process_coef,
    outcome_coef), mask)``. Shapes: ``[B,T]``, ``[B]``, ``[B,T]`` -> ``[B,T]``.
    """
    ret = prime_returns(process_rewards, outcome, response_mask, n, process_coef, outcome_coef)
    return masked_whiten(ret, response_mask)


@register_advantage_estimator("outcome_rloo", needs_prm=False)
def outcome_rloo_advantages(
    *, process_rewards, outcome, response_mask, n, process_coef=1.0, outcome_coef=1.0
) -> jax.Array:
    """Outcome-only RLOO baseline (process rewards and ``process_coef`` ignored).

    ``masked_whiten(outcome_coef * revcumsum(rloo(outcome token rewards, n)) * mask, mask)``:
    every real token of response ``b`` carries ``r_b - mean_{j != b} r_j`` before whitening.
    Shapes: ``[B,T]``, ``[B]``, ``[B,T]`` -> ``[B,T]``.
    """
    del process_rewards, process_coef
    mf = _bool(response_mask).astype(_F32)
    out_r, out_m = outcome_token_rewards(outcome, response_mask)
    ret = outcome_coef * revcumsum(rloo(out_r, out_m, n) * mf) * mf
    return masked_whiten(ret, response_mask)


def _group_standardize(x, mask, n: int, eps: float = 1e-6) -> jax.Array:
    """Standardise ``x`` ``[B, T]`` per group over the group's masked entries.

    ``(x - mean_g) / (std_g + eps)`` at masked entries, 0 elsewhere; ``std_g`` is the unbiased
    (N-1) standard deviation, as ``torch.std`` in veRL's GRPO (N-1 floored at 1).
    """
    x = _f32(x)
    m = _bool(mask).astype(_F32)
    B, T = x.shape
    G, n = _check_groups(B, n, need_two=False)
    xg = x.reshape(G, n * T)
    mg = m.reshape(G, n * T)
    N = jnp.sum(mg, axis=-1, keepdims=True)
    mean = jnp.sum(xg * mg, axis=-1, keepdims=True) / jnp.maximum(N, 1.0)
    var = jnp.sum(((xg - mean) ** 2) * mg, axis=-1, keepdims=True) / jnp.maximum(N - 1.0, 1.0)
    z = (xg - mean) / (jnp.sqrt(var) + eps) * mg
    return z.reshape(B, T)


@register_advantage_estimator("prime_grpo")
def prime_grpo_advantages(
    *, process_rewards, outcome, response_mask, n, process_coef=1.0, outcome_coef=1.0
) -> jax.Array:
    """GRPO with implicit process rewards (paper section "PRIME with other RL algorithms").

    * outcome term: ``(r_b - mean_g r) / (std_g r + 1e-6)`` with the unbiased group std (as
      veRL's GRPO), placed on the last real token and turned into returns-to-go, so every real
      token of response ``b`` carries it;
    * process term: token rewards standardised per group (mean / unbiased std over all real
      tokens of the group's ``n`` responses, ``+1e-6``), then reverse cumulative sum;
    * ``A = (outcome_coef * outcome term + process_coef * process term) * mask``, not whitened
      (GRPO's group standardisation replaces whitening).

    Shapes: ``[B,T]``, ``[B]``, ``[B,T]`` -> ``[B,T]``.
    """
    mask = _bool(response_mask)
    mf = mask.astype(_F32)
    o = _f32(outcome)
    B = o.shape[0]
    G, n = _check_groups(B, n)
    og = o.reshape(G, n)
    mean = jnp.mean(og, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.sum((og - mean) ** 2, axis=-1, keepdims=True) / (n - 1))
    z_out = ((og - mean) / (std + 1e-6)).reshape(B)
    out_r, _ = outcome_token_rewards(z_out, mask)
    outcome_term = revcumsum(out_r)
    process_term = revcumsum(_group_standardize(process_rewards, mask, n))
    return ((outcome_coef * outcome_term + process_coef * process_term) * mf).astype(_F32)


@register_advantage_estimator("prime_reinforce")
def prime_reinforce_advantages(
    *, process_rewards, outcome, response_mask, n, process_coef=1.0, outcome_coef=1.0
) -> jax.Array:
    """REINFORCE with implicit process rewards: ``A_t = r_o + sum_{s >= t} r_phi(y_s)``.

    ``A = (outcome_coef * outcome[b] + process_coef * revcumsum(q * mask)) * mask``. No baseline
    and no whitening, as the paper's formula states (``n`` is unused). Shapes: ``[B,T]``, ``[B]``,
    ``[B,T]`` -> ``[B,T]``.
    """
    del n
    mf = _bool(response_mask).astype(_F32)
    q = _f32(process_rewards) * mf
    adv = outcome_coef * _f32(outcome)[:, None] + process_coef * revcumsum(q)
    return (adv * mf).astype(_F32)
