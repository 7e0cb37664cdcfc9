"""PRIME training CLI.

    python -m prime_jax.main                                   # configs/tiny.py, ./runs/tiny
    python -m prime_jax.main --config=configs/tiny.py --config.algo.estimator=outcome_rloo \\
        --workdir=runs/tiny_outcome
    python -m prime_jax.main --config=configs/qwen7b.py --workdir=gs://... --config.total_steps=100
    python -m prime_jax.main --config=configs/tiny.py --export_hf   # latest checkpoint -> WORKDIR/hf_export
    python -m prime_jax.main --config=configs/tiny.py --sft_only    # the SFT stage alone -> WORKDIR/reference
    python -m prime_jax.main --config=configs/tiny.py --stop_after=10   # steps up to 10, a checkpoint, exit 0

A workdir that holds checkpoints is resumed from the latest intact one. Every config field is
checked before anything heavy starts; a bad value, an unknown field, a missing config file, a
workdir that cannot be written, data with no usable rows or no prompt that fits, or a workdir
whose checkpoints are all damaged prints one line and exits with 2.
"""

from __future__ import annotations

import logging as py_logging
import sys
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
_LIST_FIELDS = cli.define_list_fields_flag()
_STOP_AFTER = flags.DEFINE_integer("stop_after", None, "Stop after this step with a checkpoint, as on SIGTERM, and "
                                   "exit 0 (a long run in chunks); the same command with a larger value, or "
                                   "without it, continues the run.", lower_bound=0)


def fail(message: str, code: int = 2) -> None:
    cli.fail("main", message, code)


def main(argv) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    config = cli.config_value("main", _CONFIG)
    if _LIST_FIELDS.value:
        cli.list_fields(config, sys.argv, DEFAULT_CONFIG)
        return
    mesh, workdir = _start(config)
    _quiet_logs(workdir, mesh)
    if not (_SKIP_MEMORY_CHECK.value or _EXPORT_HF.value or _SFT_ONLY.value):
        _check_memory_plan(config)
    # the training code, imported here for the reason said in `_start`
    from prime_jax.train.builder import RunLayout

    layout = RunLayout(workdir)
    _check_resume(config, layout)
    ran = _run(config, layout, mesh)
    if ran is not None:
        _report_end(config, workdir, *ran)


def _start(config):
    """Validates `config` (after the multi-host start-up) and checks the workdir can be written;
    returns the run's one mesh and the workdir."""
    # The program's modules are imported in the phases, not at the top: `--help` and flag errors answer
    # without loading jax and the model code (seconds), and `cli.quiet_startup` runs before jax loads.
    from prime_jax.config import ConfigError, validate
    from prime_jax.parallel import initialize_distributed, mesh_from_config

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
    return mesh, workdir


def _quiet_logs(workdir: Path, mesh) -> None:
    logging.set_verbosity(logging.WARNING)  # orbax/absl chatter
    import jax  # see `_start`

    # Several processes: process 0 logs progress; the others only warnings and errors.
    py_logging.getLogger("prime_jax").setLevel(py_logging.INFO if jax.process_index() == 0 else py_logging.WARNING)
    py_logging.getLogger("prime_jax.data").setLevel(py_logging.WARNING)  # per-batch rendering stats
    logging.info("workdir %s, mesh %s", workdir, dict(mesh.shape))


def _check_memory_plan(config) -> None:
    """Compiles every program of an iteration from abstract shapes and refuses a run that cannot fit in
    device memory, before minutes of weight loading (see prime_jax/plan/). CPU runs skip it."""
    import jax  # see `_start`

    if jax.default_backend() == "cpu":
        return
    from prime_jax.plan import PlanDoesNotFit  # see `_start`
    from prime_jax.plan.memory import check_fits

    try:
        check_fits(config, jax.devices())
    except PlanDoesNotFit as e:
        fail(f"memory plan does not fit (rerun with a bigger mesh or more micro-batches):\n{e}")


def _check_resume(config, layout) -> None:
    """A resume may change settings, not the shapes of the weights it holds; the changes are logged."""
    import jax  # see `_start`

    from prime_jax.parallel import host_watch
    from prime_jax.train import run_config
    from prime_jax.train.checkpoint import params_saved

    host_watch.configure("main", lambda: _resume_hint(layout))  # what a lost host's line says (several hosts)
    try:
        changes = run_config.check_resume(config, layout, has_weights=bool(layout.checkpoint_steps())
                                          or params_saved(layout.reference))
    except run_config.ResumeConfigError as e:
        fail(str(e))
    if jax.process_index() == 0 and not _EXPORT_HF.value:
        run_config.log_changes(changes, layout, max(layout.checkpoint_steps(), default=0))


