"""Per-token log-probs of given targets without materialising `[B, T, V]` logits.

The one log-prob function that the sampler, the scorer and the PPO/PRM losses share: the PPO
ratio is only right if sampler and trainer agree on the same tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def chunked_token_logprobs(hidden, output_kernel, targets, temperature=1.0, chunk_size: int = 128):
    """log softmax(hidden @ output_kernel / temperature)[targets], chunk by chunk over the sequence.

    hidden `[B, T, D]`, output_kernel `[D, V]`, targets `[B, T]` int -> `[B, T]` float32.
    Each chunk's logits `[B, chunk, V]` are recomputed in the backward pass (jax.checkpoint), so
    neither direction holds more than one chunk of logits.
    """
    batch, length, dim = hidden.shape
    chunk = min(chunk_size, length)
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hidden_chunks = hidden.reshape(batch, num_chunks, chunk, dim).swapaxes(0, 1)
    target_chunks = targets.reshape(batch, num_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(hidden_chunk, target_chunk):
        logits = jnp.einsum("btd,dv->btv", hidden_chunk, output_kernel, preferred_element_type=jnp.float32)
        logits = logits / temperature
        target_logits = jnp.take_along_axis(logits, target_chunk[..., None], axis=-1)[..., 0]
        return target_logits - jax.nn.logsumexp(logits, axis=-1)

    def body(carry, chunk_inputs):
        return carry, one_chunk(*chunk_inputs)

    _, logprobs = jax.lax.scan(body, None, (hidden_chunks, target_chunks))
    return logprobs.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length]


def naive_token_logprobs(hidden, output_kernel, targets, temperature=1.0):
    """Reference: the full `[B, T, V]` log-softmax (for tests and small cases)."""
    logits = jnp.einsum("btd,dv->btv", hidden, output_kernel, preferred_element_type=jnp.float32) / temperature
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]


def response_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask, *,
                      temperature=1.0, chunk_size: int = 128):
    """Log-probs of each response token given its prompt and the response tokens before it.

    prompt_ids/prompt_mask `[B, P]` (left-padded), response_ids/response_mask `[B, R]`
    (right-padded) -> `[B, R]` float32 (values at padded response positions are meaningless;
    mask them). Logits are divided by `temperature`, matching how the sampler drew the tokens.
    """
    input_ids = jnp.concatenate([prompt_ids, response_ids], axis=1)
    attention_mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    hidden, _ = model.hidden_states(input_ids, attention_mask)
    prompt_len = prompt_ids.shape[1]
    # The hidden state at position i predicts token i + 1.
    predicting = hidden[:, prompt_len - 1 : -1]
    return chunked_token_logprobs(predicting, model.output_kernel(), response_ids, temperature, chunk_size)
