"""Memory plan: will a PRIME run fit on a slice? Answered before renting it, without weights.

    python -m prime_jax.plan --config=configs/qwen7b.py:v4-64 --devices=32
    python -m prime_jax.plan --config=configs/qwen7b.py --devices=64 --config.batch.micro_batches=4

On a fake N-device CPU mesh (`--xla_force_host_platform_device_count=N`, set before jax starts)
this lowers and compiles ahead of time, from abstract shapes only (`nnx.eval_shape`,
`jax.ShapeDtypeStruct`; nothing is allocated), the five programs of one PRIME iteration, built
by the run's own `train.builder.RunBuilder` and compiled through their public paths:

  sample/prefill  `Sampler.compile`: prefill of one rollout attempt's prompts (KV cache out)
  sample/decode   `Sampler.compile`: the while_loop decode over the sharded KV cache
  score           `TrainSteps.score.lower`: the log-probs the loop scores (old and/or reference)
  prm score       the same: the PRM's own scoring pass (algo.prm_update before / reverse / none)
  prm update      `TrainSteps.prm.lower`: one PRM mini-batch (grad accumulation + AdamW)
  policy update   `TrainSteps.policy.lower`: one PPO mini-batch

and prints, per device, what each phase holds at its peak: params and optimizer state of every
resident model (policy, PRM, frozen reference; exact, from their shardings), gradients, the KV
cache, and activations/temporaries (the rest of XLA's `compiled.memory_analysis()`: argument +
temp + non-aliased output bytes), against the HBM of each target (v4 32 GiB, v5e 16 GiB, v5p
95 GiB, H100 80 GiB: `parallel.HBM_GIB`). A phase fits a target when its peak is at most `--headroom` (90%) of the
HBM. What does not fit gets a suggestion (micro-batches, generate chunks, mesh), estimated by
scaling the activation part linearly with the rows per device; rerun the plan to confirm it.

Method and caveats (docs/scale_out.md has the details):
* The decoder layers are a `lax.scan`, so compile time does not grow with depth: the full
  28-layer 7B programs compile in 3-50 s each on one CPU core (1-2 minutes for the plan).
* XLA:CPU is not XLA:TPU/GPU. It keeps bf16 matmul temporaries in float32 and fuses
  differently, so activation numbers are an estimate (expected on the high side for TPU); the
  params/optimizer/gradient/KV-cache columns are exact. `check_fits(config, jax.devices())` on
  the real slice compiles with the real backend and the real HBM limit.
* Activations are planned as the code shards them: the model constrains each decoder layer's
  hidden states to the `batch` rule (`models/qwen2.py`), and the sampler and train steps trace
  under their mesh (`parallel.under_mesh`), exactly as in the run.
"""

from __future__ import annotations

# The rooms: `memory` compiles the programs and plans them (`plan_memory`, `check_fits`, loading the
# model and training code), `report` holds and formats the result (`PlanReport`, `suggest`),
# `rollout_cost` estimates a sampling attempt's time, `__main__` is the command line. Only the
# light `report` names are imported here: `--help` and flag errors answer without importing the model and
# training code.
from prime_jax.plan.report import DEFAULT_HEADROOM, GIB, PROGRAMS, TARGETS, Phase, PlanDoesNotFit, PlanReport, suggest

__all__ = ["DEFAULT_HEADROOM", "GIB", "PROGRAMS", "TARGETS", "Phase", "PlanDoesNotFit", "PlanReport", "suggest"]
