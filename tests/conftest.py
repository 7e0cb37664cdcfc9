"""Test set-up: fake 8 CPU devices so sharded code paths run on a laptop or CI box."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# The suite runs on 2 xdist workers, a test file per worker at a time (pytest.ini). The files that
# start several trainer processes take minutes; handed out first, they overlap with the many short
# files instead of running alone at the end.
LONGEST_FIRST = ("test_trainer_multihost.py", "test_trainer.py", "test_train_steps.py", "test_run_outputs.py",
                 "test_multihost.py", "test_cli_errors.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
