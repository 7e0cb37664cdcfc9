"""The jitted programs of one PRIME iteration: score, PRM update, policy (PPO) update.

All three are pure functions of `(state or params, batch)` compiled with explicit shardings on
a `(data, fsdp, tensor)` mesh. The batch is a `PrimeBatch` (train/batch.py: its fields, shapes and
dtypes; rows grouped by prompt, n contiguous), and each step reads only the fields
`PrimeBatch.needs(program)` names (score: the four id/mask arrays; prm: + ref_logprobs, outcome, and
group_scores for the dpo / bon_* losses; policy: + old_logprobs, advantages). Rows are sharded over
the mesh's data axes, so B (and B/micro_batches) should be a multiple of data*fsdp.

Gradient accumulation: a mini-batch is split into `micro_batches` micro-batches of whole prompt
groups and gradients are summed in a `lax.scan`. Each micro-batch's loss is weighted by its
share of the mini-batch's averaging units, so the sum equals the whole mini-batch's loss:
  seq-mean-token-mean (policy): units = responses with >= 1 real token; w_j = rows_j / rows
  token-mean (policy):          units = real tokens;                     w_j = tokens_j / tokens
  prm ce, dpo, bon_* (row means): units = rows;                         w_j = rows_j / rows
  prm pairwise:                 units = summed pair weights;             w_j = pairs_j / pairs
(Averaging the k micro-batch losses instead would weight short responses' tokens differently
from the full-batch loss whenever micro-batches hold different numbers of tokens or rows.)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from prime_jax.algo import (GROUP_SCORE_LOSS_TYPES, PRM_LOSS_TYPES, dpo_accuracy, implicit_token_rewards, policy_loss,
                             prm_dpo_loss, prm_loss, prm_pair_weights, prm_pairwise_loss)
from prime_jax.models import response_logprobs
from prime_jax.parallel import batch_sharding, state_shardings, under_mesh
from prime_jax.parallel import replicated as replicated_sharding
from prime_jax.train.accumulate import accumulate_gradients, merge_micro_batches, split_micro_batches
from prime_jax.train.batch import PrimeBatch
from prime_jax.train.state import TrainState, split_params, train_state_shardings

def sequence_logprobs(graphdef, params, batch: PrimeBatch, temperature: float, chunk_size: int) -> jax.Array:
    """`[B,R]` log-probs of the response tokens under `params` (the shared chunked function)."""
    model = nnx.merge(graphdef, params)
    return response_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask,
                             temperature=temperature, chunk_size=chunk_size)


def apply_update(state: TrainState, grads, loss, optimizer: optax.GradientTransformation):
    """One optimizer update, skipped (params and opt state kept) if loss or grad norm is not finite."""
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jnp.where(ok, new, old)
    new_state = TrainState(
        params=jax.tree.map(keep, params, state.params),
        opt_state=jax.tree.map(keep, opt_state, state.opt_state),
        step=state.step + ok.astype(jnp.int32),
        nan_skips=state.nan_skips + (~ok).astype(jnp.int32),
    )
    return new_state, {"grad_norm": grad_norm, "nan_skipped": (~ok).astype(jnp.int32)}


class TrainSteps(NamedTuple):
    """The jitted callables and the shardings they use (built by `make_train_steps`).

    score(policy_params, prm_params, ref_params, batch) -> {old_logprobs, prm_logprobs, ref_logprobs}
        `[B,R]` float32, 0 at padding. old_logprobs use the rollout temperature; prm_logprobs and
        ref_logprobs the raw logits (as the reference code: q does not depend on the temperature).
        Any of the params may be None: its key is then absent.
    policy(policy_state, batch) -> (policy_state, metrics): one PPO mini-batch. The state is donated.
        metrics: loss, grad_norm, clip_frac, approx_kl, ratio_max, nan_skipped.
    prm(prm_state, batch) -> (prm_state, metrics): one PRM mini-batch. The state is donated.
        metrics: loss, grad_norm, dpo_accuracy, nan_skipped (scalars) and q `[B,R]`: the implicit
        token rewards of this mini-batch from the forward pass that computed the gradient, i.e.
        before the update (dpo_accuracy is taken on them). Pop q before logging. The loss is
        `prm_loss_type` (algo.PRM_LOSS_TYPES); the dpo / bon_* types read the batch's
        `group_scores` (the detached sums of q from the scoring pass before the updates, veRL's
        `Q_bc`: `prm_phase`, algo.prm_update "reverse"). None if no prm optimizer was given.
    """

    score: Callable
    policy: Callable
    prm: Callable | None
    policy_state_shardings: TrainState
    prm_state_shardings: TrainState | None
    param_shardings: Any
    batch_sharding: NamedSharding


def _policy_step_fn(logprobs, split, param_sh, optimizer, clip_eps: float, agg: str):
    """The PPO-clip policy step `(TrainState, batch) -> (TrainState, metrics)` (not jitted)."""

    def policy_step(state: TrainState, batch: PrimeBatch) -> tuple[TrainState, dict[str, jax.Array]]:
        batch = batch.only(PrimeBatch.needs("policy"))
        tokens = jnp.sum(batch.response_mask.astype(jnp.float32))
        units = lambda mask: jnp.sum(mask) if agg == "token-mean" else jnp.sum(jnp.any(mask, axis=-1))
        total_units = jnp.maximum(units(batch.response_mask.astype(bool)).astype(jnp.float32), 1.0)

        def loss_fn(params, mb: PrimeBatch):
            mask = mb.response_mask
            loss, m = policy_loss(logprobs(params, mb), mb.old_logprobs, mb.advantages, mask, clip_eps, agg)
            token_share = jnp.sum(mask.astype(jnp.float32)) / jnp.maximum(tokens, 1.0)
            aux = {"clip_frac": m["clip_frac"] * token_share, "approx_kl": m["approx_kl"] * token_share,
                   "ratio_max": m["ratio_max"]}
            return loss * units(mask.astype(bool)) / total_units, aux

        loss, grads, aux = accumulate_gradients(loss_fn, state.params, split(batch), param_sh)
        state, update_metrics = apply_update(state, grads, loss, optimizer)
        metrics = {"loss": loss, **update_metrics, "clip_frac": jnp.sum(aux["clip_frac"]),
                   "approx_kl": jnp.sum(aux["approx_kl"]), "ratio_max": jnp.max(aux["ratio_max"])}
        return state, metrics

    return policy_step


def _prm_step_fn(raw_logprobs, split, merge, param_sh, optimizer, prm_loss_type: str, n: int, beta: float):
    """The implicit PRM step `(TrainState, batch) -> (TrainState, metrics with q)` (not jitted)."""

    reads = PrimeBatch.needs("prm", group_scores=prm_loss_type in GROUP_SCORE_LOSS_TYPES)

    def prm_units(outcome):
        """What the PRM loss averages over: the rows (ce, dpo, bon_*), the summed pair weights (pairwise)."""
        if prm_loss_type == "pairwise":  # a weighted mean over the groups' ordered pairs
            return jnp.sum(prm_pair_weights(outcome, n))
        return outcome.shape[0]

    def prm_loss_fn(lp, mb: PrimeBatch):
        """The configured PRM loss of one micro-batch."""
        mask, outcome = mb.response_mask, mb.outcome
        if prm_loss_type == "ce":
            return prm_loss(lp, mb.ref_logprobs, mask, outcome, beta)
        if prm_loss_type == "pairwise":
            return prm_pairwise_loss(lp, mb.ref_logprobs, mask, outcome, n, beta)
        bon_mode = "none" if prm_loss_type == "dpo" else prm_loss_type
        return prm_dpo_loss(lp, mb.ref_logprobs, mask, outcome, mb.group_scores, n, beta, bon_mode)

    def prm_step(state: TrainState, batch: PrimeBatch) -> tuple[TrainState, dict[str, jax.Array]]:
        batch = batch.only(reads)
        total_units = prm_units(batch.outcome)

        def loss_fn(params, mb: PrimeBatch):
            lp = raw_logprobs(params, mb)
            units = prm_units(mb.outcome)
            share = units / jnp.maximum(total_units, 1e-12)
            q = implicit_token_rewards(jax.lax.stop_gradient(lp), mb.ref_logprobs, mb.response_mask)
            return prm_loss_fn(lp, mb) * share, q

        loss, grads, q = accumulate_gradients(loss_fn, state.params, split(batch), param_sh)
        q = merge(q)
        state, update_metrics = apply_update(state, grads, loss, optimizer)
        metrics = {"loss": loss, **update_metrics,
                   "dpo_accuracy": dpo_accuracy(q, batch.response_mask, batch.outcome, n), "q": q}
        return state, metrics

    return prm_step


def _score_programs(logprobs, raw_logprobs, k: int, n: int, mesh: Mesh, param_sh, rows_sh) -> Callable:
    """`score(policy_params, prm_params, ref_params, batch)`: the jitted scoring pass (`TrainSteps.score`),
    one program per combination of the models given, in `k` micro-batches."""

    def score_fn(policy_params, prm_params, ref_params, batch: PrimeBatch) -> dict[str, jax.Array]:
        mbs = split_micro_batches(batch.only(PrimeBatch.needs("score")), k, n, mesh)
        named = {"old_logprobs": policy_params, "prm_logprobs": prm_params, "ref_logprobs": ref_params}

        def one(mb: PrimeBatch):
            mask = mb.response_mask.astype(jnp.float32)
            return {key: (logprobs if key == "old_logprobs" else raw_logprobs)(p, mb) * mask
                    for key, p in named.items() if p is not None}

        return merge_micro_batches(jax.lax.map(one, mbs), k, n, mesh)

    score_variants = {}

    def score_program(policy_params, prm_params, ref_params):
        """The jitted scoring program of the models given (None: not scored), one per combination."""
        variant = (policy_params is None, prm_params is None, ref_params is None)
        if variant not in score_variants:
            shardings = tuple(None if skip else param_sh for skip in variant)
            score_variants[variant] = jax.jit(under_mesh(score_fn, mesh), in_shardings=(*shardings, rows_sh), out_shardings=rows_sh)
        return score_variants[variant]

    def score(policy_params, prm_params, ref_params, batch):
        return score_program(policy_params, prm_params, ref_params)(policy_params, prm_params, ref_params, batch)

    # `steps.score.lower(...)` lowers the program a call with these arguments runs (like a jit's).
    score.lower = lambda *args: score_program(*args[:3]).lower(*args)
    return score


def make_train_steps(model, policy_optimizer: optax.GradientTransformation,
                     prm_optimizer: optax.GradientTransformation | None, mesh: Mesh, *, n: int,
                     micro_batches: int = 1, score_micro_batches: int | None = None, beta: float = 0.05,
                     clip_eps: float = 0.2, temperature: float = 1.0, chunk_size: int = 128,
                     prm_loss_type: str = "ce", agg: str = "seq-mean-token-mean") -> TrainSteps:
    """Builds the jitted score / PRM / policy steps.

    model: a Qwen2ForCausalLM, real or abstract (`nnx.eval_shape`), or its `(graphdef, params)`;
    only the graph (config: dtype, remat) and parameter shapes are used. Policy, PRM and
    reference share this graph.
    n: samples per prompt; micro_batches: gradient-accumulation micro-batches per mini-batch
    (each holds whole groups); score_micro_batches: micro-batches of the scoring pass (default
    micro_batches), which bound its activation memory.
    """
    if agg not in ("seq-mean-token-mean", "token-mean"):
        raise ValueError(f"unknown agg {agg!r}")
    if prm_loss_type not in PRM_LOSS_TYPES:
        raise ValueError(f"unknown prm_loss_type {prm_loss_type!r}; expected one of {PRM_LOSS_TYPES}")
    graphdef, abstract_params = model if isinstance(model, tuple) else split_params(model)
    k, k_score = micro_batches, score_micro_batches or micro_batches
    param_sh = state_shardings(abstract_params, mesh)
    rows_sh = batch_sharding(mesh, 1)  # a prefix: dim 0 of every batch array over the data axes
    replicated = replicated_sharding(mesh)
    logprobs = functools.partial(sequence_logprobs, graphdef, temperature=temperature, chunk_size=chunk_size)
    raw_logprobs = functools.partial(sequence_logprobs, graphdef, temperature=1.0, chunk_size=chunk_size)
    split = functools.partial(split_micro_batches, k=k, n=n, mesh=mesh)
    merge = functools.partial(merge_micro_batches, k=k, n=n, mesh=mesh)

    score = _score_programs(logprobs, raw_logprobs, k_score, n, mesh, param_sh, rows_sh)
    policy_step = _policy_step_fn(logprobs, split, param_sh, policy_optimizer, clip_eps, agg)
    prm_step = _prm_step_fn(raw_logprobs, split, merge, param_sh, prm_optimizer, prm_loss_type, n, beta)

    policy_sh = train_state_shardings(abstract_params, policy_optimizer, mesh)
    policy = jax.jit(under_mesh(policy_step, mesh), in_shardings=(policy_sh, rows_sh), out_shardings=(policy_sh, replicated),
                     donate_argnums=0)
    prm, prm_sh = None, None
    if prm_optimizer is not None:
        prm_sh = train_state_shardings(abstract_params, prm_optimizer, mesh)
        metrics_sh = replicated  # q [B,R] is small (B*R floats); replicate it with the scalars
        prm = jax.jit(under_mesh(prm_step, mesh), in_shardings=(prm_sh, rows_sh), out_shardings=(prm_sh, metrics_sh),
                      donate_argnums=0)
    return TrainSteps(score, policy, prm, policy_sh, prm_sh, param_sh, rows_sh)
