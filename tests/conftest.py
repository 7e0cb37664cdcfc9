"""Test set-up: fake 8 CPU devices so sharded code paths run on a laptop or CI box, and one persistent
XLA compilation cache for the subprocess runs of the whole test session."""
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests start `prime_jax.main` (or several hosts of it) on the same tiny config, and each such run
# compiles the same programs. `PRIME_TESTS_XLA_CACHE` names one persistent compilation cache for the
# whole session, which the subprocess helpers (`test_trainer._env`, `test_trainer_multihost._launch`)
# hand to every run in place of a cache per test. It is created here, in the process that starts the
# xdist workers, so the workers inherit it; the test process itself keeps jax's defaults.
_SESSION_CACHE = None
if "PRIME_TESTS_XLA_CACHE" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="prime_jax_tests_xla_cache_")
    os.environ["PRIME_TESTS_XLA_CACHE"] = _SESSION_CACHE

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_sessionfinish(session, exitstatus):
    if _SESSION_CACHE is not None:  # only the process that created it (the xdist controller)
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
