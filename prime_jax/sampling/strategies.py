"""Sampling strategies as small pure functions of float32 logits (jit-friendly, no state).

Order of the filters is the one transformers and vLLM use: divide by the temperature, keep the
top-k logits, then keep the nucleus (top-p) of what is left (renormalised). Drawing is Gumbel-max
(`argmax(logits + Gumbel noise)`, the same as `jax.random.categorical`) with one key per row, so a
row's draw depends only on its own key and logits, never on how many rows share the batch or how
the batch is sharded.

Shapes: B rows, V vocabulary, k = top_k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


def row_keys(key: jax.Array, step, num_rows: int) -> jax.Array:
    """`[B]` keys for decoding step `step`: `fold_in(fold_in(key, step), row)`.

    Row r of the batch always gets the same key for a given (key, step), whatever the batch size.
    """
    return keys_for(key, jnp.full(num_rows, step, jnp.uint32), jnp.arange(num_rows, dtype=jnp.uint32))


def row_keys_at(key: jax.Array, step, rows: jax.Array) -> jax.Array:
    """`keys_for(key, [step] * B, rows)` with the step folded in once (every row at the same step)."""
    step_key = jax.random.fold_in(key, jnp.asarray(step).astype(jnp.uint32))
    return jax.vmap(lambda row: jax.random.fold_in(step_key, row.astype(jnp.uint32)))(rows)


def keys_for(key: jax.Array, steps: jax.Array, rows: jax.Array) -> jax.Array:
    """`[B]` keys `fold_in(fold_in(key, steps[i]), rows[i])`: a draw depends only on (key, row, step),
    never on where in a batch the row sits (the sampler's decode slots rely on it)."""
    fold = lambda step, row: jax.random.fold_in(jax.random.fold_in(key, step.astype(jnp.uint32)), row.astype(jnp.uint32))
    return jax.vmap(fold)(steps, rows)


def top_k_logits(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k largest logits per row and their token ids, largest first: `[B, V]` -> 2 × `[B, k]`."""
    return jax.lax.top_k(logits, k)


def nucleus_cutoff(sorted_logits: jax.Array, top_p) -> jax.Array:
    """The smallest logit inside the top-p nucleus, `[B, 1]`, from descending-sorted logits `[B, M]`.

    The nucleus is the smallest prefix whose probability reaches `top_p`: entry i is in it iff the
    mass of the entries before it is `< top_p` (so the most likely token always is). Keeping
    `logits >= cutoff` also keeps anything tied with the last entry. This is transformers'
    `TopPLogitsWarper` rule.
    """
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    num_kept = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
    return jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)


def top_p_logits(logits: jax.Array, top_p) -> jax.Array:
    """Sets logits outside the top-p nucleus to -inf (one full sort over the vocabulary). `[B, V]`."""
    cutoff = nucleus_cutoff(jnp.sort(logits, axis=-1, descending=True), top_p)
    return jnp.where(logits >= cutoff, logits, NEG_INF)


def argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, -1)` (first index of the maximum) as two plain reductions, `[B, M]` -> `[B]` int32.

    XLA:CPU runs argmax's variadic (value, index) reduce several times slower than a max and a min.
    """
    best = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    first = jnp.min(jnp.where(x == best, index, x.shape[-1]), axis=-1)
    return jnp.minimum(first, x.shape[-1] - 1)  # a NaN row has no maximum; stay in range


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 hash (20 rounds) of counters (x1, x2) under keys (k1, k2), all uint32 and
    broadcasting: the function `jax.random`'s threefry keys compute, written out round by round.

    XLA:CPU runs jax's own lowering as a 5-iteration loop that writes the whole `[B, V]` state to
    memory after every 4 rounds; unrolled, the rounds and the Gumbel transform fuse into one
    elementwise pass (3x faster on a 49k vocabulary).
    """
    rotate = lambda v, d: (v << np.uint32(d)) | (v >> np.uint32(32 - d))
    keys = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + keys[0], x2 + keys[1]
    for i in range(5):
        for d in _THREEFRY_ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = rotate(x2, d) ^ x1
        x1, x2 = x1 + keys[(i + 1) % 3], x2 + keys[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _is_threefry(keys: jax.Array) -> bool:
    impl = jax.random.key_impl(keys)
    return "threefry" in str(getattr(impl, "name", impl)) and jax.config.jax_threefry_partitionable


def gumbel_noise(keys: jax.Array, size: int) -> jax.Array:
    """`[B, size]` float32: row r is `jax.random.gumbel(keys[r], (size,))`, bit for bit.

    For threefry keys (jax's default, partitionable bits) the bits are computed by `threefry2x32`
    on the counters jax uses (0, i) and turned into floats exactly as `jax.random.uniform(minval=
    tiny)` and `gumbel` do; any other key type goes through `jax.random.gumbel` itself.
    """
    if not _is_threefry(keys):
        return jax.vmap(lambda k: jax.random.gumbel(k, (size,), jnp.float32))(keys)
    key_words = jax.random.key_data(keys)  # [B, 2]
    counters = jax.lax.broadcasted_iota(jnp.uint32, (1, size), 1)
    hi, lo = threefry2x32(key_words[:, :1], key_words[:, 1:], jnp.zeros_like(counters), counters)
    mantissa = ((hi ^ lo) >> np.uint32(9)) | np.uint32(0x3F800000)  # a float in [1, 2)
    uniform = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - jnp.float32(1.0)
    tiny = jnp.finfo(jnp.float32).tiny
    uniform = jnp.maximum(tiny, uniform * (jnp.float32(1.0) - tiny) + tiny)
    return -jnp.log(-jnp.log(uniform))


def gumbel_argmax(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One categorical draw per row from (unnormalised, possibly -inf) logits `[B, M]` -> `[B]`."""
    return argmax(logits + gumbel_noise(keys, logits.shape[-1]))


def token_logprobs(scaled_logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """`log_softmax(scaled_logits)[tokens]` over the full vocabulary: `[B, V]`, `[B]` -> `[B]`."""
    picked = jnp.take_along_axis(scaled_logits, tokens[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(scaled_logits, axis=-1)


def sample(logits: jax.Array, keys: jax.Array, temperature, top_p, *, greedy: bool, top_k: int,
           use_top_p: bool) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row and returns (tokens `[B]` int32, logprobs `[B]` float32).

    logits `[B, V]` (cast to float32), keys `[B]`. `greedy` (temperature 0) takes the argmax.
    `top_k` (static, 0 = off) and `use_top_p` (static; `top_p` itself may be traced) pick the
    filters. The log-prob is of the token under `softmax(logits / temperature)` over the whole
    vocabulary, without top-k/top-p renormalisation: what the trainer's `response_logprobs`
    computes, so the PPO ratio starts at exactly 1. Greedy uses temperature 1 for the log-prob.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    if greedy:
        tokens = argmax(logits)
        return tokens, token_logprobs(logits, tokens)
    scaled = logits / jnp.asarray(temperature, jnp.float32)
    if 0 < top_k < vocab:
        values, ids = top_k_logits(scaled, top_k)
        if use_top_p:
            values = jnp.where(values >= nucleus_cutoff(values, top_p), values, NEG_INF)
        choice = gumbel_argmax(keys, values)
        tokens = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    else:
        filtered = top_p_logits(scaled, top_p) if use_top_p else scaled
        tokens = gumbel_argmax(keys, filtered)
    return tokens, token_logprobs(scaled, tokens)
