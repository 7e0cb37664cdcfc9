"""Rollout collection for one PRIME step: draw prompts, sample, grade, filter, refill — and the
one home of rollout scoring (the old/reference log-probs the updates need).

    PromptSource.take ─▶ Sampler.generate (static) or Sampler.stream (decode slots)
        ─▶ grade (RewardPool, each process its share; outcomes gathered) ─▶ accuracy filter
        ─▶ Groups ──(too few? another attempt)──▶ trim to whole mini-batches ─▶ assemble_batch
    surplus, untrained and cut prompts ─▶ PromptSource.put_back (drawn first next step)

Static path (`rollout.decode_slots = 0`): each attempt samples all its prompts in one call, then
grades them all (device scoring of every row overlaps the grading, `rollout.overlap_scoring`).

Streamed path (`rollout.decode_slots > 0`): the sampler hands back each prompt's group as soon as
its n samples are done and keeps decoding while the group is graded; sampling stops as soon as
`batch.prompts_per_step` groups survived the filter. What is still in flight then — rows being
decoded, groups partly done, prompts still waiting — is dropped and its prompts go back to the
front of the buffer, so they are sampled again (from scratch, with the next policy) at the start
of the next step; no prompt is lost. Why this and what it costs (a bias towards short groups within
a step) is in docs/scale_out.md ("Streaming rollouts into the trainer"). The kept rows are scored
after the filter (only they need log-probs).

Every process draws the same prompts and takes the same decisions: the sampler's outputs and the
gathered outcomes are the same global values on every host, so the stop point is too.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prime_jax import algo
from prime_jax.data import DataError, Problem, ShuffledIterator, render_prompts
from prime_jax.parallel import gather_shares, host_share, to_host
from prime_jax.sampling import Rollouts
from prime_jax.train.batch import PrimeBatch

logger = logging.getLogger(__name__)


# ==============================================================================================
# The prompt buffer
# ==============================================================================================
class PromptSource:
    """Training prompts: the surplus buffer first, then the seeded, resumable iterator.

    Prompts longer than `max_prompt_tokens` are dropped (and counted). A pool in which no prompt
    fits raises DataError (checked on a sample at construction, and over the whole pool once an
    epoch's worth of prompts in a row was dropped), instead of drawing forever. `state()` is JSON
    and goes into checkpoints.
    """

    def __init__(self, problems: Sequence[Problem], tokenizer, max_prompt_tokens: int, seed: int):
        self.iterator = ShuffledIterator(problems, seed)
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.buffer: list[Problem] = []
        # the training set's sources (gsm8k_train, synthetic, ...): a step's metrics split by them when it mixes a few
        self.sources = sorted({p.source for p in problems})
        self.dropped = 0
        self._dropped_in_a_row = 0  # prompts dropped since the last kept one (None: the pool was checked)
        sample = [problems[i] for i in self.iterator.host_indices(0)[:256]]
        if not any(len(x) <= max_prompt_tokens for x in render_prompts(sample, tokenizer, None)[0]):
            self._check_pool_fits()

    def _check_pool_fits(self) -> None:
        """Renders the whole pool once; raises DataError when no prompt fits, with the numbers."""
        items = self.iterator.items
        transformers_log = logging.getLogger("transformers")
        level = transformers_log.level
        transformers_log.setLevel(logging.ERROR)  # not its "longer than model_max_length" note: we measure
        try:
            ids, _, stats = render_prompts(items, self.tokenizer, None)
        finally:
            transformers_log.setLevel(level)
        lengths = np.array([len(x) for x in ids] or [0])
        fits = int((lengths <= self.max_prompt_tokens).sum()) if ids else 0
        if not fits:
            rendered = f"lengths {lengths.min()} to {lengths.max()} tokens" if ids else "none rendered"
            raise DataError(
                f"no training prompt fits data.max_prompt_tokens={self.max_prompt_tokens}: all {len(items)} "
                f"prompts examined ({rendered}, {stats.n_skipped} template errors); raise data.max_prompt_tokens "
                f"or train on shorter prompts")
        if fits < len(items) / 2:
            logger.warning("only %d of %d training prompts fit data.max_prompt_tokens=%d (lengths %d to %d)", fits,
                           len(items), self.max_prompt_tokens, lengths.min(), lengths.max())
        self._dropped_in_a_row = None

    def take(self, k: int) -> list[tuple[Problem, list[int]]]:
        """k (problem, prompt token ids) pairs: buffered prompts first, then fresh ones."""
        out: list[tuple[Problem, list[int]]] = []
        while len(out) < k:
            need = k - len(out)
            from_buffer, self.buffer = self.buffer[:need], self.buffer[need:]
            problems = from_buffer + self.iterator.next_batch(need - len(from_buffer))
            ids, kept, stats = render_prompts(problems, self.tokenizer, self.max_prompt_tokens)
            self.dropped += stats.n_skipped
            if self._dropped_in_a_row is not None:
                self._dropped_in_a_row = 0 if kept else self._dropped_in_a_row + len(problems)
                if self._dropped_in_a_row >= self.iterator.epoch_size:
                    self._check_pool_fits()
            out.extend(zip(kept, ids))
        return out

    def put_back(self, problems: Sequence[Problem]) -> None:
        """Prompts sampled but not trained on: drawn first next time, in this order."""
        self.buffer = list(problems) + self.buffer

    def state(self) -> dict:
        return {"iterator": self.iterator.get_state(), "buffer": [p.to_dict() for p in self.buffer],
                "dropped": self.dropped}

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state["iterator"])
        self.buffer = [Problem.from_dict(d) for d in state["buffer"]]
        self.dropped = int(state["dropped"])


# ==============================================================================================
# Groups and the training batch
# ==============================================================================================
@dataclasses.dataclass
class Group:
    """One prompt's n samples: a host `PrimeBatch` of n rows (outcome set; old_logprobs from the
    sampler and ref_logprobs when scored while grading)."""

    problem: Problem
    rows: PrimeBatch

    @property
    def outcome(self) -> np.ndarray:
        return self.rows.outcome


def bucket_length(length: int, lo: int, hi: int) -> int:
    """Power of two >= length, within [lo, hi] (few distinct shapes, so few compilations)."""
    return int(min(hi, max(lo, 1 << max(0, int(length) - 1).bit_length())))


def fit_prompts(prompt_ids: np.ndarray, prompt_mask: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts `[B, P]` cropped or padded on the left to `[B, width]` (all prompts must fit)."""
    have = prompt_ids.shape[1]
    if have > width:
        if prompt_mask[:, : have - width].any():
            raise ValueError(f"a prompt is longer than {width} tokens")
        return prompt_ids[:, have - width:], prompt_mask[:, have - width:]
    pad = ((0, 0), (width - have, 0))
    return np.pad(prompt_ids, pad), np.pad(prompt_mask, pad)


