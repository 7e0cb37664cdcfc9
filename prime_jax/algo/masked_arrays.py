"""Small masked-array helpers shared by the formulas of ``prime_jax.algo`` (policy, PRM, estimators).

Conventions as in ``prime_jax.algo``: ``[B, T]`` right-padded rows, groups of ``n`` contiguous rows.
"""

from __future__ import annotations

import operator
from typing import Tuple

import jax
import jax.numpy as jnp

F32 = jnp.float32


def as_f32(x) -> jax.Array:
    """Any array-like (numpy, jax, bool) as a float32 jax array."""
    return jnp.asarray(x).astype(F32)


def as_bool(x) -> jax.Array:
    """Any mask-like array (bool, int, float 0/1) as a bool jax array."""
    x = jnp.asarray(x)
    return x if x.dtype == jnp.bool_ else x != 0


def check_groups(batch: int, n, need_two: bool = True) -> Tuple[int, int]:
    """Validate the static group size ``n`` against the batch size; returns ``(G, n)``."""
    try:
        n = operator.index(n)  # python / numpy int; a traced n is refused here
    except TypeError:
        raise TypeError(
            f"n must be a static integer (mark it static under jit), got {type(n).__name__}"
        ) from None
    if n < (2 if need_two else 1):
        raise ValueError(f"n must be >= {2 if need_two else 1} (leave-one-out needs 2), got {n}")
    if batch % n != 0:
        raise ValueError(f"batch size {batch} is not a multiple of n={n}")
    return batch // n, n


def revcumsum(x) -> jax.Array:
    """Reverse cumulative sum along the last axis (gamma = 1).

    Args:
      x: ``[B, T]`` array.
    Returns:
      ``[B, T]`` float32, ``out[b, t] = sum_{s >= t} x[b, s]``.
    """
    x = as_f32(x)
    return jnp.flip(jnp.cumsum(jnp.flip(x, axis=-1), axis=-1), axis=-1)


def last_token_onehot(response_mask) -> jax.Array:
    """``[B, T]`` bool, True at the last real token of every row (none for an empty row)."""
    m = as_bool(response_mask)
    T = m.shape[-1]
    # argmax returns the first True of the flipped row, i.e. the last True of the row.
    last = (T - 1) - jnp.argmax(jnp.flip(m, axis=-1), axis=-1)  # [B]
    has_any = jnp.any(m, axis=-1)  # [B]
    return (jnp.arange(T)[None, :] == last[:, None]) & has_any[:, None]
