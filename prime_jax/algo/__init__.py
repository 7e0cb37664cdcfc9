"""PRIME's formulas as pure array functions, and the advantage-estimator registry.

This package is the contract described in ``PRIME_SPEC.md`` ("Formulas (the contract of
prime_jax/algo.py)"); every public name is importable from ``prime_jax.algo``. Its rooms:
``policy_objectives`` (RLOO, returns, whitening, PPO-clip, the accuracy filter), ``prm_objectives``
(the implicit PRM's q, its normalisation, losses and ranking metrics), ``estimators`` (the
advantage-estimator registry) and ``masked_arrays`` (the masked-array helpers they share).

Every function is a pure function of its array arguments (jax or numpy arrays), returns float32
results and can be wrapped in ``jax.jit`` with the integer / string configuration arguments
(``n``, ``agg``, estimator ``name``) marked static.

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

from prime_jax.algo.estimators import (ADVANTAGE_ESTIMATORS, compute_advantages, uses_process_rewards,
                                       register_advantage_estimator)
from prime_jax.algo.masked_arrays import revcumsum
from prime_jax.algo.policy_objectives import (accuracy_filter, masked_whiten, outcome_token_rewards, policy_loss,
                                              prime_returns, rloo)
from prime_jax.algo.prm_objectives import (GROUP_SCORE_LOSS_TYPES, PRM_LOSS_TYPES, dpo_abs_accuracy, dpo_accuracy,
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
    "uses_process_rewards",
    "compute_advantages",
]
