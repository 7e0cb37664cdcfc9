"""Sampling: prefill + while_loop decode over a sharded KV cache, sampling strategies, `Rollouts`."""

from prime_jax.sampling.rollouts import Rollouts
from prime_jax.sampling.sampler import PAD_ID, Sampler, generate
from prime_jax.sampling.strategies import sample

__all__ = ["PAD_ID", "Rollouts", "Sampler", "generate", "sample"]
