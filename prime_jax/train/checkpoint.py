"""Checkpoints of a PRIME run (orbax), the frozen reference weights, and the HF export.

A run checkpoint, WORKDIR/checkpoints/<step>/, holds everything needed to continue bit for bit:

* ``state`` (orbax StandardSave, sharded arrays): the policy and PRM TrainStates (params, AdamW
  state, update and NaN-skip counters) and the run's base PRNG key;
* ``meta`` (JSON): the step, the data iterator's position, the prompt buffer (surplus prompts
  kept for the next step) and any other host-side state of the loop.

Saves are asynchronous (training continues while arrays are written) and atomic: orbax writes a
temporary folder and renames it to ``<step>`` only when complete, so a run killed mid-save
restarts from the previous checkpoint; ``max_to_keep`` keeps the last k.

A checkpoint that no longer restores (a truncated or deleted file) is reported in one line and
moved aside to ``damaged_step_<step>``; the run resumes from the newest intact one, or refuses
(:class:`CheckpointError`) when none is intact.

The frozen reference (the SFT weights) is saved once, WORKDIR/reference/, since it never changes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from flax import nnx
from huggingface_hub import try_to_load_from_cache

from prime_jax.models import save_pretrained
from prime_jax.models.packaged import resolve_model_folder
from prime_jax.models.tokenizer import eos_token_ids, save_tokenizer
from prime_jax.parallel import sync_hosts
from prime_jax.train.builder import abstract_params, checkpoint_steps

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be used; the message is one line saying which and what to do."""


def restore_or_raise(restore: Callable[[], Any], what: str) -> Any:
    """`restore()`, with what orbax prints while a damaged checkpoint fails muted; the failure
    becomes one CheckpointError line, ``<what> is damaged (<root cause>)`` (`.cause` holds the cause)."""
    details = Path(tempfile.mkstemp(prefix="restore_", suffix=".log")[1])
    try:
        with _quiet_restore(details):
            return restore()
    except Exception as e:  # noqa: BLE001 - any read error means the checkpoint is unusable
        error = CheckpointError(f"{what} is damaged ({_one_line(e)})")
        error.cause = _one_line(e)
        raise error from e
    finally:
        details.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_restore(details: Path):
    """Sends what orbax, tensorstore and asyncio print while a damaged checkpoint fails to restore
    (hundreds of lines of tracebacks from worker threads and unawaited coroutines, written to the
    stderr file descriptor) to the file `details`; the caller reports the failure in one line."""
    names = ("absl", "orbax", "asyncio")
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    sys.stderr.flush()
    stderr_fd = os.dup(2)
    try:
        with open(details, "wb") as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            except BaseException:
                _settle(details)  # the failed read's worker threads finish printing, into the file
                raise
            finally:
                gc.collect()  # unawaited coroutines of the failed read report now, into the file
                sys.stderr.flush()
                os.dup2(stderr_fd, 2)
    finally:
        os.close(stderr_fd)
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def _settle(details: Path, timeout_s: float = 5.0) -> None:
    """Waits until nothing more is written to `details` for half a second (at most `timeout_s`)."""
    deadline, size, quiet = time.monotonic() + timeout_s, -1, 0
    while time.monotonic() < deadline and quiet < 2:
        gc.collect()
        time.sleep(0.25)
        new_size = details.stat().st_size
        quiet = quiet + 1 if new_size == size else 0
        size = new_size


def _one_line(error: BaseException, limit: int = 200) -> str:
    """The root cause of a restore error, on one line (tensorstore's spec dump cut off)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split()).split(" See full TensorStore details")[0] or type(error).__name__
    return text[:limit] + ("..." if len(text) > limit else "")


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays, as restore targets."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class RunCheckpointer:
    """Save/restore of the run state under ``directory`` (keep-last-k, async, atomic)."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,  # a save interrupted by a kill leaves only a tmp folder
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts saving `state` (pytree of jax arrays) and `meta` (JSON-able) as checkpoint `step`."""
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, meta) of checkpoint `step`; arrays take the shardings of `abstract_state`."""
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        return out.state, dict(out.meta)

    def restore_latest_intact(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest checkpoint that restores, or None when there is none.

        A damaged newer checkpoint is reported (one warning line naming its step) and, once an
        intact one restored, moved aside to ``damaged_step_<step>`` so that later saves of that
        step and `latest_step` do not meet it again. Raises CheckpointError when every checkpoint
        is damaged (nothing is moved then).
        """
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, meta = restore_or_raise(lambda: self.restore(step, abstract_state), f"checkpoint {step}")
            except CheckpointError as e:
                damaged.append((step, e.cause))
                continue
            if damaged:
                logger.warning("checkpoint of step %s in %s is damaged (%s); resuming from step %d, the newest "
                               "intact one (the damaged one moved to %s)",
                               ", ".join(str(d) for d, _ in damaged), self.directory, damaged[0][1], step,
                               ", ".join(f"damaged_step_{d}" for d, _ in damaged))
                if jax.process_index() == 0:
                    for d, _ in damaged:
                        os.replace(self.directory / str(d), self.directory / f"damaged_step_{d}")
                sync_hosts("damaged_checkpoints_moved")  # every process reloads after the move
                self._manager.reload()
            return step, state, meta
        if damaged:
            raise CheckpointError(
                f"every checkpoint in {self.directory} is damaged (steps {', '.join(str(d) for d, _ in damaged)}; "
                f"step {damaged[0][0]}: {damaged[0][1]}); move the folder away to start the run afresh")
        return None

    def restore_meta(self, step: int) -> dict:
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta)

    def wait(self) -> None:
        """Blocks until the background save (if any) is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def restore_model(checkpoints_dir: str | Path, step: int, model_config, mesh, which: str = "policy"):
    """The `which` ("policy" | "prm") model of run checkpoint `step`, restoring only its params
    (no optimizer state), placed on `mesh`."""
    graphdef, target = abstract_params(model_config, mesh)
    item = {which: {"params": target}}
    path = (Path(checkpoints_dir) / str(step) / "state").absolute()
    restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    return nnx.merge(graphdef, restored[which]["params"])


def restore_latest_model(checkpoints_dir: str | Path, model_config, mesh, which: str = "policy"):
    """(step, model) of the newest checkpoint whose `which` params restore; a damaged newer one is
    reported in one line and skipped; CheckpointError when none restores."""
    errors = []
    for step in reversed(checkpoint_steps(Path(checkpoints_dir))):
        try:
            model = restore_or_raise(lambda: restore_model(checkpoints_dir, step, model_config, mesh, which),
                                     f"checkpoint {checkpoints_dir}/{step}")
        except CheckpointError as e:
            logger.warning("%s; trying an older one", e)
            errors.append(str(e))
            continue
        return step, model
    raise CheckpointError("; ".join(errors) or f"{checkpoints_dir} holds no checkpoint")


def save_params(directory: str | Path, params: Any) -> None:
    """Writes a pytree of arrays (e.g. the reference params) to `directory`, synchronously, atomically."""
    directory = Path(directory).absolute()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory, params, force=True)
        ckpt.wait_until_finished()


