"""What the policy's advantages are made of: the step's process rewards q, normalised and weighted
(algo.process_ramp's scale), turned into advantages by the configured estimator (`algo.compute_advantages`),
with the summary numbers the step logs - one jitted program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from prime_jax import algo


@functools.partial(jax.jit, static_argnames=("estimator", "n", "process_coef", "outcome_coef", "normalize", "norm_floor"))
def process_rewards_and_advantages(q, outcome, response_mask, process_scale=None, *, estimator: str, n: int,
                                   process_coef: float, outcome_coef: float, normalize: bool = True,
                                   norm_floor: float = 0.0):
    """Normalised process rewards (times process_scale, the ramp's weight), advantages (estimator from
    config) and their summary numbers. norm_floor > 0: algo.normalize_process_rewards_floored."""
    if normalize:
        q = (algo.normalize_process_rewards_floored(q, response_mask, norm_floor) if norm_floor
             else algo.normalize_process_rewards(q, response_mask))
    q_norm = q if process_scale is None else q * process_scale  # None: the spec (no ramp), the graph without it
    advantages = algo.compute_advantages(estimator, process_rewards=q_norm, outcome=outcome,
                                         response_mask=response_mask, n=n, process_coef=process_coef,
                                         outcome_coef=outcome_coef)
    mask = response_mask.astype(jnp.float32)
    proc_returns = algo.revcumsum(algo.rloo(q_norm, mask, n) * mask) * mask
    out_r, out_m = algo.outcome_token_rewards(outcome, response_mask)
    out_returns = algo.revcumsum(algo.rloo(out_r, out_m, n) * mask) * mask
    tokens = jnp.maximum(mask.sum(), 1.0)
    stats = {
        "returns/process_mean": (proc_returns * mask).sum() / tokens,
        "returns/outcome_mean": (out_returns * mask).sum() / tokens,
        "rewards/process_sum_mean": (q_norm * mask).sum(1).mean(),
    }
    return q_norm, advantages, stats
