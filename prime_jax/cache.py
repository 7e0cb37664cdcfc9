"""Where prime-jax keeps what it fetches or builds on a machine: converted GGUF models, packaged
model wheels, compiled kernels. `$PRIME_JAX_CACHE`, else `$XDG_CACHE_HOME/prime_jax`, else
`~/.cache/prime_jax`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The project's cache folder (not created here)."""
    if os.environ.get("PRIME_JAX_CACHE"):
        return Path(os.environ["PRIME_JAX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prime_jax"
