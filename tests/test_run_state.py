"""RunState is checkpointed whole: its arrays and its host part (the ramp's average, the data cursor) round-trip
through a checkpoint's two items; the run's hooks are due as eval_every / checkpoint_every said."""

import logging

import jax
import numpy as np

from prime_jax.train.loop import Hook
from prime_jax.train.run_state import CHANCE_RANKING, RunState
from prime_jax.train.state import TrainState


def _state(ema=0.625, prompts=None):
    train = lambda x: TrainState(params={"w": np.full(2, x, np.float32)}, opt_state=(), step=np.int32(3),
                                 nan_skips=np.int32(0))
    return RunState(train(1.0), train(2.0), np.zeros(2, np.uint32), ema,
                    prompts or {"iterator": {"epoch": 0, "index": 5, "seed": 0}, "buffer": [], "dropped": 1})


def test_the_arrays_are_the_leaves_and_the_host_part_rides_in_meta():
    state = _state()
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(state.arrays())) == 7
    meta = state.meta(4)
    assert meta == {"step": 4, "prompts": state.prompts, "ranking_ema": 0.625}
    back = RunState.from_checkpoint(4, state.arrays(), meta, ramp=True)
    assert back.ranking_ema == 0.625 and back.prompts == state.prompts
    assert jax.tree.structure(back) == jax.tree.structure(state)


def test_a_checkpoint_without_the_average_restarts_it_at_chance(caplog):
    state = _state()
    meta = {k: v for k, v in state.meta(2).items() if k != "ranking_ema"}
    with caplog.at_level(logging.WARNING):
        assert RunState.from_checkpoint(2, state.arrays(), meta, ramp=False).ranking_ema == CHANCE_RANKING
    assert not caplog.records  # no ramp: the average is not read
    with caplog.at_level(logging.WARNING):
        assert RunState.from_checkpoint(2, state.arrays(), meta, ramp=True).ranking_ema == CHANCE_RANKING
    assert "predates the saved process_ramp average" in caplog.text


def test_hooks_are_due_every_k_steps_and_after_the_last():
    every3, last_only, end = Hook("eval", 3, print), Hook("eval", 0, print), Hook("export", 0, print, at_end=True)
    assert [s for s in range(1, 8) if every3.due(s, 7)] == [3, 6, 7]
    assert [s for s in range(1, 8) if last_only.due(s, 7)] == [7]
    assert not any(end.due(s, 7) for s in range(1, 8))  # called once by the run, after its last step
