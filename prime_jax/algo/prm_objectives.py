"""The implicit PRM's side of PRIME: its token rewards, their normalisation, its losses and its ranking metrics.

Pure array functions (jax or numpy arrays in, float32 out), part of the contract in ``PRIME_SPEC.md``;
``prime_jax.algo`` re-exports every public name here, so ``from prime_jax.algo import prm_loss`` and
the other contract imports work. Conventions as in ``prime_jax.algo``: ``[B, T]`` right-padded
rows, ``response_mask`` 1 on real tokens, groups of ``n`` contiguous rows, ``outcome`` in ``[0, 1]``.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from prime_jax.algo.masked_arrays import F32, as_f32, check_groups, revcumsum


def implicit_token_rewards(prm_logprobs, ref_logprobs, response_mask) -> jax.Array:
    """Implicit process rewards ``q = (prm_logprobs - ref_logprobs) * mask``.

    The paper scales by beta; the reference code does not (normalisation removes the scale).

    Args:
      prm_logprobs: ``[B, T]`` log-probs of the sampled tokens under the PRM.
      ref_logprobs: ``[B, T]`` log-probs of the same tokens under the frozen reference.
      response_mask: ``[B, T]`` 1 on real response tokens.
    Returns:
      ``[B, T]`` float32 ``q``, 0 on padding.
    """
    return (as_f32(prm_logprobs) - as_f32(ref_logprobs)) * as_f32(response_mask)


def normalize_process_rewards(q, response_mask) -> jax.Array:
    """PRIME's "batch_norm": divide by the batch's largest absolute suffix sum.

    ``q / (max_{b,t} |sum_{s >= t} q[b,s] * mask[b,s]| + 1e-6)``, so every suffix sum of the
    (masked) result lies in ``[-1, 1]``. The maximum is taken over the whole batch (the reference
    takes it per data-parallel shard). ``q`` is expected to be masked already (as returned by
    ``implicit_token_rewards``); the result is ``q`` scaled, not re-masked.

    Args:
      q: ``[B, T]`` token rewards.
      response_mask: ``[B, T]``.
    Returns:
      ``[B, T]`` float32.
    """
    q = as_f32(q)
    suffix = revcumsum(q * as_f32(response_mask))
    return q / (jnp.max(jnp.abs(suffix)) + 1e-6)


def normalize_process_rewards_floored(q, response_mask, floor: float) -> jax.Array:
    """``normalize_process_rewards`` with a floor on the divisor: ``q / (max(M, floor) + 1e-6)``.

    ``M = max_{b,t} |sum_{s>=t} q[b,s] * mask[b,s]|`` (nats). A documented departure from the spec
    (``algo.process_norm_floor``; 0 gives the spec's formula exactly). The spec's divisor lifts q to
    O(1) whatever its size: on the first step, where the PRM still equals its reference, q is float
    round-off (~1e-6 nats) and the spec's division turns it into full-strength noise. With a floor,
    a PRM that has moved less than ``floor`` nats from its reference hands the policy its rewards at
    their true, small size (suffix sums below ``M / floor``), and one that has moved further is
    normalised as in the spec.

    Args:
      q: ``[B, T]`` masked token rewards; response_mask: ``[B, T]``; floor: nats, >= 0.
    Returns:
      ``[B, T]`` float32.
    """
    q = as_f32(q)
    suffix = revcumsum(q * as_f32(response_mask))
    return q / (jnp.maximum(jnp.max(jnp.abs(suffix)), jnp.asarray(floor, F32)) + 1e-6)


def ranking_ema(previous, ranking, decay: float) -> jax.Array:
    """One step of the exponential moving average of the PRM's fresh-sample ranking.

    ``decay * previous + (1 - decay) * ranking``; start ``previous`` at 0.5 (chance). Scalars.
    """
    return (decay * as_f32(previous) + (1.0 - decay) * as_f32(ranking)).astype(F32)


def process_ramp_gate(ranking, low: float, high: float) -> jax.Array:
    """The weight of the process rewards as the PRM's ranking rises (``algo.process_ramp="ranking"``).

    ``clip((ranking - low) / (high - low), 0, 1)``: 0 while the PRM ranks fresh samples no better than
    ``low`` (chance is 0.5), 1 from ``high`` on, linear between. Not in the reference (a documented
    departure): PRIME's normalisation gives the process rewards full strength from the first step,
    and on the CPU demo the policy learnt to exploit a PRM that still anti-ranked.

    Args:
      ranking: scalar (the moving average of ``dpo_accuracy`` on fresh samples); low < high.
    Returns:
      scalar float32 in ``[0, 1]``.
    """
    return jnp.clip((as_f32(ranking) - low) / (high - low), 0.0, 1.0).astype(F32)


def prm_loss(prm_logprobs, ref_logprobs, response_mask, outcome, beta: float = 0.05) -> jax.Array:
    """Cross-entropy loss of the implicit PRM on the outcome labels.

    ``s_b = beta * sum_t q[b,t]``, ``loss = mean_b -[y_b log sigmoid(s_b) + (1-y_b) log
    sigmoid(-s_b)]`` with ``q = (prm_logprobs - ref_logprobs) * mask``. Gradients flow only
    through ``prm_logprobs`` (``ref_logprobs`` is wrapped in ``stop_gradient``). Fractional
    outcomes are soft labels. (The reference applies ``binary_cross_entropy`` to ``sigmoid(s)``,
    whose log is clamped at -100; ``log_sigmoid`` as the spec asks differs only for |s| > ~100.)

    Args:
      prm_logprobs: ``[B, T]``.
      ref_logprobs: ``[B, T]`` (no gradient).
      response_mask: ``[B, T]``.
      outcome: ``[B]`` labels in ``[0, 1]``.
      beta: scale of the implicit reward (reference default 0.05).
    Returns:
      scalar float32 loss.
    """
    ref = jax.lax.stop_gradient(as_f32(ref_logprobs))
    y = jax.lax.stop_gradient(as_f32(outcome))
    q = implicit_token_rewards(prm_logprobs, ref, response_mask)
    s = beta * jnp.sum(q, axis=-1)  # [B]
    nll = -(y * jax.nn.log_sigmoid(s) + (1.0 - y) * jax.nn.log_sigmoid(-s))
    return jnp.mean(nll).astype(F32)


def dpo_accuracy(q, response_mask, outcome, n: int) -> jax.Array:
    """PRM ranking accuracy (reference ``compute_dpo_accuracy``), a metric.

    Per group: ``s_b = sum_t q[b,t]*mask[b,t]``; over pairs ``i < j`` of the group with
    ``d_ij = outcome_i - outcome_j`` the group accuracy is
    ``sum_ij [(s_i - s_j > 0) == (d_ij > 0)] * |d_ij| / sum_ij |d_ij|`` (pairs weighted by their
    outcome gap, so with 0/1 outcomes: the fraction of differing pairs ordered like the
    outcomes), and 0.5 for a group with no differing pair. The result is the mean over groups.

    Ties in ``s`` follow the reference exactly: the comparison is ``(s_i - s_j > 0) ==
    (d_ij > 0)`` for ``i < j``, so a tied pair counts as right when the lower-indexed sample has
    the lower outcome and as wrong otherwise.

    Args:
      q: ``[B, T]`` implicit token rewards.
      response_mask: ``[B, T]``.
      outcome: ``[B]``.
      n: samples per prompt (static).
    Returns:
      scalar float32 in ``[0, 1]``.
    """
    qm = as_f32(q) * as_f32(response_mask)
    o = as_f32(outcome)
    G, n = check_groups(qm.shape[0], n, need_two=False)
    s = jnp.sum(qm, axis=-1).reshape(G, n)
    a = o.reshape(G, n)
    ds = s[:, :, None] - s[:, None, :]  # [G, n, n], [i, j] = s_i - s_j
    da = a[:, :, None] - a[:, None, :]
    upper = jnp.triu(jnp.ones((n, n), dtype=jnp.bool_), k=1)[None]
    w = jnp.where(upper, jnp.abs(da), 0.0)
    right = ((ds > 0) == (da > 0)).astype(F32)
    wsum = jnp.sum(w, axis=(1, 2))
    acc = jnp.where(wsum == 0, 0.5, jnp.sum(right * w, axis=(1, 2)) / jnp.where(wsum == 0, 1.0, wsum))
    return jnp.mean(acc).astype(F32)


# ----------------------------------------------------------------------------------------------
# PRM loss types of the veRL port (recipe/prime, prime_core_algos.py) and PRM diagnostics
# ----------------------------------------------------------------------------------------------
#: ``ce``: ``prm_loss``; ``dpo``: ``prm_dpo_loss``; ``bon_acc`` / ``bon_rm``: its best-of-n weightings;
#: ``pairwise``: ``prm_pairwise_loss`` (not in the reference; see its docstring).
PRM_LOSS_TYPES = ("ce", "dpo", "bon_acc", "bon_rm", "pairwise")
#: The loss types that read group scores from a scoring pass before the PRM's updates (veRL's ``Q_bc``):
#: they need ``algo.prm_update="reverse"``, the mode that runs that pass, as in the veRL port.
GROUP_SCORE_LOSS_TYPES = ("dpo", "bon_acc", "bon_rm")


def _contrast_matrix(outcome, n: int) -> jax.Array:
    """``[G, n, n]`` bool, ``[g, i, j]`` True when row j of group g is row i's contrast row.

    The reference's rule: for ``y_i > 0`` the rows with a lower score, otherwise the rows with a
    higher one; with 0/1 outcomes, exactly the rows of the opposite label.
    """
    a = as_f32(outcome)
    G, n = check_groups(a.shape[0], n, need_two=False)
    a = a.reshape(G, n)
    ai, aj = a[:, :, None], a[:, None, :]
    return jnp.where(ai > 0, aj < ai, aj > ai)


def prm_contrast_rows(outcome, n: int) -> jax.Array:
    """Which rows have a contrast row in their group (the others meet ``Sbar = 0`` in ``prm_dpo_loss``).

    Args:
      outcome: ``[B]`` labels, groups of ``n`` contiguous rows.
      n: samples per prompt (static).
    Returns:
      ``[B]`` bool.
    """
    return jnp.any(_contrast_matrix(outcome, n), axis=-1).reshape(-1)


def prm_dpo_loss(prm_logprobs, ref_logprobs, response_mask, outcome, group_scores, n: int,
                 beta: float = 0.05, bon_mode: str = "none") -> jax.Array:
    """The ``dpo`` PRM loss and its best-of-n variants (veRL port, ``compute_detach_dpo_loss_rm``).

    With ``s_i = beta * sum_t q[i,t]`` (gradient through ``prm_logprobs`` only) and the detached
    scores ``S_j = beta * group_scores[j]`` from the scoring pass before the PRM's updates (veRL's
    ``Q_bc``, which only its ``reverse`` mode computes; ``algo.prm_update="reverse"`` here):
    ``Sbar_i`` = mean of ``S_j`` over row i's contrast rows (for ``y_i > 0`` the group's rows with
    a lower score, else those with a higher one; for 0/1 outcomes the opposite label), and
    ``Sbar_i = 0`` for a row without any (``prm_contrast_rows`` False: an all-correct or all-wrong
    group, or the lowest positive score of a fractional one), which still counts, as in veRL;
    ``l_i = -log sigmoid((s_i - Sbar_i) * (2*[y_i > 0] - 1))``. Within a group that has both
    labels, a shift of sum q common to the group costs nothing.

    * ``bon_mode="none"`` (``dpo``): ``mean_i l_i`` over all rows;
    * ``"bon_acc"``: ``mean_i w_i * l_i`` with ``w_i = n * mean_j([y_j <= y_i])^(n-1)``;
    * ``"bon_rm"``: ``mean_i w_i * l_i`` with ``w_i = n * mean_j([S_j <= s_i])^(n-1)`` (``s_i``
      detached in the weight); j runs over the group, i itself included, as in the reference.

    The bon_* terms are a mean over the rows, as veRL's normalisation gives them: it sums ``w_i l_i``
    over a micro-batch and divides by the micro-batches per mini-batch, so with its one row per
    micro-batch (``recipe/prime/run_prime_qwen.sh``: ``micro_batch_size_per_gpu=1``) the result is
    the mean over the mini-batch (a micro-batch of m rows would scale it by m).

    Args:
      prm_logprobs: ``[B, T]`` PRM log-probs (raw logits).
      ref_logprobs: ``[B, T]`` reference log-probs (no gradient).
      response_mask: ``[B, T]``.
      outcome: ``[B]`` labels in ``[0, 1]``.
      group_scores: ``[B]`` detached ``sum_t q`` of every row from the scoring pass (no gradient).
      n: samples per prompt (static).
      beta: implicit-reward scale.
      bon_mode: ``"none"``, ``"bon_acc"`` or ``"bon_rm"`` (static).
    Returns:
      scalar float32 loss.
    """
    if bon_mode not in ("none", "bon_acc", "bon_rm"):
        raise ValueError(f"unknown bon_mode {bon_mode!r}; expected 'none', 'bon_acc' or 'bon_rm'")
    sg = jax.lax.stop_gradient
    y = sg(as_f32(outcome))
    G, n = check_groups(y.shape[0], n, need_two=False)
    q = implicit_token_rewards(prm_logprobs, sg(as_f32(ref_logprobs)), response_mask)
    s = beta * jnp.sum(q, axis=-1)  # [B]
    S = beta * sg(as_f32(group_scores)).reshape(G, n)  # [G, n]
    contrast = _contrast_matrix(y, n)  # [G, n, n]
    count = jnp.sum(contrast, axis=-1).astype(F32)  # [G, n]
    other = jnp.sum(jnp.where(contrast, S[:, None, :], 0.0), axis=-1) / jnp.maximum(count, 1.0)  # 0 without any
    sign = jnp.where(y > 0, 1.0, -1.0)
    row_loss = -jax.nn.log_sigmoid((s - other.reshape(-1)) * sign)
    if bon_mode == "none":
        return jnp.mean(row_loss).astype(F32)
    if bon_mode == "bon_acc":
        a = y.reshape(G, n)
        frac = jnp.mean((a[:, None, :] <= a[:, :, None]).astype(F32), axis=-1)  # [G, n] over j
    else:
        si = sg(s).reshape(G, n)
        frac = jnp.mean((S[:, None, :] <= si[:, :, None]).astype(F32), axis=-1)
    weight = n * frac.reshape(-1) ** (n - 1)
    return jnp.mean(weight * row_loss).astype(F32)


def prm_pair_weights(outcome, n: int) -> jax.Array:
    """``[G, n, n]`` float32 pair weights ``max(y_i - y_j, 0)`` within each group (row i better than j).

    The weights of ``prm_pairwise_loss``, the same as ``dpo_accuracy``'s ``|d_ij|`` over ordered pairs.
    """
    y = as_f32(outcome)
    G, n = check_groups(y.shape[0], n, need_two=False)
    y = y.reshape(G, n)
    return jnp.maximum(y[:, :, None] - y[:, None, :], 0.0)


def prm_pairwise_loss(prm_logprobs, ref_logprobs, response_mask, outcome, n: int, beta: float = 0.05) -> jax.Array:
    """Bradley-Terry loss on the group's (better, worse) pairs: the differentiable ``dpo_accuracy``.

    ``s_i = beta * sum_t q[i,t]``; ``loss = sum_{g,i,j} w_ij * -log sigmoid(s_i - s_j) / sum w_ij`` with
    ``w_ij = max(y_i - y_j, 0)`` over the pairs of each group (0 when no pair differs). Both sides
    carry gradient, so every pair pushes its better response up and its worse one down by the same
    amount: the gradient of a shift of sum q common to a group is exactly 0, whatever the group's
    mix of labels. (``ce`` and the reference's ``dpo``, whose other-side scores are detached, push
    each row on its own, so a group with more correct than wrong rows pushes the likelihood of all
    its samples up; on the CPU demo that flattening made the PRM anti-rank. Not in the reference.)

    Args:
      prm_logprobs: ``[B, T]``; ref_logprobs: ``[B, T]`` (no gradient); response_mask: ``[B, T]``;
      outcome: ``[B]``; n: samples per prompt (static); beta: implicit-reward scale.
    Returns:
      scalar float32 loss.
    """
    y = jax.lax.stop_gradient(as_f32(outcome))
    G, n = check_groups(y.shape[0], n, need_two=False)
    q = implicit_token_rewards(prm_logprobs, jax.lax.stop_gradient(as_f32(ref_logprobs)), response_mask)
    s = (beta * jnp.sum(q, axis=-1)).reshape(G, n)
    w = prm_pair_weights(y, n)
    nll = -jax.nn.log_sigmoid(s[:, :, None] - s[:, None, :])
    return (jnp.sum(w * nll) / jnp.maximum(jnp.sum(w), 1e-12)).astype(F32)


def dpo_abs_accuracy(q, response_mask, outcome) -> jax.Array:
    """The veRL port's ``dpo_abs_accuracy`` (metric): ``mean_b [sign(sum_t q) == sign(2*y_b - 1)]``.

    It asks whether a response's summed implicit reward alone has the right sign (no group
    comparison); ``sign(0) = 0``, so a zero sum matches only a score of exactly 0.5.

    Args:
      q: ``[B, T]``; response_mask: ``[B, T]``; outcome: ``[B]``.
    Returns:
      scalar float32 in ``[0, 1]``.
    """
    s = jnp.sum(as_f32(q) * as_f32(response_mask), axis=-1)
    return jnp.mean((jnp.sign(s) == jnp.sign(2.0 * as_f32(outcome) - 1.0)).astype(F32))


def q_sums_by_outcome(q, response_mask, outcome, threshold: float = 0.5) -> Tuple[jax.Array, jax.Array]:
    """Mean summed implicit reward of correct rows (``outcome >= threshold``) and of the others.

    Args:
      q: ``[B, T]``; response_mask: ``[B, T]``; outcome: ``[B]``.
    Returns:
      ``(mean correct, mean wrong)`` float32 scalars; 0 for a side without rows.
    """
    s = jnp.sum(as_f32(q) * as_f32(response_mask), axis=-1)
    right = as_f32(outcome) >= threshold
    mean = lambda m: jnp.sum(jnp.where(m, s, 0.0)) / jnp.maximum(jnp.sum(m), 1)
    return mean(right).astype(F32), mean(~right).astype(F32)
