"""PRIME training CLI.

    python -m prime_jax.main                                   # configs/tiny.py, ./runs/tiny
    python -m prime_jax.main --config=configs/tiny.py --config.algo.estimator=outcome_rloo \\
        --workdir=runs/tiny_outcome
    python -m prime_jax.main --config=configs/qwen7b.py --workdir=gs://... --config.total_steps=100
    python -m prime_jax.main --config=configs/tiny.py --export_hf   # latest checkpoint -> WORKDIR/hf_export

A workdir that holds checkpoints is resumed from the latest one. Every config field is checked
before anything heavy starts; a bad value prints one line naming the field and exits with 2.
"""

from __future__ import annotations

import logging as py_logging
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Config file (a get_config() returning prime_jax.config.base_config() with changes); "
    "fields are overridden with --config.section.field=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, metrics.jsonl, tb/, rollouts/, hf_export/); "
                               "default ./runs/<config.name>. Resumed when it holds checkpoints.")
_SKIP_MEMORY_CHECK = flags.DEFINE_bool("skip_memory_check", False, "Do not compile the memory plan before "
                                       "loading weights (it runs on TPU/GPU backends; CPU runs skip it).")
_EXPORT_HF = flags.DEFINE_bool("export_hf", False, "Only export the latest checkpoint's policy to WORKDIR/hf_export "
                               "(Hugging Face format) and exit.")


def fail(message: str, code: int = 2) -> None:
    print(f"prime_jax.main: error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    from prime_jax.config import ConfigError, validate
    from prime_jax.parallel import initialize_distributed, mesh_from_config

    config = _CONFIG.value
    try:
        initialize_distributed(config)  # multi-host start-up; a no-op on one host
        validate(config)
    except ConfigError as e:
        fail(f"config {e}")
    except ValueError as e:  # e.g. distributed settings from the environment
        fail(str(e))
    mesh = mesh_from_config(config)  # the run's one mesh: policy, PRM, reference and sampler share it
    workdir = Path(_WORKDIR.value or Path("runs") / config.name)
    logging.set_verbosity(logging.WARNING)  # orbax/absl chatter
    import jax

    # Several processes: process 0 logs progress; the others only warnings and errors.
    py_logging.getLogger("prime_jax").setLevel(py_logging.INFO if jax.process_index() == 0 else py_logging.WARNING)
    py_logging.getLogger("prime_jax.data").setLevel(py_logging.WARNING)  # per-batch rendering stats
    logging.info("workdir %s, mesh %s", workdir, dict(mesh.shape))

    if jax.default_backend() != "cpu" and not _SKIP_MEMORY_CHECK.value and not _EXPORT_HF.value:
        # Compile every program of an iteration from abstract shapes and refuse a run that cannot
        # fit in device memory, before minutes of weight loading (see prime_jax/plan.py).
        from prime_jax.plan import PlanDoesNotFit, check_fits

        try:
            check_fits(config, jax.devices())
        except PlanDoesNotFit as e:
            fail(f"memory plan does not fit (rerun with a bigger mesh or more micro-batches):\n{e}")

    from prime_jax.train.loop import Trainer, export_latest

    if _EXPORT_HF.value:
        folder = export_latest(config, workdir, mesh)
        print(f"exported {folder}")
        return
    trainer = Trainer(config, workdir, mesh)
    last_eval = trainer.run()
    if trainer.preempted_at is not None:  # SIGTERM on some host: a checkpoint was saved, exit 0
        print(f"preempted: stopped after step {trainer.preempted_at} with a checkpoint in {workdir}; "
              "rerun the same command to resume")
    elif last_eval:
        print(f"final eval/accuracy {last_eval.get('eval/accuracy', float('nan')):.4f} (workdir {workdir})")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