def assemble_batch(groups: Sequence[Group], max_new_tokens: int) -> PrimeBatch:
    """Stacks groups into one host batch (rows grouped by prompt). Long responses are cut to a
    power-of-two bucket (>= 128) of the longest one (the columns beyond it are padding)."""
    R = bucket_length(max(int(g.rows.response_mask.sum(1).max()) for g in groups), min(128, max_new_tokens),
                      max_new_tokens)
    return PrimeBatch.concatenate([g.rows for g in groups]).crop_responses(R)


def rollout_rows(rollouts: Rollouts, prompt_width: int, sampler_logprobs: bool = True) -> PrimeBatch:
    """The rollouts as host training rows: prompts fitted to `prompt_width` columns; the sampler's
    own log-probs as old_logprobs (None when `sampler_logprobs` is False: recomputed when scoring)."""
    prompt_ids, prompt_mask = fit_prompts(rollouts.prompt_tokens, rollouts.prompt_mask, prompt_width)
    old = rollouts.logprobs.astype(np.float32) if sampler_logprobs else None
    return PrimeBatch(prompt_ids=prompt_ids.astype(np.int32), prompt_mask=prompt_mask.astype(np.int32),
                      response_ids=rollouts.tokens.astype(np.int32),
                      response_mask=rollouts.response_mask.astype(np.int32), old_logprobs=old)


