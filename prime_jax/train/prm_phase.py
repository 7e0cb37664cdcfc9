"""The PRM phase of one PRIME iteration: train the implicit PRM, and say which q the policy gets.

PRIME_SPEC.md, "One iteration" step 6. The PRM runs one pass of mini-batches over the batch, in
order; `algo.prm_update` says when the rewards q handed to the policy are taken relative to it
(the names and behaviour of the reference codes; docs/algorithm.md):

    after    each mini-batch's q from the forward pass of its own update (before its step): the
             released run (PRIME-RL/PRIME run_prime_main.sh)
    before   all updates first, then one scoring pass of the updated PRM (the veRL port's default)
    reverse  one scoring pass first, whose detached sums of q per row are the group scores the
             dpo / bon_* losses read (veRL's Q_bc); then the updates as in `after`, and the policy
             gets the q of the update passes (veRL recipe/prime, prime_ray_trainer.compute_reward)
    none     a frozen PRM: one scoring pass, no update

Two views of q are logged (the ranking metrics below): q *fresh* (the PRM's rewards before it
trained on these rows: its generalisation to samples it has not seen; `prm/dpo_accuracy`, as the
reference logs it) and q *given* (what the policy receives; `prm/dpo_accuracy_given`). Fresh is the
first scoring pass in `reverse` and `none` mode, the update passes' own q in `after` and `before`
mode. In `after` and `none` mode the two are the same; in `reverse` mode the given q of a later
mini-batch come from a PRM that has trained on the earlier ones; in `before` mode from a PRM that
has just fitted these very rows.
"""

from __future__ import annotations

import time
from typing import Callable, Collection, Sequence

import numpy as np

from prime_jax import algo
from prime_jax.config import PRM_UPDATE_MODES
from prime_jax.data.synthetic_tasks import first_error_token
from prime_jax.parallel import put_rows, to_host
from prime_jax.rewards import CORRECT_THRESHOLD
from prime_jax.train.batch import PrimeBatch
from prime_jax.train.steps import TrainSteps


def ranking_metrics(q_fresh: np.ndarray, q_given: np.ndarray, response_mask: np.ndarray, outcome: np.ndarray,
                    n: int) -> dict[str, float]:
    """How the PRM's summed rewards order a batch's correct and wrong responses.

    q_fresh, q_given: `[B, R]` implicit rewards before the PRM trained on the batch / as handed to
    the policy; response_mask `[B, R]`; outcome `[B]`; groups of n contiguous rows.
    """
    right, wrong = algo.q_sums_by_outcome(q_fresh, response_mask, outcome)
    return {
        "prm/dpo_accuracy": float(algo.dpo_accuracy(q_fresh, response_mask, outcome, n)),
        "prm/dpo_accuracy_given": float(algo.dpo_accuracy(q_given, response_mask, outcome, n)),
        "prm/dpo_abs_accuracy": float(algo.dpo_abs_accuracy(q_fresh, response_mask, outcome)),
        "prm/q_sum_correct": float(right),
        "prm/q_sum_wrong": float(wrong),
    }


def score_q(steps: TrainSteps, prm_params, host: PrimeBatch, chunks: Sequence[np.ndarray],
            take_rows: Callable[[np.ndarray], PrimeBatch]) -> np.ndarray:
    """`[B, R]` q of every row under `prm_params` (raw-logit log-probs against the batch's
    ref_logprobs, `host` holding them and the response mask), one scoring call per chunk of rows,
    all dispatched before the one fetch."""
    pending = [steps.score(None, prm_params, None, take_rows(rows))["prm_logprobs"] for rows in chunks]
    prm_logprobs = np.concatenate(to_host(pending))
    return np.asarray(algo.implicit_token_rewards(prm_logprobs, host.ref_logprobs, host.response_mask),
                      np.float32)