def _run(config, layout, mesh):
    """The run the flags ask for: export, the SFT stage alone, or training (its `Trainer` and last
    evaluation row are returned; None when there is nothing more to report). A failure it can explain prints one line and exits."""
    import jax  # see `_start`

    from prime_jax.data import DataError
    from prime_jax.models.config import UnsupportedModelError
    from prime_jax.parallel import host_watch
    from prime_jax.train import run_config
    from prime_jax.train.checkpoint import CheckpointError
    from prime_jax.train.loop import Trainer, export_latest
    from prime_jax.train.sft import SFTPreempted
    from prime_jax.train.warm_start import reference_params

    workdir = layout.workdir
    try:
        if _EXPORT_HF.value:
            folder = export_latest(config, workdir, mesh)
            print(f"exported {folder}")
            return None
        if _SFT_ONLY.value:
            reference_params(config, workdir, mesh)
            if jax.process_index() == 0:
                run_config.record(config, layout, max(layout.checkpoint_steps(), default=0))
            print(f"SFT stage done: {layout.reference}" if config.sft.steps else
                  "sft.steps is 0: the reference is the start model; nothing to train")
            return None
        trainer = Trainer.create(config, workdir, mesh)
        return trainer, trainer.run(stop_after=_STOP_AFTER.value)
    except (DataError, CheckpointError, FileNotFoundError, PermissionError, UnsupportedModelError) as e:
        fail(" ".join(str(e).split()))
    except SFTPreempted as e:  # SIGTERM (exit 0) or Ctrl-C (exit 130) during the SFT stage: its state was saved
        stopped = (f"the SFT stage stopped after step {e.step} with its state in "
                   f"{layout.workdir / 'sft_checkpoints'}; rerun the same command to resume")
        if e.signal_name == "SIGINT":
            cli.interrupted("main", stopped)
        print(f"preempted: {stopped}")
        return None
    except KeyboardInterrupt:  # a second Ctrl-C in the loop, or Ctrl-C before it or during SFT / export
        cli.interrupted("main", _nothing_saved_since(config, layout))
    except Exception as e:  # noqa: BLE001 - a collective that failed because a host died: said in one line
        host_watch.explain_failure(e)
        raise


def _report_end(config, workdir: Path, trainer, last_eval: dict) -> None:
    """How the training run ended: stopped early (a checkpoint saved; Ctrl-C exits 130) or finished."""
    if trainer.preempted_at is not None:  # a signal on some host, or --stop_after: a checkpoint was saved
        saved = f"after step {trainer.preempted_at} with a checkpoint in {workdir}" if trainer.preempted_at else \
            f"before step 1 (no checkpoint yet) in {workdir}"
        if trainer.stop_signal == "SIGINT":  # Ctrl-C here: the shell's status for an interrupted command
            print(f"interrupted (Ctrl-C): stopped {saved}; rerun the same command to resume", flush=True)
            sys.exit(130)
        if trainer.stop_signal is None and _STOP_AFTER.value is not None and trainer.preempted_at >= _STOP_AFTER.value:
            print(f"stopped {saved} (--stop_after); rerun with a larger --stop_after, or without it, to continue")
        else:
            print(f"preempted: stopped {saved}; rerun the same command to resume")  # SIGTERM: exit 0
        return
    if not last_eval:  # a finished run rerun: nothing new was evaluated; report its last evaluation
        from prime_jax.train.metrics import last_eval_row  # see `_start`

        last_eval = last_eval_row(workdir / "metrics.jsonl") or {}
        print(f"run already finished (total_steps {config.total_steps}); nothing to do", flush=True)
    if last_eval:
        print(f"final eval/accuracy {last_eval.get('eval/accuracy', float('nan')):.4f} at step "
              f"{last_eval.get('step', '?')} (workdir {workdir})")


def _resume_hint(layout) -> str:
    steps = layout.checkpoint_steps()
    if steps:
        return (f"the last checkpoint is step {steps[-1]} in {layout.checkpoints}; rerun the same command on all "
                "hosts to resume")
    return "no checkpoint was saved yet; rerun the same command on all hosts to start again"


def _nothing_saved_since(config, layout) -> str:
    """What an interruption outside the loop's step boundaries leaves to resume from."""
    from prime_jax.train.checkpoint import params_saved  # orbax: loaded in the phases only, see `_start`

    steps = layout.checkpoint_steps()
    if steps:
        return (f"stopped without saving the step in progress; the last checkpoint is step {steps[-1]} in "
                f"{layout.checkpoints}: rerun the same command to resume from it")
    if config.sft.steps and params_saved(layout.reference):
        return (f"stopped before the first checkpoint; the SFT weights are kept in {layout.reference}: rerun the "
                "same command to start PRIME from them")
    if config.sft.steps:
        return "stopped before the SFT stage saved any state; rerun the same command to start again"
    return "stopped before the first checkpoint; rerun the same command to start again"


def run() -> None:
    cli.quiet_startup()
    help_text = cli.help_text("main", __doc__, ["config", "workdir", "export_hf", "sft_only", "skip_memory_check"],
                              DEFAULT_CONFIG)
    try:
        app.run(main, flags_parser=cli.flags_parser("main", help_text))
    except KeyboardInterrupt:  # Ctrl-C while starting up (imports, flags): nothing to keep
        cli.interrupted("main", "stopped while starting; nothing was done")


if __name__ == "__main__":
    run()