def trim_groups(kept: Sequence[Group], wanted: int, unit: int) -> tuple[list[Group], list[Group], list[Group]]:
    """(trained, surplus, untrained): the first `wanted` survivors, cut down to a multiple of `unit`
    groups (mini-batches hold whole groups and have fixed sizes); `surplus` are the survivors past
    `wanted`, `untrained` those dropped by the cut. Both go back to the prompt buffer."""
    trained, surplus = list(kept[:wanted]), list(kept[wanted:])
    usable = len(trained) // unit * unit
    return trained[:usable], surplus, trained[usable:]


# ==============================================================================================
# Grading
# ==============================================================================================
def response_texts(tokenizer, rollouts: Rollouts, rows: Sequence[int] | None = None) -> list[str]:
    """Response texts (of `rows`, default all) without the stop token (what the verifier reads)."""
    rows = range(len(rollouts.lengths)) if rows is None else rows
    tokens = [rollouts.tokens[r, : int(rollouts.lengths[r]) - int(rollouts.finished[r])].tolist() for r in rows]
    return tokenizer.batch_decode(tokens, skip_special_tokens=True)


def grade_rollouts(pool, tokenizer, rollouts: Rollouts, problems: Sequence[Problem]) -> tuple[np.ndarray, int, int]:
    """(outcome [B] on every process, grading errors, timeouts) of rows answering `problems` (one a
    row): this process decodes and grades its share of the rows in its own pool; the scores are
    gathered from all processes (collective: every process calls it with the same rows)."""
    rows = len(problems)
    share = host_share(rows)
    texts = response_texts(tokenizer, rollouts, share)
    graded = pool.grade([(text, problems[r].ground_truth, problems[r].ability) for r, text in zip(share, texts)])
    outcome = gather_shares(np.asarray(graded.scores, np.float32), rows)
    counts = gather_shares(np.asarray([[graded.errors, graded.timeouts]], np.int64), jax.process_count()).sum(0)
    return outcome, int(counts[0]), int(counts[1])


# ==============================================================================================
# Scoring: the log-probs the updates need
# ==============================================================================================
class RolloutScorer:
    """Old (policy) and reference log-probs of rollout rows, in fixed-size chunks of `score_batch`
    rows (the last one padded with repeated rows, so one compilation).

    steps: the run's `TrainSteps` (its `score` program and row sharding); take_rows(batch, index):
    rows of a device batch, kept on the devices; scored_fields: the log-probs the run scores
    (`RunBuilder.scored_fields`: old_logprobs unless the sampler's are used, ref_logprobs when
    process rewards are on).
    """

    def __init__(self, steps, mesh, score_batch: int, take_rows, scored_fields: tuple[str, ...]):
        self.steps = steps
        self.mesh = mesh
        self.score_batch = int(score_batch)
        self.take_rows = take_rows
        self.scored_fields = tuple(scored_fields)
        self._concat_rows = jax.jit(lambda parts, total: jax.tree.map(lambda *xs: jnp.concatenate(xs)[:total], *parts),
                                    static_argnums=1, out_shardings=steps.batch_sharding)

    def wanted(self, batch: PrimeBatch, policy_params, reference_params) -> dict:
        """{field: params} of the scored log-probs `batch` does not hold yet (the policy's for
        old_logprobs, the PRM reference's for ref_logprobs)."""
        params = {"old_logprobs": policy_params, "ref_logprobs": reference_params}
        return {field: params[field] for field in self.scored_fields if getattr(batch, field) is None}

    def dispatch(self, batch: PrimeBatch, wanted: dict) -> tuple[list, int]:
        """Dispatches the `wanted` log-probs of a host or device batch; returns the pending device
        results for `gather` (device work runs while the host goes on, e.g. grading)."""
        total, size = batch.num_rows, self.score_batch
        on_host = isinstance(batch.response_mask, np.ndarray)
        pending = []
        for start in range(0, total, size if wanted else total):
            index = np.arange(start, start + size) % total
            chunk = batch.rows(index).to_device(self.mesh) if on_host else self.take_rows(batch, index)
            # old_logprobs at the rollout temperature, ref_logprobs from the raw logits (score step)
            pending.append(self.steps.score(wanted.get("old_logprobs"), None, wanted.get("ref_logprobs"), chunk)
                           if wanted else {})
        return pending, total

    def gather(self, pending: list, total: int) -> dict:
        """{field: [total, R] device array} from `dispatch`'s chunks."""
        return self._concat_rows(pending, total) if pending and pending[0] else {}

    def score(self, batch: PrimeBatch, policy_params, reference_params) -> PrimeBatch:
        """`batch` (on the devices) with the log-probs the updates need."""
        return batch.replace(**self.gather(*self.dispatch(batch, self.wanted(batch, policy_params, reference_params))))


