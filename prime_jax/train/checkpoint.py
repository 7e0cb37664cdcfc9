"""Checkpoints of a PRIME run (orbax), the frozen reference weights, and the HF export.

A run checkpoint, WORKDIR/checkpoints/<step>/, holds everything needed to continue bit for bit:

* ``state`` (orbax StandardSave, sharded arrays): the policy and PRM TrainStates (params, AdamW
  state, update and NaN-skip counters) and the run's base PRNG key;
* ``meta`` (JSON): the step, the data iterator's position, the prompt buffer (surplus prompts
  kept for the next step) and any other host-side state of the loop.

Saves are asynchronous (training continues while arrays are written) and atomic: orbax writes a
temporary folder and renames it to ``<step>`` only when complete, so a run killed mid-save
restarts from the previous checkpoint; ``max_to_keep`` keeps the last k.

The frozen reference (the SFT weights) is saved once, WORKDIR/reference/, since it never changes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)


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

    def restore_meta(self, step: int) -> dict:
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta)

    def wait(self) -> None:
        """Blocks until the background save (if any) is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


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


def export_hf(model, tokenizer, directory: str | Path, *, dtype: str | None = None) -> Path:
    """The policy in Hugging Face format (config.json + safetensors + tokenizer files)."""
    from prime_jax.models import save_pretrained

    directory = Path(directory)
    save_pretrained(model, directory, dtype=dtype)
    if tokenizer is not None and jax.process_index() == 0:
        tokenizer.save_pretrained(str(directory))
    return directory
