"""The PRIME training loop: one iteration of PRIME_SPEC.md per step (`Trainer.step`), and the run
around it (evaluation, checkpoints, export).

`Trainer.step` lists the iteration's phases top to bottom; draw → sample → grade → filter → refill
and the rollouts' log-probs are `train/rollouts.py`'s, q and the advantages `train/process_rewards.py`'s.
The iteration's data flow, host and devices: docs/architecture.md ("One iteration, as data").
Everything random derives from the config's seed: the base PRNG key (saved in checkpoints),
`fold_in(key, step)` for sampling, and numpy generators seeded with `(seed, step)` for shuffles, so a
resumed run repeats an uninterrupted one exactly. The sampler reads the policy's parameters in place
(same arrays, same mesh); nothing is copied to another engine.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from prime_jax.config import PRM_TRAINING_SOURCES, RANDOM_MODEL
from prime_jax.models import Qwen2ForCausalLM
from prime_jax.models.tokenizer import eos_token_ids
from prime_jax.parallel import is_logging_process, put_replicated, put_rows, to_host
from prime_jax.rewards import RewardPool
from prime_jax.train import checkpoint as ckpt
from prime_jax.train import run_config
from prime_jax.train.batch import PrimeBatch
from prime_jax.train.builder import RunBuilder, RunLayout, abstract_model
from prime_jax.train.evaluation import TrainingEvaluator
from prime_jax.train.metrics import MetricsLogger, masked_stats
from prime_jax.train.preemption import PreemptionWatch
from prime_jax.train.prm_phase import process_reward_scale
from prime_jax.train.process_rewards import (SourceContext, StepRows, process_rewards,
                                             process_rewards_and_advantages)
from prime_jax.train.rollouts import Group, RolloutCollector, RolloutScorer, assemble_batch
from prime_jax.train.run_data import RunData
from prime_jax.train.run_state import RunState
from prime_jax.train.state import TrainState, create_train_state, split_params
from prime_jax.train.warm_start import reference_params

logger = logging.getLogger(__name__)


# ==============================================================================================
# The trainer
# ==============================================================================================
@dataclasses.dataclass(frozen=True)
class Hook:
    """Something the run calls between steps: `fn(step, row)` after every `every`-th step (0: none) and
    after the last one; or, with at_end, once after the last step of a run that was not stopped early."""

    name: str
    every: int
    fn: Callable[[int, dict], None]
    at_end: bool = False

    def due(self, step: int, total_steps: int) -> bool:
        return not self.at_end and (step == total_steps or (self.every > 0 and step % self.every == 0))


class Trainer:
    """Holds the run: models, optimizers, sampler, grader pool, data, logs, checkpoints; what moves is
    `state` (a `RunState`), which `step` takes and returns.

    `reference`: the frozen reference params (the SFT stage's, `warm_start.reference_params`);
    policy and PRM start from them. `Trainer.create` runs that stage first, with the run's data and its
    one builder."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path, mesh, reference, data: RunData,
                 builder: RunBuilder):
        self.config = c = config
        self.layout = RunLayout(workdir)
        self.workdir = self.layout.workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mesh = mesh
        self.builder = builder  # the run's one builder (`create`: the SFT stage and the data share it)
        self.n = c.rollout.n
        self.is_main = is_logging_process()

        self.tokenizer, self.eval_sets, self.prompts = data.tokenizer, data.eval_sets, data.prompts
        self.stop_ids = eos_token_ids(self.tokenizer)

        self.graphdef, _ = split_params(abstract_model(builder.model_config(len(self.tokenizer))))
        self.ref_params = reference
        self.steps = builder.train_steps((self.graphdef, reference))
        self.sampler = builder.sampler()
        self.evaluator = TrainingEvaluator(c, self.eval_sets, tokenizer=self.tokenizer, sampler=self.sampler,
                                           graphdef=self.graphdef, mesh=mesh, stop_ids=self.stop_ids,
                                           layout=self.layout, is_main=self.is_main)
        self.checkpointer = ckpt.RunCheckpointer(self.layout.checkpoints, keep=c.checkpoint.keep,
                                                 async_save=c.checkpoint.async_save)
        self.start_step, self.state = self._restore() if self.checkpointer.latest_step() else (0, self._fresh_state())
        self._cursor = self.state.prompts  # the data cursor `self.prompts` is at (`_use_cursor`)
        self.pool = None
        self.log = None
        self.last_eval: dict = {}
        self.last_saved = self.start_step
        self.preempted_at: int | None = None
        self.stop_signal: str | None = None  # the signal this process got when preempted_at is set (None: another host's)
        # Rows of a device batch (mini-batches, scoring chunks), kept sharded by rows.
        self._take_rows = jax.jit(lambda batch, index: jax.tree.map(lambda x: x[index], batch),
                                  out_shardings=self.steps.batch_sharding)

    @classmethod
    def create(cls, config: ml_collections.ConfigDict, workdir: str | Path, mesh) -> "Trainer":
        """The run's data (bad data fails here, before any training), the SFT stage
        (`warm_start.reference_params`: trained once, then restored), then the trainer."""
        builder = RunBuilder(config, mesh)  # one builder and one tokenizer for the whole start-up
        data = RunData.load(builder, RunLayout(workdir), is_logging_process())
        reference = reference_params(config, workdir, mesh, builder=builder, tokenizer=data.tokenizer)
        return cls(config, workdir, mesh, reference, data, builder)

    def _fresh_state(self) -> RunState:
        """Policy and PRM from the reference, the seed's key, the prompt order's start."""
        b = self.builder
        return RunState(create_train_state(self.ref_params, b.policy_optimizer, self.mesh),
                        create_train_state(self.ref_params, b.prm_optimizer, self.mesh),
                        put_replicated(jax.random.PRNGKey(self.config.seed), self.mesh), prompts=self.prompts.state())

    def _restore(self) -> tuple[int, RunState]:
        """The newest intact checkpoint (damaged newer ones are reported and moved aside)."""
        step, arrays, meta = self.checkpointer.restore_latest_intact(self.builder.abstract_run_state(self.ref_params))
        state = RunState.from_checkpoint(step, arrays, meta, ramp=self.config.algo.process_ramp != "none")
        self.prompts.set_state(state.prompts)
        logger.info("resumed from the checkpoint of step %d", step)
        return step, state

    def _save(self, step: int) -> None:
        # everything a step reads besides the config: the run state, whole (RunState: the train states, the key,
        # the process_ramp average, the prompt buffer and iterator)
        self.checkpointer.save(step, self.state.arrays(), self.state.meta(step))
        self.last_saved = step  # a stop right after a periodic checkpoint must not save the same step again

    def _use_cursor(self, state: RunState) -> None:
        """Puts the prompt source at `state`'s data cursor, unless it is there already (the state the last
        step returned)."""
        if state.prompts is not self._cursor:
            self.prompts.set_state(state.prompts)
            self._cursor = state.prompts

    policy = property(lambda self: self.state.policy)
    prm = property(lambda self: self.state.prm)

    @property
    def policy_model(self) -> Qwen2ForCausalLM:
        return nnx.merge(self.graphdef, self.state.policy.params)

    # ------------------------------------------------------------------ the run
    def hooks(self) -> list[Hook]:
        """What the run calls between steps, in this order: held-out eval (eval_every), checkpoint
        (checkpoint_every); after the last step the Hugging Face export (checkpoint.export_hf)."""
        c = self.config
        hooks = [Hook("eval", c.eval_every, lambda step, row: self.evaluate(step, row)),
                 Hook("checkpoint", c.checkpoint_every, lambda step, row: self._save(step))]
        if c.checkpoint.export_hf:  # on every process: the export gathers the sharded weights
            hooks.append(Hook("export", 0, lambda step, row: self.export_hf(), at_end=True))
        return hooks

    def run(self, stop_after: int | None = None) -> dict:
        """Steps start_step+1 .. total_steps, calling the `hooks` between them; returns the last eval row.
        `stop_after`: leave after that step with a checkpoint, as on SIGTERM (`preempted_at`), so a
        long run can go in chunks; rerunning continues it."""
        c = self.config
        self._open()
        hooks = self.hooks()
        bar = None
        if c.logging.progress_bar and self.is_main:
            bar = tqdm(total=c.total_steps, initial=self.start_step, desc=c.name, dynamic_ncols=True)
        try:
            with PreemptionWatch() as preemption:
                if self.start_step == 0 and c.eval_at_start:
                    self.evaluate(0)
                for step in range(self.start_step + 1, c.total_steps + 1):
                    if self._stopping(step, preemption, stop_after):  # every host votes at every step boundary
                        break
                    self.state, row = self.step(self.state, step)
                    for hook in hooks:
                        if hook.due(step, c.total_steps):
                            hook.fn(step, row)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(reward=f"{row['train/reward']:.2f}", kept=f"{row['filter/kept_group_frac']:.2f}",
                                        dpo=f"{row.get('prm/dpo_accuracy', float('nan')):.2f}",
                                        eval=f"{self.last_eval.get('eval/accuracy', float('nan')):.3f}")
                self.checkpointer.wait()  # (a Ctrl-C during the last save waits for it, see PreemptionWatch)
            for hook in hooks:
                if hook.at_end and self.preempted_at is None:
                    hook.fn(c.total_steps, {})
        finally:
            if bar is not None:
                bar.close()
            self.close()
        return self.last_eval

    def _open(self) -> None:
        """The grader pool, the metrics logger and the run's config record."""
        c = self.config
        self.pool = RewardPool(c.reward.workers, math_timeout=c.reward.timeout_s, code_timeout=c.reward.timeout_s)
        self.log = MetricsLogger(self.workdir, resume_step=self.start_step or None, tensorboard=c.logging.tensorboard,
                                 wandb=c.logging.wandb, wandb_project=c.logging.wandb_project, run_name=c.name,
                                 config=c.to_dict(), enabled=self.is_main)
        if self.is_main:
            run_config.record(c, self.layout, self.start_step)  # config.json, and the changes kept in a history

    def _stopping(self, step: int, preemption: PreemptionWatch, stop_after: int | None) -> bool:
        """Whether the run leaves before `step` (preempted, or past stop_after), with a checkpoint of the step
        before."""
        if not (preemption.should_stop() or (stop_after is not None and step > stop_after)):
            return False
        preemption.saving = True
        if step - 1 > self.last_saved:
            self._save(step - 1)
        self.preempted_at = step - 1
        self.stop_signal = preemption.signal_name  # None: another host's signal, or stop_after
        logger.warning("stopped after step %d with a checkpoint (%s); rerun to resume", step - 1,
                       self.stop_signal or ("preempted" if preemption.requested else f"stop_after {stop_after}"))
        return True

    def close(self) -> None:
        self.checkpointer.close()
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.log is not None:
            self.log.close()
            self.log = None

    def export_hf(self) -> Path:
        return export_policy(self.config, self.policy_model, self.tokenizer, self.layout)

    # ------------------------------------------------------------------ one PRIME iteration
    def step(self, state: RunState, step: int) -> tuple[RunState, dict]:
        """One PRIME iteration, a transition: (the run state after `step`, the step's metrics row)."""
        t0 = time.perf_counter()
        self._use_cursor(state)
        key = jax.random.fold_in(state.key, step)

        # draw, sample, grade, filter (+ refill): train/rollouts.py
        groups, collect = self.collector.collect(step, key, (self.graphdef, state.policy.params),
                                                 self.prm_reference_params(state), self.pool)
        row = {"step": step, **collect}
        if groups:
            state = self._update(state, step, groups, row)
        elif self.is_main:  # the same on every host: said once
            logger.warning("step %d: no prompt group survived the accuracy filter; no update", step)
        state = state.replace(prompts=self.prompts.state())  # the data cursor after this step's draws
        self._cursor = state.prompts
        row["nan_skipped_total"] = int(to_host(state.policy.nan_skips + state.prm.nan_skips))
        row["data/prompts_dropped_total"] = self.prompts.dropped
        row["time/step_s"] = time.perf_counter() - t0
        row["time/wall"] = time.time()
        return state, (self.log.write(row) if self.log else row)

    def _update(self, state: RunState, step: int, groups: Sequence[Group], row: dict) -> RunState:
        """Scoring, q (and the PRM's update), the advantages and the policy's PPO epoch on the step's kept
        groups; their metrics go into `row`."""
        c = self.config
        host_rows = assemble_batch(groups, c.rollout.max_new_tokens)
        batch = host_rows.to_device(self.mesh)  # stays on the devices
        t = time.perf_counter()
        batch = self.score(batch, state)  # old/ref log-probs not taken while grading: the kept rows only
        row["time/score_s"] += time.perf_counter() - t
        if step == c.debug.inject_nan_step:  # test hook: the NaN guard must skip this step's updates
            batch = batch.replace(old_logprobs=jnp.full_like(batch.old_logprobs, jnp.nan))
        prm, q, prm_metrics = self.update_prm(state.prm, batch, groups, host_rows)  # q as algo.prm_update says
        ranking_ema, process_scale = process_reward_scale(c.algo, state.ranking_ema, prm_metrics)
        if self.builder.uses_process_rewards:
            prm_metrics["prm/process_scale"] = process_scale
            if c.algo.process_ramp != "none":
                prm_metrics["prm/ranking_ema"] = ranking_ema
        q_norm, advantages, adv_stats = process_rewards_and_advantages(
            q, batch.outcome, batch.response_mask,
            None if c.algo.process_ramp == "none" else jnp.float32(process_scale), estimator=c.algo.estimator,
            n=self.n, process_coef=float(c.algo.process_coef), outcome_coef=float(c.algo.outcome_coef),
            normalize=self.builder.uses_process_rewards, norm_floor=float(c.algo.process_norm_floor))
        row.update(prm_metrics)
        policy = state.policy
        # PRM warm-up steps leave the policy as it is (their advantages are still logged: what it would get)
        if step > c.algo.prm_warmup_steps:
            policy, policy_metrics = self.update_policy(policy, batch.replace(advantages=advantages), step)
            row.update(policy_metrics)  # shuffled PPO mini-batches
        else:
            row["policy/warmup"] = 1.0
        advantages, mask = to_host((advantages, batch.response_mask))
        row.update({k: float(v) for k, v in to_host(adv_stats).items()})
        row.update(masked_stats(advantages, mask, "advantages"))
        row["response/length_kept_mean"] = float(mask.sum(1).mean())
        row["nan_skipped"] = row.get("policy/nan_skipped", 0) + row.get("prm/nan_skipped", 0)
        return state.replace(policy=policy, prm=prm, ranking_ema=ranking_ema)

    # ---------------------------------------------------------------- rollouts (train/rollouts.py)
    @functools.cached_property
    def scorer(self) -> RolloutScorer:
        return RolloutScorer(self.steps, self.mesh, self.config.batch.score_batch, self._mini_batch,
                             self.builder.scored_fields())

    @functools.cached_property
    def collector(self) -> RolloutCollector:
        return RolloutCollector(self.config, prompts=self.prompts, sampler=self.sampler, tokenizer=self.tokenizer,
                                stop_ids=self.stop_ids, scorer=self.scorer,
                                prompts_per_attempt=self.builder.prompts_per_attempt, prompt_width=self.builder.prompt_width,
                                settings=self.builder.rollout_settings())

    def score(self, batch: PrimeBatch, state: RunState) -> PrimeBatch:
        """`batch` (on the devices) with the log-probs the updates need, under `state`'s policy."""
        return self.scorer.score(batch, state.policy.params, self.prm_reference_params(state))

    # ---------------------------------------------------------------- PRM and policy updates
    def _mini_batch(self, batch: PrimeBatch, rows: np.ndarray) -> PrimeBatch:
        """The `rows` of a device batch, still on the devices (sharded by rows)."""
        return self._take_rows(batch, put_replicated(np.asarray(rows, np.int32), self.mesh))

    def update_prm(self, prm: TrainState, batch: PrimeBatch, groups: Sequence[Group], host_rows: PrimeBatch
                   ) -> tuple[TrainState, jax.Array, dict]:
        """The PRM state after the step, the step's process rewards q [B, R] the policy gets (on the devices)
        and their metrics, from the source algo.process_source names (`process_rewards.PROCESS_SOURCES`:
        PRIME's PRM phase, the synthetic task's oracle, the SFT model's log-probs, ...); a PRM source also
        updates the PRM. `host_rows`: the host copy of `batch`."""
        if not self.builder.uses_process_rewards:
            return prm, put_rows(np.zeros(batch.response_mask.shape, np.float32), self.mesh), {}
        context = SourceContext(self.config, self.steps, self.n, self._mini_batch, self.tokenizer, self.stop_ids)
        rows = StepRows(batch, host_rows, [g.problem for g in groups for _ in range(g.rows.num_rows)])
        prm, q, metrics = process_rewards(self.config.algo.process_source, context, prm, rows)
        return prm, put_rows(q, self.mesh), metrics

    def prm_reference_params(self, state: RunState | None = None):
        """The implicit PRM's reference: the frozen start (SFT) model, or with algo.prm_ref =
        "policy" the current (rollout) policy (`state`'s, default the run's)."""
        if self.config.algo.prm_ref == "freeze":
            return self.ref_params
        return (state or self.state).policy.params

    def update_policy(self, policy: TrainState, batch: PrimeBatch, step: int) -> tuple[TrainState, dict]:
        """One epoch of PPO-clip over shuffled mini-batches of whole groups: the policy state after it, and
        its metrics."""
        c = self.config
        t = time.perf_counter()
        num_groups = batch.num_rows // self.n
        rng = np.random.default_rng([c.seed, step, 1])
        order = rng.permutation(num_groups)
        per_mb = c.batch.mini_batch // self.n
        metrics = []
        for start in range(0, num_groups, per_mb):
            groups = order[start:start + per_mb]
            rows = (groups[:, None] * self.n + np.arange(self.n)[None, :]).reshape(-1)
            policy, m = self.steps.policy(policy, self._mini_batch(batch, rows))
            metrics.append(m)
        metrics = to_host(metrics)
        out = {f"policy/{k}": float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
        out["policy/ratio_max"] = float(np.max([m["ratio_max"] for m in metrics]))
        out["policy/nan_skipped"] = int(sum(int(m["nan_skipped"]) for m in metrics))
        out["time/policy_s"] = time.perf_counter() - t
        return policy, out

    # ---------------------------------------------------------------- held-out evaluation
    def evaluate(self, step: int, step_row: dict | None = None) -> dict:
        """Greedy (rollout.eval_temperature) accuracy on every eval set (`TrainingEvaluator`) of the run
        state's policy; the HTML page shows the step's PRM ranking (prm/dpo_accuracy of `step_row`, the
        step's metrics). The row is also kept as `last_eval`."""
        ranking = (step_row or {}).get("prm/dpo_accuracy")
        note = ""
        if step == 0:
            note = "At step 0 the PRM has not trained yet, so there is no ranking to read."
        elif not self.builder.updates_prm or self.config.algo.process_source not in PRM_TRAINING_SOURCES:
            note = (f"This run trains no implicit PRM (algo.estimator={self.config.algo.estimator}, algo.prm_update="
                    f"{self.config.algo.prm_update}, algo.process_source={self.config.algo.process_source}).")
        elif ranking is None:
            note = ("No prompt of this step had both a right and a wrong sample, so the ranking was not measured "
                    "(earlier steps' prm/dpo_accuracy is in metrics.jsonl).")
        s = self.state
        row = self.evaluator(step, s.policy.params, s.prm.params, self.prm_reference_params(s), self.pool,
                             ranking=ranking, ranking_note=note)
        self.last_eval = self.log.write(row) if self.log else row
        return self.last_eval


def train(config: ml_collections.ConfigDict, workdir: str | Path, mesh) -> dict:
    """Runs (or resumes) PRIME, after the SFT stage; returns the last eval row."""
    return Trainer.create(config, workdir, mesh).run()


def export_latest(config: ml_collections.ConfigDict, workdir: str | Path, mesh) -> Path:
    """Exports the policy of the newest intact checkpoint to WORKDIR/hf_export (no trainer, no SFT:
    only the policy's params are restored); refuses (CheckpointError) a workdir without checkpoints
    rather than training a start policy to export."""
    layout = RunLayout(workdir)
    if not layout.checkpoint_steps():
        raise ckpt.CheckpointError(f"--export_hf: {layout.checkpoints} holds no checkpoint to export; train first "
                                   "(the same command without --export_hf)")
    builder = RunBuilder(config, mesh)
    tokenizer = builder.tokenizer(layout, is_logging_process())
    step, policy = ckpt.restore_latest_model(layout.checkpoints, builder.model_config(len(tokenizer)), mesh)
    logger.info("exporting the policy of step %d", step)
    return export_policy(config, policy, tokenizer, layout)


def export_policy(config: ml_collections.ConfigDict, policy: Qwen2ForCausalLM, tokenizer, layout: RunLayout) -> Path:
    """The policy in Hugging Face format in WORKDIR/hf_export, with the run's eval decoding as its
    generation config (on every process: the export gathers the sharded weights)."""
    c = config
    folder = ckpt.export_hf(policy, tokenizer, layout.hf_export, source=None if c.model.path == RANDOM_MODEL else c.model.path,
                            max_new_tokens=c.rollout.eval_max_new_tokens or c.rollout.max_new_tokens,
                            temperature=c.rollout.eval_temperature)
    logger.info("exported the policy (Hugging Face format) to %s", folder)
    return folder