# ==============================================================================================
# The collector
# ==============================================================================================
@dataclasses.dataclass
class _Tally:
    """What a step's attempts add up to (the step's rollout metrics)."""

    outcomes: list = dataclasses.field(default_factory=list)
    lengths: list = dataclasses.field(default_factory=list)
    truncated: int = 0
    tokens: int = 0
    decoded_tokens: int = 0  # live slot-steps: tokens produced by decode steps
    slot_steps: int = 0  # decode steps x slots
    attempts: int = 0
    errors: int = 0
    timeouts: int = 0
    groups_sampled: int = 0  # groups graded (streamed: only the ones that finished)
    groups_cut: int = 0  # streamed: groups in flight or waiting when sampling stopped
    row_sources: list = dataclasses.field(default_factory=list)  # the problem source of every graded row
    seconds: dict = dataclasses.field(default_factory=lambda: {"sample": 0.0, "grade": 0.0, "score": 0.0})

    def add_sampler_stats(self, stats: dict) -> None:
        self.decoded_tokens += int(stats["decoded_tokens"])
        self.slot_steps += int(stats["slot_steps"])

    def add_graded(self, rollouts: Rollouts, outcome: np.ndarray, errors: int, timeouts: int,
                   problems: Sequence[Problem]) -> None:
        """`problems`: the problem of each row of `rollouts`."""
        self.outcomes.append(outcome)
        self.row_sources.extend(p.source for p in problems)
        self.lengths.append(rollouts.lengths)
        self.truncated += int((~rollouts.finished).sum())
        self.tokens += int(rollouts.lengths.sum())
        self.errors += errors
        self.timeouts += timeouts
        self.groups_sampled += rollouts.num_prompts

    def metrics(self, kept: Sequence[Group], trained: Sequence[Group], surplus: int, streamed: bool,
                sources: Sequence[str] = ()) -> dict:
        """The step's rollout metrics; split by problem source (`by_source/<source>/...`) when the training
        set has 2 to `MAX_SOURCE_METRICS` `sources`."""
        survivors = len(kept)
        outcomes, lengths = np.concatenate(self.outcomes), np.concatenate(self.lengths)
        sample_s = max(self.seconds["sample"], 1e-9)
        row = {
            "train/reward": float(outcomes.mean()),
            "verifier/accuracy_before_filter": float(outcomes.mean()),
            "verifier/accuracy_after_filter": float(np.mean([g.outcome.mean() for g in trained])) if trained else 0.0,
            "verifier/errors": self.errors,
            "verifier/timeouts": self.timeouts,
            "filter/kept_group_frac": survivors / self.groups_sampled,
            "filter/groups_trained": len(trained),
            "filter/attempts": self.attempts,
            "filter/surplus_groups": surplus,
            "response/length_mean": float(lengths.mean()),
            "response/length_max": int(lengths.max()),
            "response/truncated_frac": self.truncated / len(lengths),
            "rollout/slot_utilisation": self.decoded_tokens / max(1, self.slot_steps),
            "perf/rollouts_per_s": len(lengths) / sample_s,
            "perf/tokens_per_s": self.tokens / sample_s,
            "time/sample_s": self.seconds["sample"],
            "time/grade_s": self.seconds["grade"],
            "time/score_s": self.seconds["score"],
        }
        if streamed:
            row["rollout/groups_cut"] = self.groups_cut
        if 2 <= len(sources) <= MAX_SOURCE_METRICS:
            row.update(self.source_metrics(outcomes, kept, trained, sources))
        return row

    def source_metrics(self, outcomes: np.ndarray, kept: Sequence[Group], trained: Sequence[Group],
                       sources: Sequence[str]) -> dict:
        """Per training source: mean outcome of its sampled rows (NaN when the step drew none), groups
        sampled, kept by the filter and trained; which source the training signal comes from."""
        row_sources = np.asarray(self.row_sources)
        row = {}
        for source in sources:
            name, rows = metric_name(source), row_sources == source
            row[f"by_source/{name}/reward"] = float(outcomes[rows].mean()) if rows.any() else float("nan")
            row[f"by_source/{name}/groups_sampled"] = int(rows.sum()) // (len(outcomes) // self.groups_sampled)
            row[f"by_source/{name}/groups_kept"] = sum(g.problem.source == source for g in kept)
            row[f"by_source/{name}/groups_trained"] = sum(g.problem.source == source for g in trained)
        return row


