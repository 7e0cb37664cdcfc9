"""PRIME training CLI.

    python -m prime_jax.main                                   # configs/tiny.py, ./runs/tiny
    python -m prime_jax.main --config=configs/tiny.py --config.algo.estimator=outcome_rloo \\
        --workdir=runs/tiny_outcome
    python -m prime_jax.main --config=configs/qwen7b.py --workdir=gs://... --config.total_steps=100
    python -m prime_jax.main --config=configs/tiny.py --export_hf   # latest checkpoint -> WORKDIR/hf_export
    python -m prime_jax.main --config=configs/tiny.py --sft_only    # the SFT stage alone -> WORKDIR/reference

A workdir that holds checkpoints is resumed from the latest intact one. Every config field is
checked before anything heavy starts; a bad value, an unknown field, a missing config file, a
workdir that cannot be written, data with no usable rows or no prompt that fits, or a workdir
whose checkpoints are all damaged prints one line and exits with 2.
"""

from __future__ import annotations

import logging as py_logging
from pathlib import Path

from absl import app, flags, logging

from prime_jax import cli

DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.py")

_CONFIG = cli.define_config_flag(
    "main", DEFAULT_CONFIG, "Config file (a get_config() returning prime_jax.config.base_config() with changes); "
    "fields are overridden with --config.section.field=value.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, metrics.jsonl, tb/, rollouts/, hf_export/); "
                               "default ./runs/<config.name>. Resumed when it holds checkpoints.")
_SKIP_MEMORY_CHECK = flags.DEFINE_bool("skip_memory_check", False, "Do not compile the memory plan before "
                                       "loading weights (it runs on TPU/GPU backends; CPU runs skip it).")
_EXPORT_HF = flags.DEFINE_bool("export_hf", False, "Only export the latest checkpoint's policy to WORKDIR/hf_export "
                               "(Hugging Face format) and exit.")
_SFT_ONLY = flags.DEFINE_bool("sft_only", False, "Only run the SFT stage (the frozen reference, saved in "
                              "WORKDIR/reference; skipped when it is there) and exit.")


def fail(message: str, code: int = 2) -> None:
    cli.fail("main", message, code)


def main(argv) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    from prime_jax.config import ConfigError, validate
    from prime_jax.parallel import initialize_distributed, mesh_from_config

    config = cli.config_value("main", _CONFIG)
    try:
        initialize_distributed(config)  # multi-host start-up; a no-op on one host
        validate(config)
    except ConfigError as e:
        fail(f"config {e}")
    except ValueError as e:  # e.g. distributed settings from the environment
        fail(str(e))
    mesh = mesh_from_config(config)  # the run's one mesh: policy, PRM, reference and sampler share it
    workdir = Path(_WORKDIR.value or Path("runs") / config.name)
    try:
        cli.ensure_writable(workdir, "workdir")
    except PermissionError as e:
        fail(str(e))
    logging.set_verbosity(logging.WARNING)  # orbax/absl chatter
    import jax

    # Several processes: process 0 logs progress; the others only warnings and errors.
    py_logging.getLogger("prime_jax").setLevel(py_logging.INFO if jax.process_index() == 0 else py_logging.WARNING)
    py_logging.getLogger("prime_jax.data").setLevel(py_logging.WARNING)  # per-batch rendering stats
    logging.info("workdir %s, mesh %s", workdir, dict(mesh.shape))

    if jax.default_backend() != "cpu" and not (_SKIP_MEMORY_CHECK.value or _EXPORT_HF.value or _SFT_ONLY.value):
        # Compile every program of an iteration from abstract shapes and refuse a run that cannot
        # fit in device memory, before minutes of weight loading (see prime_jax/plan.py).
        from prime_jax.plan import PlanDoesNotFit, check_fits

        try:
            check_fits(config, jax.devices())
        except PlanDoesNotFit as e:
            fail(f"memory plan does not fit (rerun with a bigger mesh or more micro-batches):\n{e}")

    from prime_jax.data import DataError
    from prime_jax.models.config import UnsupportedModelError
    from prime_jax.train.checkpoint import CheckpointError
    from prime_jax.train.builder import RunLayout
    from prime_jax.train.loop import Trainer, export_latest
    from prime_jax.train.warm_start import reference_params
    from prime_jax.train.metrics import last_eval_row

    try:
        if _EXPORT_HF.value:
            folder = export_latest(config, workdir, mesh)
            print(f"exported {folder}")
            return
        if _SFT_ONLY.value:
            reference_params(config, workdir, mesh)
            print(f"SFT stage done: {RunLayout(workdir).reference}" if config.sft.steps else
                  "sft.steps is 0: the reference is the start model; nothing to train")
            return
        trainer = Trainer.create(config, workdir, mesh)
        last_eval = trainer.run()
    except (DataError, CheckpointError, FileNotFoundError, PermissionError, UnsupportedModelError) as e:
        fail(" ".join(str(e).split()))
    if trainer.preempted_at is not None:  # SIGTERM on some host: a checkpoint was saved, exit 0
        print(f"preempted: stopped after step {trainer.preempted_at} with a checkpoint in {workdir}; "
              "rerun the same command to resume")
        return
    if not last_eval:  # a finished run rerun: nothing new was evaluated; report its last evaluation
        last_eval = last_eval_row(workdir / "metrics.jsonl") or {}
        print(f"run already finished (total_steps {config.total_steps}); nothing to do", flush=True)
    if last_eval:
        print(f"final eval/accuracy {last_eval.get('eval/accuracy', float('nan')):.4f} at step "
              f"{last_eval.get('step', '?')} (workdir {workdir})")


def run() -> None:
    cli.quiet_startup()
    app.run(main, flags_parser=cli.flags_parser("main"))


if __name__ == "__main__":
    run()
