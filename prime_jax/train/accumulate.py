"""Micro-batching that keeps a prompt's n samples together, and gradient accumulation by `lax.scan`.

Rows are grouped by prompt: rows `[g*n, (g+1)*n)` are prompt g's samples. Micro-batch j takes
the groups `j, j+k, j+2k, ...` (strided, not contiguous): a `[B, ...]` array is viewed as
`[G/k, k, n, ...]` and the `k` axis moved to the front. The leading `G/k` axis keeps the row
sharding of the batch, so every micro-batch is spread over all data-parallel devices and the
split moves no data between devices.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from prime_jax.parallel import named_sharding


def _check(rows: int, k: int, n: int) -> int:
    if rows % n:
        raise ValueError(f"batch of {rows} rows is not a multiple of n={n} samples per prompt")
    groups = rows // n
    if groups % k:
        raise ValueError(f"{groups} prompt groups cannot be split into {k} micro-batches of whole groups")
    return groups


def _constrain(x, mesh: Mesh | None, batch_dim: int):
    if mesh is None:
        return x
    axes = [None] * x.ndim
    axes[batch_dim] = "batch"
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, x.shape))


def split_micro_batches(tree, k: int, n: int, mesh: Mesh | None = None):
    """`[B, ...]` leaves -> `[k, B/k, ...]`; micro-batch j holds whole groups j, j+k, ..."""

    def one(x):
        rows = x.shape[0]
        groups = _check(rows, k, n)
        x = x.reshape(groups // k, k, n, *x.shape[1:]).swapaxes(0, 1)
        return _constrain(x.reshape(k, rows // k, *x.shape[3:]), mesh, 1)

    return jax.tree.map(one, tree)


def merge_micro_batches(tree, k: int, n: int, mesh: Mesh | None = None):
    """Inverse of `split_micro_batches`: `[k, B/k, ...]` leaves -> `[B, ...]` in the original row order."""

    def one(x):
        rows = k * x.shape[1]
        groups = _check(rows, k, n)
        x = x.reshape(k, groups // k, n, *x.shape[2:]).swapaxes(0, 1)
        return _constrain(x.reshape(rows, *x.shape[3:]), mesh, 0)

    return jax.tree.map(one, tree)


def accumulate_gradients(loss_fn: Callable, params, micro_batches, grad_shardings=None):
    """Sums `loss_fn(params, micro_batch) -> (loss, aux)` and its gradient over micro-batches.

    `micro_batches`: pytree of `[k, ...]` leaves (from `split_micro_batches`). Each micro-batch's
    loss must already carry its weight, so that the SUM over micro-batches is the mini-batch loss
    (see `steps.py`); then the summed gradient is the mini-batch gradient. Gradients are summed
    in float32 in a `lax.scan` carry (one micro-batch of activations alive at a time).
    Returns `(loss, grads, aux)` with `aux` stacked `[k, ...]`.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def constrain(grads):
        return grads if grad_shardings is None else jax.lax.with_sharding_constraint(grads, grad_shardings)

    def body(carry, micro_batch):
        loss_sum, grad_sum = carry
        (loss, aux), grads = grad_fn(params, micro_batch)
        grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grad_sum, constrain(grads))
        return (loss_sum + loss, constrain(grad_sum)), aux

    zeros = constrain(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    (loss, grads), aux = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro_batches)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, grads, aux
