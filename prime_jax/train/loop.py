"""The PRIME training loop: one iteration of PRIME_SPEC.md per step, top to bottom.

    draw prompts ─▶ sample n each ─▶ grade (process pool) ─▶ accuracy filter ──(too few? refill)
        ─▶ score (old / ref log-probs) ─▶ PRM mini-batches ─▶ normalise q ─▶ advantages
        ─▶ shuffled PPO mini-batches ─▶ metrics ─▶ (eval) ─▶ (checkpoint)

`Trainer.step` is that list; each phase is a method below it, except the first four (draw to
refill) and the rollouts' log-probs, which `train/rollouts.py` owns. Everything random derives from
the config's seed: the base PRNG key (saved in checkpoints), `fold_in(key, step)` for sampling,
and numpy generators seeded with `(seed, step)` for shuffles, so a resumed run repeats an
uninterrupted one exactly. The sampler reads the policy's parameters in place (same arrays,
same mesh); nothing is copied to another engine.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from prime_jax import algo
from prime_jax.config import RANDOM_MODEL, SYNTHETIC, TINY_TOKENIZER
from prime_jax.data import DataError, Problem, render_prompts
from prime_jax.models import Qwen2Config, Qwen2ForCausalLM, from_pretrained
from prime_jax.models.tokenizer import eos_token_ids, load_tokenizer
from prime_jax.parallel import is_logging_process, put_replicated, put_rows, replicated, shard_state, to_host
from prime_jax.rewards import RewardPool
from prime_jax.sampling import PAD_ID, Rollouts, Sampler
from prime_jax.train import checkpoint as ckpt
from prime_jax.train.batch import PrimeBatch
from prime_jax.train.preemption import PreemptionWatch
from prime_jax.train.metrics import MetricsLogger, masked_stats
from prime_jax.train.prm_phase import run_prm_phase
from prime_jax.train.report import mix_outcomes, write_rollouts_html
from prime_jax.train.rollouts import (PromptSource, RolloutCollector, RolloutScorer, assemble_batch, bucket_length,
                                      grade_rollouts)
from prime_jax.train.sft import encode_examples, run_sft
from prime_jax.train.state import (
    abstract_train_state,
    create_train_state,
    make_optimizer,
    split_params,
    train_state_shardings,
)
from prime_jax.train.steps import SCORE_KEYS, make_train_steps, sequence_logprobs

logger = logging.getLogger(__name__)


# ==============================================================================================
# Data: the prompts of a step, and the held-out sets
# ==============================================================================================
def synthetic_kwargs(config) -> dict:
    s = config.data.synthetic
    knobs = {k: s[k] for k in ("min_steps", "max_steps", "max_start", "max_operand", "max_factor") if s[k]}
    return dict(difficulty=s.difficulty, max_value=s.max_value, **knobs)


def _system_prompt(config) -> str | None:
    from prime_jax.data import EURUS2_SYSTEM_PROMPT

    return {"keep": None, "none": "", "eurus2": EURUS2_SYSTEM_PROMPT}[config.data.system_prompt]


def load_eval_sets(config) -> dict[str, list[Problem]]:
    """{source name: problems} of every `data.eval` source (the synthetic one is fixed by eval_seed);
    names as `prime_jax.data.eval_source_names` gives them."""
    from prime_jax.data import eval_source_names, make_problems, read_problems, source_format

    sets = {}
    for name, source in eval_source_names(config.data.eval.split(","), SYNTHETIC).items():
        if source == SYNTHETIC:
            problems = make_problems(config.data.synthetic.num_eval, config.data.synthetic.eval_seed, stream=1,
                                     unique=True, system_prompt=_system_prompt(config), **synthetic_kwargs(config))
        else:
            problems, _ = read_problems(source, split="test", system_prompt=_system_prompt(config),
                                        fmt=source_format(config.data.format, source))
        if config.data.eval_max_problems:
            problems = problems[: config.data.eval_max_problems]
        sets[name] = problems
    return sets


def load_train_problems(config, exclude: set[str]) -> list[Problem]:
    from prime_jax.data import make_problems, read_problems, source_format

    if config.data.train == SYNTHETIC:
        return make_problems(config.data.synthetic.num_train, config.seed, stream=0, exclude=exclude,
                             system_prompt=_system_prompt(config), **synthetic_kwargs(config))
    problems, stats = read_problems(config.data.train, split=config.data.train_split, system_prompt=_system_prompt(config),
                                    fmt=source_format(config.data.format, config.data.train))
    if not problems:
        raise DataError(f"data.train: no usable problems in {config.data.train!r} ({stats.summary()})")
    return problems


def sft_pairs(config, exclude: set[str]) -> list[tuple[list[dict], str]]:
    """(prompt messages, demonstration) pairs for the SFT warm start."""
    from prime_jax.data import demonstration, make_problems, read_sft_pairs

    if config.sft.data == SYNTHETIC:
        problems = make_problems(config.sft.num_examples, config.seed, stream=2, exclude=exclude,
                                 system_prompt=_system_prompt(config), **synthetic_kwargs(config))
        return [(p.messages, demonstration(p)) for p in problems]
    return read_sft_pairs(config.sft.data, config.sft.num_examples)[0]  # bad rows counted and skipped


@functools.partial(jax.jit, static_argnames=("estimator", "n", "process_coef", "outcome_coef", "normalize"))
def process_rewards_and_advantages(q, outcome, response_mask, *, estimator: str, n: int, process_coef: float,
                                   outcome_coef: float, normalize: bool = True):
    """Normalised process rewards, advantages (estimator from config) and their summary numbers."""
    q_norm = algo.normalize_process_rewards(q, response_mask) if normalize else q
    advantages = algo.compute_advantages(estimator, process_rewards=q_norm, outcome=outcome,
                                         response_mask=response_mask, n=n, process_coef=process_coef,
                                         outcome_coef=outcome_coef)
    mask = response_mask.astype(jnp.float32)
    proc_returns = algo.revcumsum(algo.rloo(q_norm, mask, n) * mask) * mask
    out_r, out_m = algo.outcome_token_rewards(outcome, response_mask)
    out_returns = algo.revcumsum(algo.rloo(out_r, out_m, n) * mask) * mask
    tokens = jnp.maximum(mask.sum(), 1.0)
    stats = {
        "returns/process_mean": (proc_returns * mask).sum() / tokens,
        "returns/outcome_mean": (out_returns * mask).sum() / tokens,
        "rewards/process_sum_mean": (q_norm * mask).sum(1).mean(),
    }
    return q_norm, advantages, stats


# ==============================================================================================
# The trainer
# ==============================================================================================
class Trainer:
    """Holds the run: models, optimizers, sampler, grader pool, data, logs, checkpoints."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path, mesh):
        self.config = c = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mesh = mesh
        self.n = c.rollout.n
        self.is_main = is_logging_process()
        self.groups_per_step = c.batch.prompts_per_step
        # Prompts sampled per attempt: oversampled, rounded up so the rows split evenly over the
        # data-parallel devices (every attempt has the same shapes: one compilation).
        data_parallel = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
        self.prompts_per_attempt = math.ceil(c.rollout.oversample * c.batch.prompts_per_step)
        while self.prompts_per_attempt * self.n % data_parallel:
            self.prompts_per_attempt += 1
        self.uses_process_rewards = c.algo.estimator != "outcome_rloo"
        # Training batches hold prompts in a fixed number of columns (one compilation per program).
        self.prompt_width = -(-c.data.max_prompt_tokens // 8) * 8

        self.tokenizer = self._load_tokenizer()
        self.stop_ids = eos_token_ids(self.tokenizer)
        self.eval_sets = load_eval_sets(c)
        held_out = {p.meta["expression"] for problems in self.eval_sets.values() for p in problems
                    if "expression" in p.meta}
        self.eval_prompts = {name: render_prompts(problems, self.tokenizer, c.data.max_prompt_tokens)[:2]
                             for name, problems in self.eval_sets.items()}
        for name, (ids, _) in self.eval_prompts.items():
            if self.eval_sets[name] and not ids:  # no score to report for it, rather than a 0.0
                logger.warning("eval set %s: all %d problems dropped (prompts longer than data.max_prompt_tokens=%d); "
                               "it is not evaluated", name, len(self.eval_sets[name]), c.data.max_prompt_tokens)
        self.prompts = PromptSource(load_train_problems(c, held_out if c.data.train == SYNTHETIC else set()),
                                    self.tokenizer, c.data.max_prompt_tokens, c.seed)
        self._held_out = held_out

        model = self._initial_model()
        self.graphdef, initial_params = split_params(model)
        self.policy_optimizer = self._optimizer(c.policy_optim)
        self.prm_optimizer = self._optimizer(c.prm_optim)
        self.steps = make_train_steps(
            model, self.policy_optimizer, self.prm_optimizer, mesh, n=self.n, micro_batches=c.batch.micro_batches,
            score_micro_batches=1, beta=c.algo.beta, clip_eps=c.algo.clip_eps,
            temperature=c.rollout.temperature, chunk_size=c.model.logprob_chunk,
            prm_loss_type=c.algo.prm_loss, agg=c.algo.agg)
        self.sampler = Sampler(mesh, min_prompt_bucket=16, decode_slots=c.rollout.decode_slots or None)
        self.checkpointer = ckpt.RunCheckpointer(self.workdir / "checkpoints", keep=c.checkpoint.keep,
                                                 async_save=c.checkpoint.async_save)
        self.start_step = 0
        self.ref_params = self._reference_params(model, initial_params)
        del model, initial_params
        if self.checkpointer.latest_step():
            self._restore()
        else:
            self.policy = create_train_state(self.ref_params, self.policy_optimizer, mesh)
            self.prm = create_train_state(self.ref_params, self.prm_optimizer, mesh)
            self.key = put_replicated(jax.random.PRNGKey(c.seed), mesh)
        self.pool = None
        self.log = None
        self.preempted_at: int | None = None
        self._score_q = jax.jit(self._q_fn)
        # Rows of a device batch (mini-batches, scoring chunks), kept sharded by rows.
        self._take_rows = jax.jit(lambda batch, index: jax.tree.map(lambda x: x[index], batch),
                                  out_shardings=self.steps.batch_sharding)

    # ------------------------------------------------------------------ set-up helpers
    def _load_tokenizer(self):
        path = self.config.tokenizer.path or self.config.model.path
        if path == TINY_TOKENIZER:
            import tempfile

            from prime_jax.data import build_tiny_tokenizer

            # Deterministic: process 0 writes it into the workdir (for users and the export), the
            # others build their own copy (a pod's hosts need not share a file system).
            folder = self.workdir / "tokenizer" if self.is_main else Path(tempfile.mkdtemp(prefix="prime_tokenizer_"))
            if not (folder / "tokenizer.json").exists():
                build_tiny_tokenizer(folder)
            path = str(folder)
        return load_tokenizer(path)

    def _initial_model(self) -> Qwen2ForCausalLM:
        m = self.config.model
        if m.path != RANDOM_MODEL:
            return from_pretrained(m.path, dtype=m.dtype, param_dtype=m.param_dtype, mesh=self.mesh, remat=m.remat)
        config = Qwen2Config(
            vocab_size=m.vocab_size or len(self.tokenizer), hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
            num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim or None, rope_theta=m.rope_theta,
            max_position_embeddings=m.max_position_embeddings, tie_word_embeddings=m.tie_word_embeddings,
            dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
        model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(self.config.seed))
        graphdef, state = nnx.split(model)
        return nnx.merge(graphdef, shard_state(state, self.mesh))

    @staticmethod
    def _optimizer(o) -> optax.GradientTransformation:
        lr = optax.linear_schedule(0.0, o.lr, o.warmup_steps) if o.warmup_steps else o.lr
        return make_optimizer(lr, weight_decay=o.weight_decay, clip_norm=o.clip_norm or None, b1=o.b1, b2=o.b2,
                              eps=o.eps)

    def _reference_params(self, model, initial_params):
        """The frozen reference = the SFT result (trained once, saved in WORKDIR/reference)."""
        c = self.config
        folder = self.workdir / "reference"
        if c.sft.steps == 0:
            return initial_params
        if ckpt.params_saved(folder):
            logger.info("reference (SFT) weights: restoring %s", folder)
            return ckpt.restore_params(folder, ckpt.abstract_like(initial_params))
        pairs = sft_pairs(c, self._held_out)
        examples, dropped = encode_examples(self.tokenizer, pairs, max_prompt_tokens=c.data.max_prompt_tokens,
                                            max_response_tokens=c.rollout.max_new_tokens)
        logger.info("SFT: %d examples (%d too long), %d steps", len(examples), dropped, c.sft.steps)
        sft_log = (self.workdir / "sft_metrics.jsonl").open("w") if self.is_main else None

        def log_fn(step, row):
            if sft_log:
                sft_log.write(json.dumps({"sft_step": step, **{k: float(v) for k, v in row.items()}}) + "\n")
                sft_log.flush()
            logger.info("SFT step %d: loss %.4f", step, row["loss"])

        model = run_sft(model, examples, steps=c.sft.steps, lr=c.sft.lr, batch_size=c.sft.batch, mesh=self.mesh,
                        seed=c.seed, warmup_steps=c.sft.warmup_steps, weight_decay=c.sft.weight_decay,
                        clip_norm=c.sft.clip_norm, pad_id=PAD_ID, chunk_size=c.model.logprob_chunk, log_fn=log_fn)
        if sft_log:
            sft_log.close()
        _, params = split_params(model)
        ckpt.save_params(folder, params)
        return params

    def _abstract_run_state(self):
        params = self.ref_params
        shapes = lambda opt: jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_train_state(params, opt), train_state_shardings(params, opt, self.mesh))
        key = jax.random.PRNGKey(0)
        return {"policy": shapes(self.policy_optimizer), "prm": shapes(self.prm_optimizer),
                "key": jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(self.mesh))}

    def _restore(self) -> None:
        """The newest intact checkpoint (damaged newer ones are reported and moved aside)."""
        step, state, meta = self.checkpointer.restore_latest_intact(self._abstract_run_state())
        self.start_step = step
        self.policy, self.prm, self.key = state["policy"], state["prm"], state["key"]
        self.prompts.set_state(meta["prompts"])
        logger.info("resumed from the checkpoint of step %d", step)

    def _save(self, step: int) -> None:
        self.checkpointer.save(step, {"policy": self.policy, "prm": self.prm, "key": self.key},
                               {"step": step, "prompts": self.prompts.state()})

    @property
    def policy_model(self) -> Qwen2ForCausalLM:
        return nnx.merge(self.graphdef, self.policy.params)

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        """Steps start_step+1 .. total_steps, with evals and checkpoints; returns the last eval row."""
        c = self.config
        self.pool = RewardPool(c.reward.workers, math_timeout=c.reward.timeout_s, code_timeout=c.reward.timeout_s)
        self.log = MetricsLogger(self.workdir, resume_step=self.start_step or None, tensorboard=c.logging.tensorboard,
                                 wandb=c.logging.wandb, wandb_project=c.logging.wandb_project, run_name=c.name,
                                 config=c.to_dict(), enabled=self.is_main)
        if self.is_main:
            (self.workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
        bar = None
        if c.logging.progress_bar and self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=c.total_steps, initial=self.start_step, desc=c.name, dynamic_ncols=True)
        last_eval, last_saved = {}, self.start_step
        try:
            with PreemptionWatch() as preemption:
                if self.start_step == 0:
                    last_eval = self.evaluate(0)
                for step in range(self.start_step + 1, c.total_steps + 1):
                    if preemption.should_stop():  # every host votes at every step boundary
                        if step - 1 > last_saved:
                            self._save(step - 1)
                        self.preempted_at = step - 1
                        logger.warning("preempted: stopped after step %d with a checkpoint; rerun the same command "
                                       "to resume", step - 1)
                        break
                    row = self.step(step)
                    if self._due(step, c.eval_every):
                        last_eval = self.evaluate(step)
                    if self._due(step, c.checkpoint_every):
                        self._save(step)
                        last_saved = step
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(reward=f"{row['train/reward']:.2f}", kept=f"{row['filter/kept_group_frac']:.2f}",
                                        dpo=f"{row.get('prm/dpo_accuracy', float('nan')):.2f}",
                                        eval=f"{last_eval.get('eval/accuracy', float('nan')):.3f}")
            self.checkpointer.wait()
            if c.checkpoint.export_hf and self.preempted_at is None:
                self.export_hf()  # on every process: the export gathers the sharded weights
        finally:
            if bar is not None:
                bar.close()
            self.close()
        return last_eval

    def _due(self, step: int, every: int) -> bool:
        return step == self.config.total_steps or (every > 0 and step % every == 0)

    def close(self) -> None:
        self.checkpointer.close()
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.log is not None:
            self.log.close()
            self.log = None

    def export_hf(self) -> Path:
        c = self.config
        folder = ckpt.export_hf(self.policy_model, self.tokenizer, self.workdir / "hf_export",
                                source=None if c.model.path == RANDOM_MODEL else c.model.path,
                                max_new_tokens=c.rollout.eval_max_new_tokens or c.rollout.max_new_tokens,
                                temperature=c.rollout.eval_temperature)
        logger.info("exported the policy (Hugging Face format) to %s", folder)
        return folder

    # ------------------------------------------------------------------ one PRIME iteration
    def step(self, step: int) -> dict:
        c = self.config
        t0 = time.perf_counter()
        key = jax.random.fold_in(self.key, step)

        # draw, sample, grade, filter (+ refill): train/rollouts.py
        groups, collect = self.collector.collect(step, key, (self.graphdef, self.policy.params),
                                                 self.prm_reference_params, self.pool)
        row = {"step": step, **collect}
        if groups:
            batch = assemble_batch(groups, c.rollout.max_new_tokens).to_device(self.mesh)  # stays on the devices
            t = time.perf_counter()
            batch = self.score(batch)  # old/ref log-probs not taken while grading: the kept rows only
            row["time/score_s"] += time.perf_counter() - t
            if step == c.debug.inject_nan_step:  # test hook: the NaN guard must skip this step's updates
                batch = batch.replace(old_logprobs=jnp.full_like(batch.old_logprobs, jnp.nan))
            q, prm_metrics = self.update_prm(batch, step)  # PRM phase; q as algo.prm_update says
            q_norm, advantages, adv_stats = process_rewards_and_advantages(
                q, batch.outcome, batch.response_mask, estimator=c.algo.estimator, n=self.n,
                process_coef=float(c.algo.process_coef), outcome_coef=float(c.algo.outcome_coef),
                normalize=self.uses_process_rewards)
            batch = batch.replace(advantages=advantages)
            policy_metrics = self.update_policy(batch, step)  # shuffled PPO mini-batches
            row.update(prm_metrics)
            row.update(policy_metrics)
            advantages, mask = to_host((advantages, batch.response_mask))
            row.update({k: float(v) for k, v in to_host(adv_stats).items()})
            row.update(masked_stats(advantages, mask, "advantages"))
            row["response/length_kept_mean"] = float(mask.sum(1).mean())
            row["nan_skipped"] = row.get("policy/nan_skipped", 0) + row.get("prm/nan_skipped", 0)
        elif self.is_main:  # the same on every host: said once
            logger.warning("step %d: no prompt group survived the accuracy filter; no update", step)
        row["nan_skipped_total"] = int(to_host(self.policy.nan_skips + self.prm.nan_skips))
        row["data/prompts_dropped_total"] = self.prompts.dropped
        row["time/step_s"] = time.perf_counter() - t0
        row["time/wall"] = time.time()
        return self.log.write(row) if self.log else row

    # ---------------------------------------------------------------- rollouts (train/rollouts.py)
    @functools.cached_property
    def scorer(self) -> RolloutScorer:
        return RolloutScorer(self.steps, self.mesh, self.config.batch.score_batch, self._mini_batch,
                             self.uses_process_rewards)

    @functools.cached_property
    def collector(self) -> RolloutCollector:
        return RolloutCollector(self.config, prompts=self.prompts, sampler=self.sampler, tokenizer=self.tokenizer,
                                stop_ids=self.stop_ids, scorer=self.scorer,
                                prompts_per_attempt=self.prompts_per_attempt, prompt_width=self.prompt_width)

    def score(self, batch: PrimeBatch) -> PrimeBatch:
        """`batch` (on the devices) with the log-probs the updates need."""
        return self.scorer.score(batch, self.policy.params, self.prm_reference_params)

    def grade(self, rollouts: Rollouts, problems: Sequence[Problem]) -> tuple[np.ndarray, int, int]:
        """(outcome [B] on every process, grading errors, timeouts): `rollouts.grade_rollouts` in the run's pool."""
        return grade_rollouts(self.pool, self.tokenizer, rollouts, problems)

    # ---------------------------------------------------------------- PRM and policy updates
    def _mini_batch(self, batch: PrimeBatch, rows: np.ndarray) -> PrimeBatch:
        """The `rows` of a device batch, still on the devices (sharded by rows)."""
        return self._take_rows(batch, put_replicated(np.asarray(rows, np.int32), self.mesh))

    def update_prm(self, batch: PrimeBatch, step: int) -> tuple[jax.Array, dict]:
        """The PRM phase (`prm_phase.run_prm_phase`, mode algo.prm_update); returns the q [B, R] the
        policy gets (on the devices) and the metrics."""
        if not self.uses_process_rewards:
            return put_rows(np.zeros(batch.response_mask.shape, np.float32), self.mesh), {}
        self.prm, q, metrics = run_prm_phase(
            self.steps, self.prm, batch, mode=self.config.algo.prm_update, mini_batch=self.config.batch.prm_mini_batch,
            n=self.n, take_rows=functools.partial(self._mini_batch, batch))
        return put_rows(q, self.mesh), metrics

    @property
    def prm_reference_params(self):
        """The implicit PRM's reference: the frozen start (SFT) model, or with algo.prm_ref =
        "policy" the current (rollout) policy."""
        return self.ref_params if self.config.algo.prm_ref == "freeze" else self.policy.params

    def update_policy(self, batch: PrimeBatch, step: int) -> dict:
        """One epoch of PPO-clip over shuffled mini-batches of whole groups."""
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
            self.policy, m = self.steps.policy(self.policy, self._mini_batch(batch, rows))
            metrics.append(m)
        metrics = to_host(metrics)
        out = {f"policy/{k}": float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
        out["policy/ratio_max"] = float(np.max([m["ratio_max"] for m in metrics]))
        out["policy/nan_skipped"] = int(sum(int(m["nan_skipped"]) for m in metrics))
        out["time/policy_s"] = time.perf_counter() - t
        return out

    # ---------------------------------------------------------------- held-out evaluation
    def _q_fn(self, prm_params, ref_params, batch):
        # raw logits for the PRM and its reference, as in training (PRIME_SPEC: no temperature)
        lp = functools.partial(sequence_logprobs, self.graphdef, temperature=1.0,
                               chunk_size=self.config.model.logprob_chunk)
        return algo.implicit_token_rewards(lp(prm_params, batch), lp(ref_params, batch), batch["response_mask"])

    def evaluate(self, step: int) -> dict:
        """Greedy (rollout.eval_temperature) pass@1 on every eval source; writes the HTML page."""
        c = self.config
        t0 = time.perf_counter()
        max_new = c.rollout.eval_max_new_tokens or c.rollout.max_new_tokens
        row: dict[str, Any] = {"step": step}
        accuracies, lengths, truncated, html_rows = [], [], [], []
        key = jax.random.fold_in(jax.random.PRNGKey(c.data.synthetic.eval_seed), step)
        for name, (ids, kept) in self.eval_prompts.items():
            if not ids:  # every problem dropped (warned at start): no accuracy, not a 0.0
                continue
            scores = []
            for start in range(0, len(ids), c.rollout.eval_batch):
                chunk = ids[start:start + c.rollout.eval_batch]
                rollouts = self.sampler.generate(
                    (self.graphdef, self.policy.params), chunk, max_new_tokens=max_new, n=1,
                    temperature=c.rollout.eval_temperature, top_p=c.rollout.top_p, top_k=c.rollout.top_k,
                    stop_token_ids=self.stop_ids, key=key)
                chunk_problems = kept[start:start + len(chunk)]
                chunk_scores, _, _ = self.grade(rollouts, chunk_problems)
                scores.extend(chunk_scores.tolist())
                lengths.extend(rollouts.lengths.tolist())
                truncated.extend((~rollouts.finished).tolist())
                # Candidates for the HTML page: up to html_samples right and html_samples wrong ones.
                for r in range(len(chunk)):
                    if sum((x[3] >= 1.0) == (chunk_scores[r] >= 1.0) for x in html_rows) < c.logging.html_samples:
                        html_rows.append((rollouts, r, chunk_problems[r], chunk_scores[r], name))
            accuracy = float(np.mean(scores)) if scores else 0.0
            row[f"eval/{name}/accuracy"] = accuracy
            accuracies.append(accuracy)
        row["eval/accuracy"] = float(np.mean(accuracies)) if accuracies else 0.0
        row["eval/response_length"] = float(np.mean(lengths)) if lengths else 0.0
        row["eval/truncated_frac"] = float(np.mean(truncated)) if truncated else 0.0
        if html_rows:  # q is computed on every process; process 0 writes the page
            self._write_html(step, mix_outcomes(html_rows, lambda x: x[3], c.logging.html_samples))
        row["time/eval_s"] = time.perf_counter() - t0
        return self.log.write(row) if self.log else row

    def _write_html(self, step: int, html_rows) -> None:
        """The token-reward page of `html_rows` (q computed on every process, written by process 0)."""
        samples = []
        for rollouts, r, problem, outcome, source in html_rows:
            length = int(rollouts.lengths[r])
            R = bucket_length(length, 8, rollouts.tokens.shape[1])
            one = PrimeBatch(prompt_ids=rollouts.prompt_tokens[r:r + 1], prompt_mask=rollouts.prompt_mask[r:r + 1],
                             response_ids=rollouts.tokens[r:r + 1, :R], response_mask=rollouts.response_mask[r:r + 1, :R])
            one = one.to_device(self.mesh)
            q = to_host(self._score_q(self.prm.params, self.prm_reference_params, one.select(SCORE_KEYS)))[0, :length]
            token_ids = rollouts.tokens[r, :length].tolist()
            samples.append({
                "prompt": self.tokenizer.decode(rollouts.prompt_tokens[r][rollouts.prompt_mask[r] > 0].tolist()),
                "tokens": [self.tokenizer.decode([t]) for t in token_ids],
                "q": q.tolist(), "outcome": float(outcome), "ground_truth": problem.ground_truth, "source": source,
            })
        if self.is_main:
            write_rollouts_html(self.workdir / "rollouts" / f"step_{step}.html", samples,
                                title=f"{self.config.name}: held-out responses at step {step}")


def train(config: ml_collections.ConfigDict, workdir: str | Path, mesh) -> dict:
    """Runs (or resumes) PRIME; returns the last eval row."""
    return Trainer(config, workdir, mesh).run()


def export_latest(config: ml_collections.ConfigDict, workdir: str | Path, mesh) -> Path:
    """Exports the policy of the newest intact checkpoint to WORKDIR/hf_export; refuses (CheckpointError)
    a workdir without checkpoints rather than training a start policy to export."""
    folder = Path(workdir) / "checkpoints"
    if not (folder.is_dir() and any(d.name.isdigit() for d in folder.iterdir())):
        raise ckpt.CheckpointError(f"--export_hf: {folder} holds no checkpoint to export; train first "
                                   "(the same command without --export_hf)")
    trainer = Trainer(config, workdir, mesh)
    try:
        return trainer.export_hf()
    finally:
        trainer.close()
