"""The SFT stage: a run's frozen reference, before any PRIME step.

    python -m prime_jax.main --config=configs/tiny.py --sft_only   # this stage alone

The reference is the start model (model.path, or the seeded random init) after `sft.steps` of
SFT on demonstrations (`data.sft_pairs`; the eval problems are held out). It is trained once,
saved in WORKDIR/reference and restored from there by every later start (resume, evaluation of
the run's PRM); with `sft.steps` 0 it is the start model itself. `sft.reference_dir` names an
earlier run's reference to restore instead, so one SFT stage serves several seeds and estimators:

    python -m prime_jax.main --config=configs/smollm2_135m.py --workdir=runs/sft --sft_only
    python -m prime_jax.main --config=configs/smollm2_135m.py --workdir=runs/prime \\
        --config.sft.reference_dir=runs/sft/reference

Policy and PRM start from it (`train.loop.Trainer`).

The stage resumes: its state is saved in WORKDIR/sft_checkpoints every `sft.checkpoint_every`
steps and when the process gets SIGTERM or Ctrl-C (it then stops with `SFTPreempted`; `prime_jax.main`
exits 0, or 130 for Ctrl-C, saying so), and a rerun continues from there with the same batches. The folder is
removed once the reference is saved.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from prime_jax.data import DataError, held_out, load_eval_sets, sft_pairs
from prime_jax.parallel import is_logging_process
from prime_jax.sampling import PAD_ID
from prime_jax.train import checkpoint as ckpt
from prime_jax.parallel import with_shardings
from prime_jax.train.builder import RunBuilder, RunLayout, abstract_params
from prime_jax.train.preemption import PreemptionWatch
from prime_jax.train.sft import SFTPreempted, encode_examples, run_sft, sft_optimizer
from prime_jax.train.state import abstract_train_state, split_params, train_state_shardings

logger = logging.getLogger(__name__)


def reference_params(config, workdir, mesh, *, builder: RunBuilder | None = None, tokenizer=None):
    """The run's frozen reference params on `mesh`: restored from WORKDIR/reference, else trained
    (SFT) and saved there, else (sft.steps 0) the start model's. `builder`, `tokenizer`: the run's,
    when the caller has them already (`Trainer.create`)."""
    c = config
    builder, layout = builder or RunBuilder(c, mesh), RunLayout(workdir)
    is_main = is_logging_process()
    tokenizer = tokenizer if tokenizer is not None else builder.tokenizer(layout, is_main)
    saved = Path(c.sft.reference_dir).expanduser() if c.sft.reference_dir else layout.reference
    if c.sft.reference_dir or (c.sft.steps and ckpt.params_saved(saved)):
        logger.info("reference (SFT) weights: restoring %s", saved)
        _, target = abstract_params(builder.model_config(len(tokenizer)), mesh)
        return ckpt.restore_or_raise(lambda: ckpt.restore_params(saved, target), f"reference {saved}")
    model = builder.load_model(vocab_size=len(tokenizer))
    if c.sft.steps == 0:
        return split_params(model)[1]
    return _train_reference(c, model, tokenizer, layout, mesh, is_main)


def _sft_examples(c, tokenizer) -> tuple[list, int]:
    """(the encoded demonstrations of sft.data, less the held-out problems; how many were too long)."""
    exclude = held_out(load_eval_sets(c)[0])
    examples, dropped = encode_examples(tokenizer, sft_pairs(c, exclude), max_prompt_tokens=c.data.max_prompt_tokens,
                                        max_response_tokens=c.rollout.max_new_tokens)
    if not examples:
        raise DataError(f"sft.data: all {dropped} demonstrations are longer than data.max_prompt_tokens="
                        f"{c.data.max_prompt_tokens} (prompt) or rollout.max_new_tokens={c.rollout.max_new_tokens} "
                        "(response); raise them or use shorter demonstrations")
    return examples, dropped


def _train_reference(c, model, tokenizer, layout: RunLayout, mesh, is_main: bool):
    """Runs the SFT stage from `model` (resumable from WORKDIR/sft_checkpoints), saves the params in
    WORKDIR/reference and returns them."""
    examples, dropped = _sft_examples(c, tokenizer)
    layout.workdir.mkdir(parents=True, exist_ok=True)
    folder = layout.workdir / "sft_checkpoints"
    checkpointer = ckpt.RunCheckpointer(folder, keep=1, async_save=False)
    resume = _resume(checkpointer, c, split_params(model)[1], mesh)
    if resume is not None:
        logger.info("SFT: resuming after step %d (%s)", resume[0], folder)
    sft_log = _open_log(layout.sft_metrics, resume[0] if resume else 0) if is_main else None

    def log_fn(step, row):
        if sft_log:
            sft_log.write(json.dumps({"sft_step": step, **{k: float(v) for k, v in row.items()}}) + "\n")
            sft_log.flush()
        logger.info("SFT step %d: loss %.4f", step, row["loss"])

    def save_fn(step, state):
        checkpointer.save(step, {"state": state}, {"step": step})
        checkpointer.wait()
        logger.info("SFT: state of step %d saved in %s", step, folder)

    try:
        with PreemptionWatch() as preemption:  # SIGTERM / Ctrl-C from here on: stop after a step, state saved
            logger.info("SFT: %d examples (%d too long), %d steps", len(examples), dropped, c.sft.steps)
            model = run_sft(model, examples, steps=c.sft.steps, lr=c.sft.lr, batch_size=c.sft.batch, mesh=mesh,
                            seed=c.seed, warmup_steps=c.sft.warmup_steps, weight_decay=c.sft.weight_decay,
                            clip_norm=c.sft.clip_norm, pad_id=PAD_ID, chunk_size=c.model.logprob_chunk,
                            log_fn=log_fn, log_every=10, resume=resume, save_fn=save_fn, save_every=c.sft.checkpoint_every,
                            should_stop=preemption.should_stop)
    except SFTPreempted as e:
        e.signal_name = preemption.signal_name  # main says Ctrl-C (exit 130) apart from SIGTERM (exit 0)
        raise
    finally:
        checkpointer.close()
        if sft_log:
            sft_log.close()
    _, params = split_params(model)
    ckpt.save_params(layout.reference, params)
    if is_main:
        shutil.rmtree(folder, ignore_errors=True)
    return params


def _resume(checkpointer, c, params, mesh):
    """(step, TrainState) of the newest intact SFT checkpoint, or None."""
    if not checkpointer.latest_step():
        return None
    optimizer = sft_optimizer(c.sft.lr, c.sft.steps, c.sft.warmup_steps, c.sft.weight_decay, c.sft.clip_norm)
    target = with_shardings(abstract_train_state(params, optimizer), train_state_shardings(params, optimizer, mesh))
    found = checkpointer.restore_latest_intact({"state": target})
    return None if found is None else (found[0], found[1]["state"])


def _open_log(path: Path, resumed_step: int):
    """sft_metrics.jsonl for appending, without rows after `resumed_step` (a resumed stage logs them again)."""
    rows = []
    if resumed_step and path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["sft_step"] <= resumed_step:
                    rows.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    path.write_text("".join(rows))
    return path.open("a")