def restore_params(directory: str | Path, abstract: Any) -> Any:
    """Reads a pytree saved by `save_params`, placed like `abstract` (ShapeDtypeStructs with shardings)."""
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(Path(directory).absolute(), abstract)


def params_saved(directory: str | Path) -> bool:
    """True when `directory` holds a complete (committed) `save_params` checkpoint."""
    d = Path(directory)
    return d.is_dir() and (d / "_CHECKPOINT_METADATA").exists() and ocp.utils.is_checkpoint_finalized(d)


def _source_generation_config(source: str | None) -> dict:
    """The start checkpoint's generation_config.json (a local folder, a GGUF file or packaged model's
    converted folder, or a hub id in the HF cache), or {}."""
    if not source:
        return {}
    path = (resolve_model_folder(source) or Path(source).expanduser()) / "generation_config.json"
    if not path.is_file():
        try:
            cached = try_to_load_from_cache(source, "generation_config.json")
        except Exception:  # noqa: BLE001 - not a hub id
            cached = None
        if not isinstance(cached, str):
            return {}
        path = Path(cached)
    return json.loads(path.read_text())


def generation_config(model_config, tokenizer, *, source: str | None = None, max_new_tokens: int | None = None,
                      temperature: float = 0.0) -> tuple[dict, dict]:
    """(config.json token ids, generation_config.json) of an export.

    config.json keeps the start checkpoint's ids (else the tokenizer's eos/bos/pad). The
    generation config is the start checkpoint's own, if it had one, with every end-of-response
    id our sampler stops at added to `eos_token_id` (a PRIME policy answers in the chat template,
    so it ends with <|im_end|> even where the base model's eos was <|endoftext|>); without one it
    says what our evaluation does: greedy (or `temperature`) for up to `max_new_tokens` tokens.
    """
    stops = eos_token_ids(tokenizer)
    ids = {"bos_token_id": model_config.bos_token_id if model_config.bos_token_id is not None
           else tokenizer.bos_token_id,
           "eos_token_id": model_config.eos_token_id if model_config.eos_token_id is not None else stops[0],
           "pad_token_id": model_config.pad_token_id if model_config.pad_token_id is not None
           else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0])}
    ids = {k: list(v) if isinstance(v, tuple) else v for k, v in ids.items() if v is not None}
    gen = _source_generation_config(source)
    if not gen:
        gen = {"do_sample": temperature > 0, **({"temperature": temperature} if temperature > 0 else {})}
        if max_new_tokens:
            gen["max_new_tokens"] = int(max_new_tokens)
    eos = gen.get("eos_token_id", ids["eos_token_id"])
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    gen["eos_token_id"] = eos + [i for i in stops if i not in eos]
    for key in ("bos_token_id", "pad_token_id"):
        if key in ids:
            gen.setdefault(key, ids[key])
    return ids, gen


def export_hf(model, tokenizer, directory: str | Path, *, dtype: str | None = None, source: str | None = None,
              max_new_tokens: int | None = None, temperature: float = 0.0) -> Path:
    """The policy in Hugging Face format: config.json (with the special token ids) + safetensors +
    generation_config.json + tokenizer files, loadable with AutoTokenizer / AutoModelForCausalLM,
    whose plain `generate()` then stops where our sampler does (see `generation_config`)."""
    directory = Path(directory)
    ids, gen = (generation_config(model.config, tokenizer, source=source, max_new_tokens=max_new_tokens,
                                  temperature=temperature) if tokenizer is not None else ({}, None))
    save_pretrained(model, directory, dtype=dtype, generation_config=gen, token_ids=ids)
    if tokenizer is not None and jax.process_index() == 0:  # several processes: one writes
        save_tokenizer(tokenizer, directory)
    return directory
