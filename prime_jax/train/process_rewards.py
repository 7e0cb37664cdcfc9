"""What the policy's advantages are made of.

* Where a step's process rewards q come from: a registry of sources (`PROCESS_SOURCES`, named by
  algo.process_source, registered with `register_process_source` as the advantage estimators are
  with `algo.register_advantage_estimator`): the implicit PRM (PRIME), the synthetic task's oracle,
  the frozen SFT model's log-probs, ... An ablation adds a source here and leaves the loop alone.
* How q becomes advantages: normalised and weighted (algo.process_ramp's scale), then the configured
  estimator (`algo.compute_advantages`), with the summary numbers the step logs - one jitted program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prime_jax import algo
from prime_jax.parallel import to_host
from prime_jax.train.batch import PrimeBatch
from prime_jax.train.prm_phase import oracle_process_rewards, run_prm_phase
from prime_jax.train.state import TrainState
from prime_jax.train.steps import TrainSteps


# ==============================================================================================
# Sources of q
# ==============================================================================================
@dataclasses.dataclass(frozen=True)
class SourceContext:
    """What a source may use besides the step's rows: the run's config, train steps, group size, the
    row gather of device batches (`take_rows(batch, rows)`), the tokenizer and its stop ids."""

    config: Any
    steps: TrainSteps
    n: int
    take_rows: Callable[[PrimeBatch, np.ndarray], PrimeBatch]
    tokenizer: Any
    stop_ids: Sequence[int]


@dataclasses.dataclass(frozen=True)
class StepRows:
    """A step's rows: `batch` on the devices (scored: old / reference log-probs), `host_rows` its host
    copy, `problems` one `Problem` per row."""

    batch: PrimeBatch
    host_rows: PrimeBatch
    problems: Sequence


#: `source(context, prm_state, rows) -> (prm_state, q [B, R] float32, metrics)`; a source that trains
#: no PRM returns `prm_state` as it came.
ProcessSource = Callable[[SourceContext, TrainState, StepRows], tuple[TrainState, Any, dict]]
PROCESS_SOURCES: dict[str, ProcessSource] = {}


def register_process_source(name: str) -> Callable[[ProcessSource], ProcessSource]:
    """Decorator: register a source of q under `name` (a value of algo.process_source, which
    `prime_jax.config.PROCESS_SOURCES` lists for validation)."""
    def deco(fn: ProcessSource) -> ProcessSource:
        if name in PROCESS_SOURCES and PROCESS_SOURCES[name] is not fn:
            raise ValueError(f"process source {name!r} is already registered")
        PROCESS_SOURCES[name] = fn
        return fn
    return deco


def process_rewards(name: str, context: SourceContext, prm_state: TrainState, rows: StepRows
                    ) -> tuple[TrainState, Any, dict]:
    """The step's q from the source registered as `name`, with the PRM state after it and its metrics."""
    try:
        source = PROCESS_SOURCES[name]
    except KeyError:
        raise KeyError(f"unknown process source {name!r}; registered: {sorted(PROCESS_SOURCES)}") from None
    return source(context, prm_state, rows)


@register_process_source("prm")
def prm_rewards(context: SourceContext, prm_state: TrainState, rows: StepRows):
    """PRIME: the implicit PRM's q, around its update phase (`prm_phase.run_prm_phase`, algo.prm_update)."""
    c = context.config
    return run_prm_phase(context.steps, prm_state, rows.batch, mode=c.algo.prm_update,
                         mini_batch=c.batch.prm_mini_batch, n=context.n,
                         take_rows=functools.partial(context.take_rows, rows.batch),
                         group_scores=c.algo.prm_loss in algo.GROUP_SCORE_LOSS_TYPES)


@register_process_source("prm_logprob")
def prm_plus_sft_logprobs(context: SourceContext, prm_state: TrainState, rows: StepRows):
    """The PRM phase as PRIME's, and the policy gets q + log π_ref = log π_φ (the SFT model's confidence left in)."""
    prm_state, q, metrics = prm_rewards(context, prm_state, rows)
    return prm_state, q + sft_logprobs(rows), metrics


@register_process_source("ref_logprob")
def sft_logprob_rewards(context: SourceContext, prm_state: TrainState, rows: StepRows):
    """The frozen SFT model's log-prob of each token; no PRM update."""
    q = sft_logprobs(rows)
    return prm_state, q, {"prm/ref_logprob_per_token": float(q.sum() / rows.host_rows.response_mask.sum())}


@register_process_source("oracle")
def oracle_rewards(context: SourceContext, prm_state: TrainState, rows: StepRows, *, wrong_rows_only: bool = False):
    """The synthetic task's own step-level rewards (`prm_phase.oracle_process_rewards`); no PRM update."""
    h = rows.host_rows
    q = oracle_process_rewards(rows.problems, h.response_ids, h.response_mask, h.outcome, context.tokenizer,
                               set(context.stop_ids), wrong_rows_only=wrong_rows_only)
    return prm_state, q, {"prm/oracle_marked_frac": float((q < 0).any(1).mean())}


@register_process_source("oracle_wrong_rows")
def oracle_wrong_row_rewards(context: SourceContext, prm_state: TrainState, rows: StepRows):
    """The oracle's rewards on the rows the outcome calls wrong only."""
    return oracle_rewards(context, prm_state, rows, wrong_rows_only=True)


def sft_logprobs(rows: StepRows) -> np.ndarray:
    """`[B, R]` float32 on the host: the scored reference (the frozen SFT model) log-probs of the rows,
    0 at padding (fetched whole: a pod's rows span processes)."""
    return (to_host(rows.batch.ref_logprobs) * rows.host_rows.response_mask).astype(np.float32)


# ==============================================================================================
# q -> advantages
# ==============================================================================================


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
