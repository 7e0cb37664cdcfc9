"""Training: train state, jitted score / PRM / policy steps, gradient accumulation."""

from prime_jax.train.accumulate import accumulate_gradients, merge_micro_batches, split_micro_batches
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
