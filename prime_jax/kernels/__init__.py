"""Hand-written kernels XLA calls as custom calls (`jax.ffi`), each with the pure-JAX path it
replaces as the reference and the fallback."""
