"""Chunked per-token log-probs: equal to the naive full-softmax ones (values and gradients), the
model-level `response_logprobs`, and a compiled peak-memory check that the chunked path never
materialises `[B, T, V]` logits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prime_jax.models import (
    Qwen2Config,
    Qwen2ForCausalLM,
    chunked_token_logprobs,
    naive_token_logprobs,
    response_logprobs,
)


def random_model(config: Qwen2Config, seed: int = 0) -> Qwen2ForCausalLM:
    """A model whose every parameter is random (biases and norms too), without eager jax.random."""
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def fill(path, variable):
        shape, name = variable.shape, str(path[-1])
        if "norm" in name:
            value = 1.0 + 0.3 * rng.standard_normal(shape)
        elif "bias" in name:
            value = 0.5 * rng.standard_normal(shape)
        else:
            value = 0.3 * rng.standard_normal(shape)
        return variable.replace(jnp.asarray(value, config.weight_dtype))

    flat = {path: fill(path, v) for path, v in nnx.to_flat_state(state)}
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _inputs(batch, length, dim, vocab, seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((batch, length, dim)), jnp.float32)
    kernel = jnp.asarray(0.5 * rng.standard_normal((dim, vocab)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
    weights = jnp.asarray(rng.standard_normal((batch, length)), jnp.float32)  # a generic cotangent
    return hidden, kernel, targets, weights


@pytest.mark.parametrize("length,chunk_size", [(37, 8), (16, 16), (5, 128)], ids=["ragged", "one-chunk", "chunk>T"])
def test_chunked_equals_naive_values_and_grads(length, chunk_size):
    hidden, kernel, targets, weights = _inputs(2, length, 16, 50)

    def objective(fn):
        return jax.jit(jax.value_and_grad(lambda h, k, t, temp: (fn(h, k, t, temp) * weights).sum(), argnums=(0, 1)))

    chunked = objective(lambda h, k, t, temp: chunked_token_logprobs(h, k, t, temp, chunk_size=chunk_size))
    naive = objective(naive_token_logprobs)
    for temperature in (1.0, 0.7, 1.6):
        got = chunked_token_logprobs(hidden, kernel, targets, temperature, chunk_size=chunk_size)
        want = naive_token_logprobs(hidden, kernel, targets, temperature)
        assert got.shape == (2, length) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        (value, (g_hidden, g_kernel)) = chunked(hidden, kernel, targets, temperature)
        (ref_value, (ref_hidden, ref_kernel)) = naive(hidden, kernel, targets, temperature)
        np.testing.assert_allclose(value, ref_value, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(g_hidden, ref_hidden, rtol=0, atol=1e-5)
        np.testing.assert_allclose(g_kernel, ref_kernel, rtol=0, atol=1e-5)
        assert float(jnp.abs(g_kernel).max()) > 1e-2  # gradients are not trivially zero
    # temperature really divides the logits
    hot = chunked_token_logprobs(hidden, kernel, targets, 2.0, chunk_size=chunk_size)
    np.testing.assert_allclose(hot, naive_token_logprobs(hidden / 2.0, kernel, targets), rtol=0, atol=1e-5)


def test_response_logprobs_equals_full_log_softmax():
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0)
    model = random_model(config, seed=1)
    rng = np.random.default_rng(2)
    batch, prompt_len, response_len, temperature = 3, 6, 7, 0.8
    prompt_ids = rng.integers(0, 64, (batch, prompt_len)).astype(np.int32)
    prompt_mask = np.zeros((batch, prompt_len), np.int32)
    for row, n in enumerate((6, 3, 1)):  # left-padded prompts
        prompt_mask[row, prompt_len - n:] = 1
    response_ids = rng.integers(0, 64, (batch, response_len)).astype(np.int32)
    response_mask = np.zeros((batch, response_len), np.int32)
    for row, n in enumerate((7, 4, 1)):  # right-padded responses
        response_mask[row, :n] = 1

    graphdef, state = nnx.split(model)

    @jax.jit
    def both(state, prompt_ids, prompt_mask, response_ids, response_mask):
        m = nnx.merge(graphdef, state)
        got = response_logprobs(m, prompt_ids, prompt_mask, response_ids, response_mask,
                                temperature=temperature, chunk_size=4)
        logits = m(jnp.concatenate([prompt_ids, response_ids], 1), jnp.concatenate([prompt_mask, response_mask], 1))
        return got, logits

    got, logits = both(state, *map(jnp.asarray, (prompt_ids, prompt_mask, response_ids, response_mask)))
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64) / temperature, axis=-1)
    # token prompt_len + r is predicted at position prompt_len + r - 1
    want = np.take_along_axis(logp[:, prompt_len - 1:-1], response_ids[..., None], axis=-1)[..., 0]
    assert got.shape == (batch, response_len)
    real = response_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=0, atol=1e-5)


def _temp_bytes(fn, batch, length, dim, vocab) -> int:
    hidden = jax.ShapeDtypeStruct((batch, length, dim), jnp.float32)
    kernel = jax.ShapeDtypeStruct((dim, vocab), jnp.float32)
    targets = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    grad_fn = jax.jit(jax.value_and_grad(lambda h, k, t: fn(h, k, t).sum(), argnums=(0, 1)))
    stats = grad_fn.lower(hidden, kernel, targets).compile().memory_analysis()
    if stats is None:
        pytest.skip("this backend reports no memory analysis")
    return int(stats.temp_size_in_bytes)


def test_chunked_value_and_grad_peak_memory_does_not_scale_with_t_times_v():
    batch, dim, vocab, chunk = 2, 64, 32768, 128
    chunked = lambda h, k, t: chunked_token_logprobs(h, k, t, 1.0, chunk_size=chunk)
    sizes = {}
    for length in (1024, 2048):
        sizes[length] = (_temp_bytes(chunked, batch, length, dim, vocab),
                         _temp_bytes(naive_token_logprobs, batch, length, dim, vocab))
    full_logits = batch * 1024 * vocab * 4  # one float32 [B, T, V] at T=1024: 256 MiB
    chunked_1k, naive_1k = sizes[1024]
    chunked_2k, naive_2k = sizes[2048]
    assert naive_1k >= full_logits and naive_2k >= 2 * full_logits  # the naive path holds [B, T, V]
    assert chunked_1k < 0.35 * full_logits, sizes  # ~2 chunks of logits, not the whole sequence
    # Doubling T adds one more [B, T, V] to the naive path but next to nothing to the chunked one.
    assert chunked_2k - chunked_1k < 0.05 * full_logits, sizes
    assert chunked_2k < 0.2 * naive_2k, sizes