def run_prm_phase(steps: TrainSteps, prm_state, batch: PrimeBatch, *, mode: str, mini_batch: int, n: int,
                  take_rows: Callable[[np.ndarray], PrimeBatch], group_scores: bool = False):
    """One PRM phase over `batch` (rows grouped by prompt, ref_logprobs and outcome set; on the devices
    or on the host).

    mode: one of PRM_UPDATE_MODES; mini_batch: rows per PRM update (whole groups);
    take_rows(rows): the batch's `rows`, placed on the mesh; group_scores: the PRM loss reads the
    group scores of the first scoring pass (algo.GROUP_SCORE_LOSS_TYPES; needs mode "reverse").
    Returns (prm_state, q_given [B, R] float32 on the host, metrics): `prm/` loss, grad_norm,
    nan_skipped (updates only), the ranking metrics and time/prm_s.
    """
    if mode not in PRM_UPDATE_MODES:
        raise ValueError(f"unknown PRM update mode {mode!r}; expected one of {PRM_UPDATE_MODES}")
    if group_scores and mode != "reverse":
        raise ValueError(f"the dpo / bon_* PRM losses read the group scores of a scoring pass before the updates, "
                         f"which only mode 'reverse' runs, got {mode!r}")
    t = time.perf_counter()
    host = to_host(batch.only(("ref_logprobs", "response_mask", "outcome")))
    chunks = [np.arange(start, start + mini_batch) for start in range(0, batch.num_rows, mini_batch)]
    q_first = score_q(steps, prm_state.params, host, chunks, take_rows) if mode in ("reverse", "none") else None
    scores = q_first.sum(axis=1, dtype=np.float32) if group_scores else None  # veRL's Q_bc, one per row
    updates = []
    if mode != "none":
        for rows in chunks:  # in order, dispatched back to back; fetched once below
            rows_batch = take_rows(rows)
            if scores is not None:
                rows_batch = rows_batch.replace(group_scores=put_rows(scores[rows], rows_batch.outcome.sharding.mesh))
            prm_state, m = steps.prm(prm_state, rows_batch)
            updates.append(m)
    updates = to_host(updates)
    q_updates = np.concatenate([np.asarray(m["q"]) for m in updates]).astype(np.float32) if updates else None
    q_fresh = q_first if q_first is not None else q_updates
    q_given = {"after": q_updates, "reverse": q_updates, "none": q_first}.get(mode)
    if mode == "before":
        q_given = score_q(steps, prm_state.params, host, chunks, take_rows)
    metrics = {}
    if updates:
        metrics = {f"prm/{k}": float(np.mean([m[k] for m in updates])) for k in ("loss", "grad_norm")}
        metrics["prm/nan_skipped"] = int(sum(int(m["nan_skipped"]) for m in updates))
    metrics.update(ranking_metrics(q_fresh, q_given, host.response_mask, host.outcome, n))
    metrics["time/prm_s"] = time.perf_counter() - t
    return prm_state, q_given, metrics


def oracle_process_rewards(problems: Sequence, response_ids: np.ndarray, response_mask: np.ndarray,
                           outcome: np.ndarray, tokenizer, stop_ids: Collection[int],
                           wrong_rows_only: bool = False) -> np.ndarray:
    """`[B, R]` step-level rewards from the synthetic task itself (algo.process_source "oracle", not PRIME):
    -1 on the first token where a row departs from the problem's demonstration, right answer or not
    (`synthetic_tasks.first_error_token`); on a wrong row that never departs (a premature stop, a
    truncation) its last token; 0 elsewhere.

    A step-level verifier for the synthetic tasks, whose answers have one fixed form: it also marks
    right answers reached through wrong steps, which outcome labels (and a PRM learnt from them)
    cannot see. A run with it measures what a step-level reward could add on those tasks. wrong_rows_only
    (algo.process_source "oracle_wrong_rows"): only the rows the outcome calls wrong are marked (exact
    credit within what an outcome label says).
    problems: one `Problem` per row; response_ids, response_mask `[B, R]`; outcome `[B]`; stop_ids: the
    tokens that end a response (not part of its text)."""
    q = np.zeros(response_mask.shape, np.float32)
    for row, problem in enumerate(problems):
        tokens = response_ids[row][response_mask[row].astype(bool)]
        if not len(tokens) or (wrong_rows_only and outcome[row] >= CORRECT_THRESHOLD):
            continue
        first = first_error_token(problem, tokens[:-1] if int(tokens[-1]) in stop_ids else tokens, tokenizer)
        if first is not None:
            q[row, first] = -1.0
        elif outcome[row] < CORRECT_THRESHOLD:
            q[row, len(tokens) - 1] = -1.0
    return q


def process_reward_scale(algo_config, ema: float, metrics: dict) -> tuple[float, float]:
    """(new moving average of the fresh ranking, weight of this step's process rewards).

    algo.process_ramp = "ranking": the average takes this step's `prm/dpo_accuracy` (the PRM's ranking
    of the batch before it trained on it) and the weight is `algo.process_ramp_gate` of it; "none" (the
    spec): weight 1. A step without PRM metrics (outcome-only) leaves the average as it was.
    """
    if algo_config.process_ramp == "none":
        return ema, 1.0
    if "prm/dpo_accuracy" in metrics:
        ema = float(algo.ranking_ema(ema, metrics["prm/dpo_accuracy"], algo_config.process_ramp_decay))
    return ema, float(algo.process_ramp_gate(ema, algo_config.process_ramp_low, algo_config.process_ramp_high))

