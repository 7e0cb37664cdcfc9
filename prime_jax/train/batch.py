"""`PrimeBatch`: the one form a step's rows take from the sampler to the updates, and the batch's one schema.

Rows are grouped by prompt (rows [g·n, (g+1)·n) are prompt g's n samples). Each field's annotation is
its schema entry (`Field`: shape, dtype, the loop phase that sets it, the jitted programs that read
it); `FIELDS` collects them, and everything else that lists batch fields reads them from there:
the logical axes `parallel/` shards by (`LOGICAL_AXES`), what each jitted step reads (`needs`), which
fields are set when the loop calls a program (`present`: the builder's abstract batches, the plan). A
field not computed yet is None (an empty pytree node: jit and the transfer functions skip it).

The same class holds host rows (numpy, every process the whole batch) while a step collects
and filters groups, and global device arrays (`to_device`) from scoring to the policy update; the
jitted steps take it as it is (`train/steps.py`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, ClassVar, Sequence

import jax
import numpy as np

from prime_jax.parallel import put_rows

#: The phases of one iteration that set batch fields, in the loop's order (`train/loop.py`); with
#: rollout.overlap_scoring the scoring runs before the grading.
PHASES = ("rollout", "grade", "score", "prm_phase", "advantages")
#: The phases done when the loop calls each jitted program (before the overlap_scoring exception).
_DONE_BEFORE = {"score": ("rollout", "grade"), "prm_score": ("rollout", "grade", "score"),
                "prm": ("rollout", "grade", "score", "prm_phase"),
                "policy": ("rollout", "grade", "score", "advantages")}


@dataclasses.dataclass(frozen=True)
class Field:
    """One field's schema. shape: "[B, P]" (prompt columns), "[B, R]" (response columns) or "[B]" (one
    value per row); set_by: the phase (`PHASES`) that sets it ("score" fields only where the run scores
    them, old_logprobs there instead of the sampler's); read_by: the jitted programs that read it (`needs`)."""

    shape: str
    dtype: Any
    set_by: str
    read_by: tuple[str, ...] = ()

    @property
    def columns(self) -> str | None:
        """"prompt" | "response" | None (one value per row)."""
        return _COLUMNS[self.shape]

    @property
    def logical_axes(self) -> tuple[str, ...]:
        return ("batch", "seq") if self.columns else ("batch",)


_COLUMNS = {"[B, P]": "prompt", "[B, R]": "response", "[B]": None}


_ALL = ("score", "prm", "policy")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrimeBatch:
    prompt_ids: Annotated[Any, Field("[B, P]", np.int32, "rollout", _ALL)]  # left-padded
    prompt_mask: Annotated[Any, Field("[B, P]", np.int32, "rollout", _ALL)]
    response_ids: Annotated[Any, Field("[B, R]", np.int32, "rollout", _ALL)]  # right-padded
    response_mask: Annotated[Any, Field("[B, R]", np.int32, "rollout", _ALL)]  # EOS included
    #: verifier score in [0, 1]
    outcome: Annotated[Any, Field("[B]", np.float32, "grade", ("prm",))] = None
    #: rollout policy (the sampler's, or scored with algo.recompute_old_logprobs), 0 at padding
    old_logprobs: Annotated[Any, Field("[B, R]", np.float32, "rollout", ("policy",))] = None
    #: the frozen reference (raw logits), 0 at padding; scored when process rewards are on
    ref_logprobs: Annotated[Any, Field("[B, R]", np.float32, "score", ("prm",))] = None
    advantages: Annotated[Any, Field("[B, R]", np.float32, "advantages", ("policy",))] = None
    #: sum of q per row from the PRM's scoring pass before its updates, set on the PRM's mini-batches;
    #: read by the dpo / bon_* PRM losses only (algo.GROUP_SCORE_LOSS_TYPES; train/prm_phase.py)
    group_scores: Annotated[Any, Field("[B]", np.float32, "prm_phase", ("prm",))] = None

    FIELDS: ClassVar[dict[str, Field]]  # {name: Field}, in the order of the class (read from the annotations)
    LOGICAL_AXES: ClassVar[dict[str, tuple[str, ...]]]
    RESPONSE_FIELDS: ClassVar[tuple[str, ...]]

    @classmethod
    def needs(cls, program: str, *, group_scores: bool = False) -> tuple[str, ...]:
        """The fields the jitted `program` ("score", "prm", "policy") reads; group_scores: the PRM
        loss reads them (the dpo / bon_* losses)."""
        if program not in _ALL:
            raise ValueError(f"unknown program {program!r}; expected one of {_ALL}")
        return tuple(name for name, f in cls.FIELDS.items()
                     if program in f.read_by and (name != "group_scores" or group_scores))

    @classmethod
    def present(cls, program: str, *, scored: Sequence[str], overlap_scoring: bool = False,
                group_scores: bool = False) -> tuple[str, ...]:
        """The fields set when the loop calls `program` ("score", "prm_score", "prm", "policy"): the
        program's inputs as a pytree. scored: the log-probs the run scores (`RunBuilder.scored_fields`);
        overlap_scoring: scoring runs before grading; group_scores: the PRM's mini-batches carry them."""
        done = set(_DONE_BEFORE[program])
        if program == "score" and overlap_scoring:
            done.discard("grade")
        if not group_scores:
            done.discard("prm_phase")

        def set_by(name, f):
            if name in scored:
                return "score"
            return None if f.set_by == "score" else f.set_by  # a "score" field the run does not score: never set

        return tuple(name for name, f in cls.FIELDS.items() if set_by(name, f) in done)

    @property
    def num_rows(self) -> int:
        return int(self.response_mask.shape[0])

    def fields(self) -> dict[str, Any]:
        """{name: array} of the fields that are set."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def replace(self, **changes) -> "PrimeBatch":
        return dataclasses.replace(self, **changes)

    def only(self, names: Sequence[str]) -> "PrimeBatch":
        """The batch with just the fields `names` (what a jitted step reads; the others None); raises
        naming any field not set."""
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise KeyError(f"PrimeBatch: {missing} not set")
        return PrimeBatch(**{name: getattr(self, name) if name in names else None for name in self.FIELDS})

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


PrimeBatch.FIELDS = {name: hint.__metadata__[0]
                     for name, hint in typing.get_type_hints(PrimeBatch, include_extras=True).items()
                     if hasattr(hint, "__metadata__")}
PrimeBatch.LOGICAL_AXES = {name: f.logical_axes for name, f in PrimeBatch.FIELDS.items()}
PrimeBatch.RESPONSE_FIELDS = tuple(name for name, f in PrimeBatch.FIELDS.items() if f.columns == "response")