MAX_SOURCE_METRICS = 8  # more sources than this (e.g. Eurus-2's data_source values): no per-source metrics


def metric_name(source: str) -> str:
    """`source` as one metric-name component (TensorBoard tags: letters, digits, `_`, `-`, `.`)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", source) or "_"


class RolloutCollector:
    """Collects a step's groups: attempts of `prompts_per_attempt` prompts until `prompts_per_step`
    groups survived the accuracy filter, or `rollout.max_refill` extra attempts are spent.

    config: the run config (rollout, batch, algo sections); prompts: the run's `PromptSource`;
    sampler: its `Sampler` (streamed path when it has decode slots); stop_ids: the stop tokens;
    scorer: its `RolloutScorer`; prompt_width: prompt columns of training rows; settings: the
    sampling arguments of a rollout call (`RunBuilder.rollout_settings`: max_new_tokens, n,
    temperature, top_p, top_k), the same ones the plan compiles with.
    """

    def __init__(self, config, *, prompts: PromptSource, sampler, tokenizer, stop_ids: Sequence[int],
                 scorer: RolloutScorer, prompts_per_attempt: int, prompt_width: int, settings: dict):
        self.config = config
        self.prompts = prompts
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.stop_ids = list(stop_ids)
        self.scorer = scorer
        self.prompts_per_attempt = prompts_per_attempt
        self.prompt_width = prompt_width
        self.settings = dict(settings)
        self.n = self.settings["n"]
        self.groups_per_step = config.batch.prompts_per_step

    @property
    def streamed(self) -> bool:
        return self.config.rollout.decode_slots > 0

    def collect(self, step: int, key, params, reference_params, pool) -> tuple[list[Group], dict]:
        """(groups to train on, the step's rollout metrics). `key` is the step's sampling key
        (attempt a samples with `fold_in(key, a)`); `params` the policy's, `reference_params` the
        PRM reference's (scored while grading on the static path); `pool` the `RewardPool`."""
        c = self.config
        tally, kept = _Tally(), []
        for attempt in range(c.rollout.max_refill + 1):
            tally.attempts += 1
            items = self.prompts.take(self.prompts_per_attempt)
            sample = functools.partial(
                self.sampler.stream if self.streamed else self.sampler.generate, params,
                [ids for _, ids in items], stop_token_ids=self.stop_ids, key=jax.random.fold_in(key, attempt),
                **self.settings)
            problems = [p for p, _ in items]
            if self.streamed:
                self._attempt_streamed(sample, problems, pool, tally, kept)
            else:
                self._attempt_static(sample, problems, (params, reference_params), pool, tally, kept)
            if len(kept) >= self.groups_per_step:
                break
        unit = math.lcm(c.batch.mini_batch // self.n, c.batch.prm_mini_batch // self.n)
        trained, surplus, untrained = trim_groups(kept, self.groups_per_step, unit)
        self.prompts.put_back([g.problem for g in surplus])
        if untrained:
            # Routine on small batches (filter/groups_trained records it, the progress bar shows the kept
            # fraction); the step warns when nothing trains.
            logger.debug("step %d: only %d/%d prompt groups survived the filter after %d attempts; training on %d",
                         step, min(len(kept), self.groups_per_step), self.groups_per_step, tally.attempts,
                         len(trained))
            self.prompts.put_back([g.problem for g in untrained])
        return trained, tally.metrics(kept, trained, len(surplus), self.streamed, self.prompts.sources)

    def _survivors(self, outcome: np.ndarray) -> np.ndarray:
        """Indices of the groups (of `outcome [G*n]`) that pass the accuracy filter."""
        a = self.config.algo
        if not a.filter:
            return np.arange(len(outcome) // self.n)
        return np.flatnonzero(np.asarray(algo.accuracy_filter(outcome, self.n, a.filter_low, a.filter_high)))

    def _attempt_static(self, sample, problems, score_params, pool, tally: _Tally, kept: list) -> None:
        """One call for all the attempt's prompts; every row scored on the devices while it is graded."""
        t = time.perf_counter()
        rollouts = sample()
        tally.seconds["sample"] += time.perf_counter() - t
        tally.add_sampler_stats(self.sampler.last_stats)
        rows = rollout_rows(rollouts, self.prompt_width, not self.config.algo.recompute_old_logprobs)
        t = time.perf_counter()
        # Device work dispatched before grading runs in the pool: the two overlap.
        pending = (self.scorer.dispatch(rows, self.scorer.wanted(rows, *score_params))
                   if self.config.rollout.overlap_scoring else None)
        row_problems = [problems[r // self.n] for r in range(rows.num_rows)]
        outcome, errors, timeouts = grade_rollouts(pool, self.tokenizer, rollouts, row_problems)
        rows = rows.replace(outcome=outcome)
        tally.seconds["grade"] += time.perf_counter() - t
        if pending is not None:
            t = time.perf_counter()
            rows = rows.replace(**to_host(self.scorer.gather(*pending)))
            tally.seconds["score"] += time.perf_counter() - t
        tally.add_graded(rollouts, outcome, errors, timeouts, row_problems)
        for g in self._survivors(outcome):
            kept.append(Group(problems[g], rows.rows(slice(g * self.n, (g + 1) * self.n))))

    def _attempt_streamed(self, sample, problems, pool, tally: _Tally, kept: list) -> None:
        """Groups graded as they finish while decoding goes on; stops once enough survived. Prompts
        whose groups were not all done by then go back to the buffer (in draw order)."""
        done = np.zeros(len(problems), bool)
        stream = sample()
        t = time.perf_counter()
        for part in stream:  # the sampler has already dispatched its next decode steps
            tally.seconds["sample"] += time.perf_counter() - t
            t = time.perf_counter()
            index = part.prompt_index[:: self.n]
            row_problems = [problems[i] for i in part.prompt_index]
            outcome, errors, timeouts = grade_rollouts(pool, self.tokenizer, part, row_problems)
            tally.seconds["grade"] += time.perf_counter() - t
            tally.add_graded(part, outcome, errors, timeouts, row_problems)
            done[index] = True
            rows = rollout_rows(part, self.prompt_width, not self.config.algo.recompute_old_logprobs)
            rows = rows.replace(outcome=outcome)
            for g in self._survivors(outcome):
                kept.append(Group(problems[index[g]], rows.rows(slice(g * self.n, (g + 1) * self.n))))
            if len(kept) >= self.groups_per_step:
                break
            t = time.perf_counter()
        stream.close()  # the rows still decoding are dropped with the decode state
        tally.add_sampler_stats(self.sampler.last_stats)
        tally.groups_cut += int((~done).sum())
        self.prompts.put_back([problems[i] for i in np.flatnonzero(~done)])
