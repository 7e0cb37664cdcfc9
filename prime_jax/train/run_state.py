"""`RunState`: everything a PRIME iteration reads and writes besides the run's fixed parts (config,
reference, data, programs), checkpointed whole.

    state, row = trainer.step(state, step)      # train/loop.py: one iteration, a transition

The device part (policy and PRM train states, the base PRNG key) is the pytree's leaves; the host part
(the process_ramp moving average, the data cursor) rides as its static part, in JSON. A checkpoint holds
the two as orbax's `state` (`arrays`) and `meta` (`meta`) items, the layout checkpoints had before
this class, so older run checkpoints restore.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax

from prime_jax.train.state import TrainState

logger = logging.getLogger(__name__)

#: The moving average of the PRM's fresh ranking at the start (algo.process_ramp): chance.
CHANCE_RANKING = 0.5


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RunState:
    """policy, prm: the `TrainState`s (params, optimizer state, update and NaN-skip counters); key: the
    base PRNG key (replicated; a step samples with `fold_in(key, step)`); ranking_ema: the moving average
    of the PRM's fresh ranking (algo.process_ramp; a float, which JSON keeps exactly); prompts: the data
    cursor (`PromptSource.state()`: the iterator's position, the prompts carried over, the drop count)."""

    policy: TrainState
    prm: TrainState
    key: jax.Array
    ranking_ema: float = dataclasses.field(default=CHANCE_RANKING, metadata={"static": True})
    prompts: Any = dataclasses.field(default=None, metadata={"static": True})

    def replace(self, **changes) -> "RunState":
        return dataclasses.replace(self, **changes)

    def arrays(self) -> dict:
        """The checkpoint's `state` item: {"policy", "prm", "key"}."""
        return {"policy": self.policy, "prm": self.prm, "key": self.key}

    def meta(self, step: int) -> dict:
        """The checkpoint's `meta` item (JSON)."""
        return {"step": step, "prompts": self.prompts, "ranking_ema": self.ranking_ema}

    @classmethod
    def from_checkpoint(cls, step: int, arrays: dict, meta: dict, *, ramp: bool) -> "RunState":
        """The state a checkpoint's two items hold. ramp: algo.process_ramp is on (a checkpoint from before
        the average was saved then restarts it at chance, with a warning)."""
        if "ranking_ema" not in meta and ramp:
            logger.warning("the checkpoint of step %d predates the saved process_ramp average: it restarts at chance "
                           "(0.5), so this run departs from an uninterrupted one", step)
        return cls(arrays["policy"], arrays["prm"], arrays["key"],
                   float(meta.get("ranking_ema", CHANCE_RANKING)), meta["prompts"])
