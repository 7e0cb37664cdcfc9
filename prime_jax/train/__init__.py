"""Training: the PRIME run and everything it is built from.

* ``builder``: the one builder of a run's parts (model config, tokenizer, optimizers, train steps,
  sampler and its programs, batch shapes) and the run's file layout (``RunLayout``);
* ``state``, ``steps``, ``accumulate``, ``batch``: train states, the jitted score / PRM / policy steps
  with gradient accumulation and the NaN guard, and the typed batch they take (``PrimeBatch``);
* ``run_data``, ``rollouts``: what a run reads (tokenizer, eval sets, prompts) and a step's rollouts
  (draw → sample → grade → filter → batch, and their log-probs);
* ``prm_phase``, ``process_rewards``: the implicit PRM's update and the step's q, and q → advantages;
* ``run_state``, ``loop``: what an iteration reads and writes (``RunState``, checkpointed whole), the PRIME
  iteration as a transition (``Trainer.step(state, step) -> (state, row)``) and the run around it (its hooks);
* ``warm_start``, ``sft``: the SFT stage that makes the frozen reference;
* ``evaluation``, ``report``, ``metrics``, ``checkpoint``, ``run_config``, ``preemption``: held-out
  eval, the token-reward pages, metrics files, checkpoints and export, the config across restarts,
  SIGTERM / Ctrl-C.
"""

from prime_jax.train.accumulate import accumulate_gradients, merge_micro_batches, split_micro_batches
from prime_jax.train.batch import PrimeBatch
from prime_jax.train.state import (
    TrainState,
    create_train_state,
    make_optimizer,
    policy_optimizer,
    prm_optimizer,
    split_params,
    train_state_shardings,
)
from prime_jax.train.steps import TrainSteps, apply_update, make_train_steps, sequence_logprobs

__all__ = [
    "PrimeBatch",
    "TrainState",
    "TrainSteps",
    "accumulate_gradients",
    "apply_update",
    "create_train_state",
    "make_optimizer",
    "make_train_steps",
    "merge_micro_batches",
    "policy_optimizer",
    "prm_optimizer",
    "sequence_logprobs",
    "split_micro_batches",
    "split_params",
    "train_state_shardings",
]

# The trainer: the PRIME loop, the SFT warm start, checkpoints, metrics and the HTML report.
from prime_jax.train.checkpoint import RunCheckpointer, export_hf, restore_params, save_params
from prime_jax.train.loop import Trainer, export_latest, train
from prime_jax.train.metrics import MetricsLogger, read_metrics, truncate_metrics
from prime_jax.train.report import write_rollouts_html
from prime_jax.train.sft import encode_examples, run_sft

__all__ += [
    "MetricsLogger",
    "RunCheckpointer",
    "Trainer",
    "encode_examples",
    "export_hf",
    "export_latest",
    "read_metrics",
    "restore_params",
    "run_sft",
    "save_params",
    "train",
    "truncate_metrics",
    "write_rollouts_html",
]
