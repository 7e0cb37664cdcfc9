"""The advantage-estimator registry: PRIME's RLOO (the spec) and its variants (outcome-only RLOO,
GRPO and REINFORCE with process rewards), each registered with whether it reads process rewards.

Estimators are pure array functions (re-exported by ``prime_jax.algo``); ``compute_advantages(name,
...)`` dispatches on the static name, so ablations add an estimator here and leave the loop alone.
"""

from __future__ import annotations

from typing import Callable, Dict

import jax
import jax.numpy as jnp

from prime_jax.algo.masked_arrays import F32, as_bool, as_f32, check_groups, revcumsum
from prime_jax.algo.policy_objectives import masked_whiten, outcome_token_rewards, prime_returns, rloo

# ----------------------------------------------------------------------------------------------
# advantage-estimator registry
# ----------------------------------------------------------------------------------------------
AdvantageEstimator = Callable[..., jax.Array]
ADVANTAGE_ESTIMATORS: Dict[str, AdvantageEstimator] = {}
#: Estimators that read no process rewards: a run with one trains no PRM and scores no reference.
OUTCOME_ONLY_ESTIMATORS: set = set()


def register_advantage_estimator(name: str, *, uses_process_rewards: bool = True
                                 ) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: register ``fn`` under ``name`` in ``ADVANTAGE_ESTIMATORS``.

    An estimator is called as ``fn(*, process_rewards [B,T], outcome [B], response_mask [B,T],
    n, process_coef=1.0, outcome_coef=1.0) -> advantages [B,T]`` (float32, 0 on padding).
    uses_process_rewards=False: it ignores ``process_rewards`` (see ``uses_process_rewards``).
    """

    def deco(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGE_ESTIMATORS and ADVANTAGE_ESTIMATORS[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        (OUTCOME_ONLY_ESTIMATORS.discard if uses_process_rewards else OUTCOME_ONLY_ESTIMATORS.add)(name)
        return fn

    return deco


def _registered(name: str) -> AdvantageEstimator:
    """The estimator registered as ``name``; a KeyError listing the registered names otherwise."""
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise KeyError(
            f"unknown advantage estimator {name!r}; registered: {sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None


def uses_process_rewards(name: str) -> bool:
    """Whether the registered estimator ``name`` reads process rewards (an implicit PRM)."""
    _registered(name)
    return name not in OUTCOME_ONLY_ESTIMATORS


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
    return _registered(name)(
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


@register_advantage_estimator("outcome_rloo", uses_process_rewards=False)
def outcome_rloo_advantages(
    *, process_rewards, outcome, response_mask, n, process_coef=1.0, outcome_coef=1.0
) -> jax.Array:
    """Outcome-only RLOO baseline (process rewards and ``process_coef`` ignored).

    ``masked_whiten(outcome_coef * revcumsum(rloo(outcome token rewards, n)) * mask, mask)``:
    every real token of response ``b`` carries ``r_b - mean_{j != b} r_j`` before whitening.
    Shapes: ``[B,T]``, ``[B]``, ``[B,T]`` -> ``[B,T]``.
    """
    del process_rewards, process_coef
    mf = as_bool(response_mask).astype(F32)
    out_r, out_m = outcome_token_rewards(outcome, response_mask)
    ret = outcome_coef * revcumsum(rloo(out_r, out_m, n) * mf) * mf
    return masked_whiten(ret, response_mask)


def _group_standardize(x, mask, n: int, eps: float = 1e-6) -> jax.Array:
    """Standardise ``x`` ``[B, T]`` per group over the group's masked entries.

    ``(x - mean_g) / (std_g + eps)`` at masked entries, 0 elsewhere; ``std_g`` is the unbiased
    (N-1) standard deviation, as ``torch.std`` in veRL's GRPO (N-1 floored at 1).
    """
    x = as_f32(x)
    m = as_bool(mask).astype(F32)
    B, T = x.shape
    G, n = check_groups(B, n, need_two=False)
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
    mask = as_bool(response_mask)
    mf = mask.astype(F32)
    o = as_f32(outcome)
    B = o.shape[0]
    G, n = check_groups(B, n)
    og = o.reshape(G, n)
    mean = jnp.mean(og, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.sum((og - mean) ** 2, axis=-1, keepdims=True) / (n - 1))
    z_out = ((og - mean) / (std + 1e-6)).reshape(B)
    out_r, _ = outcome_token_rewards(z_out, mask)
    outcome_term = revcumsum(out_r)
    process_term = revcumsum(_group_standardize(process_rewards, mask, n))
    return ((outcome_coef * outcome_term + process_coef * process_term) * mf).astype(F32)


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
    mf = as_bool(response_mask).astype(F32)
    q = as_f32(process_rewards) * mf
    adv = outcome_coef * as_f32(outcome)[:, None] + process_coef * revcumsum(q)
    return (adv * mf).astype(F32)
