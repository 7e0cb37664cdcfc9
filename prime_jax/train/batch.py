"""`PrimeBatch`: the one form a step's rows take from the sampler to the updates.

Rows are grouped by prompt (rows [g·n, (g+1)·n) are prompt g's n samples). Each field names its
logical axes (`FIELDS`, the schema), so `parallel/` decides how it is sharded; a field not computed
yet is None (an empty pytree node: jit and the transfer functions skip it).

    prompt_ids    [B, P] int32  left-padded        prompt_mask   [B, P] int32
    response_ids  [B, R] int32  right-padded       response_mask [B, R] int32 (EOS included)
    outcome       [B]    float32  verifier score in [0, 1]
    old_logprobs  [B, R] float32  rollout policy (sampler or recomputed), 0 at padding
    ref_logprobs  [B, R] float32  frozen reference (raw logits), 0 at padding
    advantages    [B, R] float32
    group_scores  [B]    float32  sum of q per row from the PRM's scoring pass before its updates
                                  (the dpo / bon_* PRM losses; train/prm_phase.py)

The same class holds host rows (numpy, every process the whole batch) while a step collects
and filters groups, and global device arrays (`to_device`) from scoring to the policy update.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import jax
import numpy as np

from prime_jax.parallel import put_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrimeBatch:
    prompt_ids: Any
    prompt_mask: Any
    response_ids: Any
    response_mask: Any
    outcome: Any = None
    old_logprobs: Any = None
    ref_logprobs: Any = None
    advantages: Any = None
    group_scores: Any = None

    #: The schema, one row per field: (its columns: "prompt" | "response" | None for one value per
    #: row, dtype, logical axes). Shapes and shardings of abstract batches (`RunBuilder.abstract_batch`)
    #: and the placement of device batches (`to_device`) are read from here.
    FIELDS: ClassVar[dict[str, tuple[str | None, Any, tuple[str | None, ...]]]] = {
        "prompt_ids": ("prompt", np.int32, ("batch", "seq")),
        "prompt_mask": ("prompt", np.int32, ("batch", "seq")),
        "response_ids": ("response", np.int32, ("batch", "seq")),
        "response_mask": ("response", np.int32, ("batch", "seq")),
        "outcome": (None, np.float32, ("batch",)),
        "old_logprobs": ("response", np.float32, ("batch", "seq")),
        "ref_logprobs": ("response", np.float32, ("batch", "seq")),
        "advantages": ("response", np.float32, ("batch", "seq")),
        "group_scores": (None, np.float32, ("batch",)),
    }
    LOGICAL_AXES: ClassVar[dict[str, tuple[str | None, ...]]] = {name: f[2] for name, f in FIELDS.items()}
    RESPONSE_FIELDS: ClassVar[tuple[str, ...]] = tuple(name for name, f in FIELDS.items() if f[0] == "response")
    #: The fields each jitted step reads (`train/steps.py` selects them); the PRM step of the dpo / bon_*
    #: losses also reads group_scores.
    READS: ClassVar[dict[str, tuple[str, ...]]] = {
        "score": ("prompt_ids", "prompt_mask", "response_ids", "response_mask"),
        "prm": ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "ref_logprobs", "outcome"),
        "policy": ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "old_logprobs", "advantages"),
    }

    @property
    def num_rows(self) -> int:
        return int(self.response_mask.shape[0])

    def fields(self) -> dict[str, Any]:
        """{name: array} of the fields that are set."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def replace(self, **changes) -> "PrimeBatch":
        return dataclasses.replace(self, **changes)

    def select(self, names: Sequence[str]) -> dict[str, Any]:
        """{name: array} of `names` (what a jitted step reads); raises naming any field not set."""
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise KeyError(f"PrimeBatch: {missing} not set")
        return {name: getattr(self, name) for name in names}

    # ------------------------------------------------------------------ host rows
    def rows(self, index) -> "PrimeBatch":
        """The rows `index` (slice or int array) of a host batch."""
        return PrimeBatch(**{name: np.asarray(value)[index] for name, value in self.fields().items()})

    def crop_responses(self, width: int) -> "PrimeBatch":
        """Response columns cut to `width` (the columns beyond every response's end are padding)."""
        return self.replace(**{name: np.asarray(value)[:, :width] for name, value in self.fields().items()
                               if name in self.RESPONSE_FIELDS})

    @staticmethod
    def concatenate(parts: Sequence["PrimeBatch"]) -> "PrimeBatch":
        names = parts[0].fields()
        return PrimeBatch(**{name: np.concatenate([np.asarray(getattr(p, name)) for p in parts]) for name in names})

    def to_device(self, mesh) -> "PrimeBatch":
        """Global arrays sharded by `LOGICAL_AXES` (every process holds this host batch in full and
        feeds only its own devices' rows)."""
        fields = self.fields()
        placed = put_rows(fields, mesh, {name: self.LOGICAL_AXES[name] for name in fields})
        return self.replace(**placed)
