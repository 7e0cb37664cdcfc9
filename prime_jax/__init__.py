"""prime-jax: PRIME (Process Reinforcement through Implicit Rewards) in JAX/Flax NNX."""

__version__ = "0.1.0"
