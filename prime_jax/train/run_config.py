"""A run's config across restarts: what a resume may change, and the history of what it changed.

A workdir keeps the config it runs with in ``config.json`` (the latest start's) and every start's
changes in ``config_history.jsonl``: the first line holds the whole config of the run's first
start, each later line the step it resumed from and the fields it changed (``{field: [before,
after]}``), so no earlier setting is lost when ``config.json`` is rewritten.

Rerunning a workdir that holds weights (checkpoints, or the SFT reference) with another config:

* a field that decides the saved arrays' shapes (:data:`SHAPE_FIELDS`: the model's architecture,
  its start checkpoint and the tokenizer, whose size is the vocabulary's) cannot change; the
  resume is refused (:class:`ResumeConfigError`, one line naming the field and both values);
* any other change (e.g. ``algo.estimator``, ``total_steps``, the mesh) is allowed, listed in the
  log, and recorded in the history.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any, Mapping

logger = logging.getLogger(__name__)

HISTORY_FILE = "config_history.jsonl"

#: Fields that decide the shapes of the arrays a run saves (policy, PRM, reference, optimizer state).
SHAPE_FIELDS = (
    "model.path", "tokenizer.path", "model.vocab_size", "model.hidden_size", "model.intermediate_size",
    "model.num_layers", "model.num_heads", "model.num_kv_heads", "model.head_dim", "model.tie_word_embeddings",
    "model.model_type",  # qwen2 | llama: whether q/k/v have biases
)


class ResumeConfigError(ValueError):
    """A resume whose config changes the shape of the saved weights; one line naming the field."""


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _plain(config) -> dict:
    """A ConfigDict (or dict) as the JSON-able dict config.json holds."""
    return json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else dict(config)


def config_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, list]:
    """{dotted field: [before, after]} of every field whose value differs (a field only one side
    has counts too, with None on the other)."""
    a, b = _flatten(before), _flatten(after)
    return {k: [a.get(k), b.get(k)] for k in [*a, *(k for k in b if k not in a)] if a.get(k) != b.get(k)}


def _describe(changes: Mapping[str, list]) -> str:
    return ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changes.items())


def check_resume(config, layout, *, has_weights: bool) -> dict[str, list]:
    """The changes of `config` against the run's own (``layout.config_json``); raises
    ResumeConfigError when the run holds weights (`has_weights`) and a SHAPE_FIELDS field changed.
    {} for a new run or one that wrote no config."""
    saved = layout.run_config()
    if not saved:
        return {}
    changes = config_changes(saved, _plain(config))
    shape = [k for k in SHAPE_FIELDS if k in changes]
    if has_weights and shape:
        k = shape[0]
        before, after = changes[k]
        raise ResumeConfigError(
            f"{k} is {after!r} but the run in {layout.workdir} was trained with {before!r}: its checkpoints hold "
            f"weights of that shape. Rerun with --config.{k}={before} to resume, or use another --workdir "
            "for a new run")
    return changes


def record(config, layout, start_step: int) -> dict[str, list]:
    """Writes ``config.json`` (this start's config) and appends this start to the history (the
    whole config on the first start; the changed fields on a later one, if any). Returns the
    changes. Call on the logging process only."""
    new = _plain(config)
    history = layout.workdir / HISTORY_FILE
    saved = layout.run_config()
    now = datetime.datetime.now().isoformat(timespec="seconds")
    entries = []
    if not history.exists():  # the run's first start, or a run from before the history existed
        entries.append({"time": now, "start_step": 0 if not saved else None, "config": saved or new})
    changes = config_changes(saved, new) if saved else {}
    if changes:
        entries.append({"time": now, "start_step": start_step, "changes": changes})
    if entries:
        with open(history, "a", encoding="utf-8") as f:
            for entry in entries:
                f.write(json.dumps(entry) + "\n")
    layout.config_json.write_text(json.dumps(new, indent=2))
    return changes


def log_changes(changes: Mapping[str, list], layout, start_step: int) -> None:
    if changes:
        logger.warning("resuming from step %d with changed settings: %s (every start's settings are kept in %s)",
                       start_step, _describe(changes), layout.workdir / HISTORY_FILE)
