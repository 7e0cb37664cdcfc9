"""The rollout collector's parts (prime_jax/train/rollouts.py): the prompt buffer, batch assembly,
the trim/refill logic, and the collector's static and streamed paths with a scripted sampler and
grader (no model: what is tested is which groups are kept, what goes back to the buffer, metrics)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from prime_jax.config import base_config
from prime_jax.data import build_tiny_tokenizer, make_problems
from prime_jax.sampling import Rollouts
from prime_jax.train.batch import PrimeBatch
from prime_jax.train.rollouts import (Group, PromptSource, RolloutCollector, assemble_batch, fit_prompts,
                                      rollout_rows, trim_groups)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


# ---------------------------------------------------------------------------- the prompt buffer
def test_prompt_source_draws_the_buffer_first_and_resumes_exactly(tokenizer):
    problems = make_problems(30, 0, stream=0)
    source = PromptSource(problems, tokenizer, max_prompt_tokens=200, seed=3)
    first = source.take(5)
    assert len(first) == 5 and all(isinstance(ids, list) and ids for _, ids in first)
    source.put_back([first[3][0], first[1][0]])
    source.put_back([first[4][0]])  # the latest put back is drawn first
    state = source.state()
    again = source.take(4)
    assert [p.id for p, _ in again[:3]] == [first[4][0].id, first[3][0].id, first[1][0].id]
    assert again[3][0].id not in {p.id for p, _ in first}  # then the shuffled pool goes on

    resumed = PromptSource(problems, tokenizer, max_prompt_tokens=200, seed=3)
    resumed.set_state(state)  # a checkpoint's JSON state repeats the same draws
    assert [p.id for p, _ in resumed.take(4)] == [p.id for p, _ in again]
    assert [ids for _, ids in resumed.take(3)] == [ids for _, ids in source.take(3)]


def test_prompt_source_drops_and_counts_prompts_that_do_not_fit(tokenizer):
    problems = make_problems(40, 0, stream=0)
    lengths = [len(ids) for _, ids in PromptSource(problems, tokenizer, 10_000, seed=0).take(40)]  # draw order
    limit = min(lengths)  # the synthetic prompts come in two lengths: about half are too long
    fits = np.cumsum(np.asarray(lengths) <= limit)
    drawn = int(np.searchsorted(fits, 8)) + 1  # prompts drawn until the 8th that fits
    source = PromptSource(problems, tokenizer, max_prompt_tokens=limit, seed=0)
    taken = source.take(8)
    assert len(taken) == 8 and [len(ids) for _, ids in taken] == [x for x in lengths[:drawn] if x <= limit]
    assert source.dropped == drawn - 8 > 0  # the long ones are counted, not silently lost
    assert source.state()["dropped"] == source.dropped


# ---------------------------------------------------------------------------- batch assembly
def test_fit_prompts_crops_and_pads_on_the_left():
    ids = np.array([[0, 0, 5, 6], [0, 7, 8, 9]], np.int32)
    mask = (ids > 0).astype(np.int32)
    cropped_ids, cropped_mask = fit_prompts(ids, mask, 3)
    np.testing.assert_array_equal(cropped_ids, ids[:, 1:])
    np.testing.assert_array_equal(cropped_mask, mask[:, 1:])
    padded_ids, padded_mask = fit_prompts(ids, mask, 6)
    np.testing.assert_array_equal(padded_ids, np.concatenate([np.zeros((2, 2), np.int32), ids], 1))
    np.testing.assert_array_equal(padded_mask[:, :2], 0)
    with pytest.raises(ValueError, match="longer than 2 tokens"):
        fit_prompts(ids, mask, 2)


def _group(problem, lengths, outcome, columns=300):
    n = len(lengths)
    mask = (np.arange(columns)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    rows = PrimeBatch(prompt_ids=np.full((n, 4), 3, np.int32), prompt_mask=np.ones((n, 4), np.int32),
                      response_ids=mask * 9, response_mask=mask, outcome=np.asarray(outcome, np.float32),
                      old_logprobs=-mask.astype(np.float32))
    return Group(problem, rows)


def test_assemble_batch_keeps_group_order_and_crops_to_a_bucket():
    problems = make_problems(3, 0, stream=0)
    groups = [_group(problems[0], [3, 130], [1, 0]), _group(problems[1], [5, 7], [0, 1])]
    batch = assemble_batch(groups, max_new_tokens=300)
    assert batch.response_ids.shape == (4, 256)  # 130 -> the next power of two
    np.testing.assert_array_equal(batch.outcome, [1, 0, 0, 1])
    np.testing.assert_array_equal(batch.response_mask.sum(1), [3, 130, 5, 7])
    short = assemble_batch([groups[1]], max_new_tokens=300)
    assert short.response_ids.shape[1] == 128  # never below 128 columns (few shapes)
    assert assemble_batch([groups[1]], max_new_tokens=64).response_ids.shape[1] == 64  # nor above the limit


def test_rollout_rows_fit_prompts_and_take_the_sampler_logprobs():
    n, R = 2, 6
    rollouts = Rollouts(tokens=np.ones((n, R), np.int32), response_mask=np.ones((n, R), np.int32),
                        logprobs=np.full((n, R), -0.5, np.float64), lengths=np.full(n, R, np.int32),
                        finished=np.ones(n, bool), prompt_tokens=np.array([[0, 4, 5]] * n, np.int32),
                        prompt_mask=np.array([[0, 1, 1]] * n, np.int32), prompt_index=np.zeros(n, np.int32), n=n)
    rows = rollout_rows(rollouts, prompt_width=8)
    assert rows.prompt_ids.shape == (n, 8) and rows.old_logprobs.dtype == np.float32
    assert rollout_rows(rollouts, prompt_width=8, sampler_logprobs=False).old_logprobs is None


# ---------------------------------------------------------------------------- trim / refill
@pytest.mark.parametrize("kept,wanted,unit,expected", [
    (10, 8, 4, (8, 2, 0)),  # enough: the surplus goes back
    (7, 8, 4, (4, 0, 3)),  # too few: whole mini-batches only, the rest goes back untrained
    (3, 8, 4, (0, 0, 3)),  # not one mini-batch: nothing trains
    (8, 8, 1, (8, 0, 0)),
])
def test_trim_groups(kept, wanted, unit, expected):
    groups = list(range(kept))
    trained, surplus, untrained = trim_groups(groups, wanted, unit)
    assert (len(trained), len(surplus), len(untrained)) == expected
    assert trained + untrained + surplus == groups  # nothing lost, order kept


# ---------------------------------------------------------------------------- the collector
class _TextTokenizer:
    def batch_decode(self, tokens, skip_special_tokens=True):  # a response's first token is its answer
        return [str(row[0]) if row else "" for row in tokens]


class _Pool:
    """Grades a response right when its text (the sample number 1..n) is in the ground truth."""

    def grade(self, items):
        scores = [float(text in truth) for text, truth, _ in items]
        return dataclasses.make_dataclass("Graded", ["scores", "errors", "timeouts"])(scores, 0, 0)


class _ScriptedSampler:
    """Rows answer "1".."n" (sample r of a group answers str(r+1)); prompt i's rows are `lengths[i]`
    long. `stream` yields one group at a time, shortest first (as decode slots finish them)."""

    def __init__(self, n, slots=0):
        self.n, self.slots, self.calls, self.yielded, self.last_stats = n, slots, [], 0, {}

    def _rollouts(self, prompts, index):
        n = self.n
        rows = len(index) * n
        lengths = np.repeat([len(prompts[i]) % 5 + 1 for i in index], n).astype(np.int32)
        tokens = np.zeros((rows, 8), np.int32)
        tokens[:, 0] = np.tile(np.arange(1, n + 1), len(index))
        mask = (np.arange(8)[None] < lengths[:, None]).astype(np.int32)
        prompt = np.ones((rows, 4), np.int32)
        return Rollouts(tokens=tokens, response_mask=mask, logprobs=-0.1 * mask, lengths=lengths,
                        finished=np.zeros(rows, bool), prompt_tokens=prompt, prompt_mask=prompt,
                        prompt_index=np.repeat(np.asarray(index, np.int32), n), n=n)

    def generate(self, model, prompts, **kwargs):
        self.calls.append(len(prompts))
        self.last_stats = dict(decoded_tokens=30, slot_steps=40)
        return self._rollouts(prompts, np.arange(len(prompts)))

    def stream(self, model, prompts, **kwargs):
        self.calls.append(len(prompts))
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]) % 5, i))
        for k, i in enumerate(order):
            self.last_stats = dict(decoded_tokens=9 * (k + 1), slot_steps=10 * (k + 1))
            self.yielded += 1
            yield self._rollouts(prompts, [i])


def _collector(tokenizer, *, truths, slots=0, per_step=4, oversample=6, max_refill=2, sources=None):
    """A collector over 60 problems whose k-th drawn prompt has ground truth `truths[k % len(truths)]`
    (and source `sources[k % len(sources)]` when given)."""
    c = base_config()
    c.rollout.n, c.rollout.decode_slots, c.rollout.max_refill = 2, slots, max_refill
    c.rollout.overlap_scoring = False
    c.batch.prompts_per_step, c.batch.mini_batch, c.batch.prm_mini_batch = per_step, 4, 4
    c.algo.filter_low, c.algo.filter_high = 0.2, 0.8
    problems = make_problems(60, 0, stream=0)
    order = [p.id for p, _ in PromptSource(problems, tokenizer, 200, seed=0).take(60)]
    truth = {i: truths[k % len(truths)] for k, i in enumerate(order)}
    problems = [dataclasses.replace(p, ground_truth=truth[p.id]) for p in problems]
    if sources:
        source_of = {i: sources[k % len(sources)] for k, i in enumerate(order)}
        problems = [dataclasses.replace(p, source=source_of[p.id]) for p in problems]
    source = PromptSource(problems, tokenizer, max_prompt_tokens=200, seed=0)
    sampler = _ScriptedSampler(n=2, slots=slots)
    collector = RolloutCollector(c, prompts=source, sampler=sampler, tokenizer=_TextTokenizer(), stop_ids=[],
                                 scorer=None, prompts_per_attempt=oversample, prompt_width=8,
                                 settings=dict(max_new_tokens=c.rollout.max_new_tokens, n=c.rollout.n,
                                               temperature=1.0, top_p=1.0, top_k=0))
    return collector, source, sampler, order


def test_static_collector_refills_until_enough_survive(tokenizer):
    # one prompt in three has a mixed group (sample 1 right, 2 wrong): 2 survivors per 6 prompts
    collector, source, sampler, _ = _collector(tokenizer, truths=["1", "12", ""])
    groups, row = collector.collect(1, jax.random.PRNGKey(0), None, None, _Pool())
    assert sampler.calls == [6, 6]  # a second attempt refilled the 2 survivors of the first
    assert len(groups) == 4 and all(g.problem.ground_truth == "1" for g in groups)
    assert all(g.outcome.tolist() == [1.0, 0.0] for g in groups)
    assert row["filter/attempts"] == 2 and row["filter/groups_trained"] == 4 and row["filter/surplus_groups"] == 0
    assert row["filter/kept_group_frac"] == pytest.approx(4 / 12)
    assert row["train/reward"] == pytest.approx((4 * 0.5 + 4 * 1.0) / 12)
    assert row["rollout/slot_utilisation"] == pytest.approx(60 / 80)  # summed over the attempts
    assert "rollout/groups_cut" not in row and source.buffer == []


def test_static_collector_puts_surplus_and_untrained_groups_back(tokenizer):
    collector, source, _, order = _collector(tokenizer, truths=["1"], per_step=4, oversample=6)
    groups, row = collector.collect(1, jax.random.PRNGKey(0), None, None, _Pool())
    assert [g.problem.id for g in groups] == order[:4] and row["filter/surplus_groups"] == 2
    assert [p.id for p in source.buffer] == order[4:6]  # surplus survivors: drawn first next step
    assert [p.id for p, _ in source.take(3)] == order[4:7]

    collector, source, _, order = _collector(tokenizer, truths=["1", "", "", "", "", ""], per_step=8, max_refill=0)
    groups, row = collector.collect(1, jax.random.PRNGKey(0), None, None, _Pool())
    # 1 survivor, not a whole mini-batch of 2 groups: nothing trains, its prompt goes back
    assert groups == [] and row["filter/groups_trained"] == 0 and [p.id for p in source.buffer] == order[:1]


def test_streamed_collector_stops_once_enough_survive_and_puts_the_rest_back(tokenizer):
    collector, source, sampler, order = _collector(tokenizer, truths=["1", "12"], slots=4, per_step=2, oversample=8)
    groups, row = collector.collect(1, jax.random.PRNGKey(0), None, None, _Pool())
    assert len(groups) == 2 and sampler.calls == [8] and row["filter/attempts"] == 1
    # the stream was left after the group that made it enough: the others were never graded
    assert 2 <= sampler.yielded < 8 and row["rollout/groups_cut"] == 8 - sampler.yielded
    assert row["filter/kept_group_frac"] == pytest.approx(2 / sampler.yielded)
    assert row["rollout/slot_utilisation"] == pytest.approx(0.9)
    graded = {g.problem.id for g in groups}
    # the cut prompts go back in draw order (the graded ones that did not survive are spent)
    cut = [p.id for p in source.buffer]
    assert len(cut) == row["rollout/groups_cut"] and cut == [i for i in order[:8] if i in set(cut)]
    assert not graded & set(cut)


def test_streamed_collector_runs_another_attempt_when_the_stream_ends_short(tokenizer):
    collector, source, sampler, order = _collector(tokenizer, truths=["1", "", "", ""], slots=4, per_step=4,
                                                   oversample=8)
    groups, row = collector.collect(1, jax.random.PRNGKey(0), None, None, _Pool())
    assert sampler.calls == [8, 8] and row["filter/attempts"] == 2
    assert sorted(g.problem.id for g in groups) == sorted(order[k] for k in (0, 4, 8, 12))  # finishing order
    # the first stream ran to its end; the second was left once the 4th group survived
    assert row["rollout/groups_cut"] == 16 - sampler.yielded == len(source.buffer)


@pytest.mark.parametrize("slots", [0, 4])
def test_a_mixed_training_set_reports_each_sources_reward_and_groups(tokenizer, slots):
    """Which source the training signal comes from (issue 32: GSM8K train beside word problems): the
    step's reward, groups sampled, kept and trained, split by problem source; none for one source."""
    # drawn prompt k: source "gsm8k train" when k is even, "synthetic" when odd; only odd ones (a mixed
    # group: sample 1 right, 2 wrong) survive the filter, every even one is all wrong
    collector, _, sampler, _ = _collector(tokenizer, truths=["", "1"], sources=["gsm8k train", "synthetic"],
                                          slots=slots, per_step=2, oversample=6)
    groups, row = collector.collect(1, jax.random.PRNGKey(0), None, None, _Pool())
    assert [g.problem.source for g in groups] == ["synthetic", "synthetic"]
    assert row["by_source/synthetic/groups_trained"] == 2 and row["by_source/gsm8k_train/groups_trained"] == 0
    assert row["by_source/gsm8k_train/groups_kept"] == 0 and row["by_source/gsm8k_train/reward"] == 0.0
    graded = 6 if slots == 0 else sampler.yielded
    assert row["by_source/gsm8k_train/groups_sampled"] + row["by_source/synthetic/groups_sampled"] == graded
    assert row["by_source/synthetic/reward"] == pytest.approx(0.5)
    assert row["by_source/synthetic/groups_kept"] == row["filter/kept_group_frac"] * graded

    _, row = _collector(tokenizer, truths=["", "1"], per_step=2)[0].collect(1, jax.random.PRNGKey(0), None, None,
                                                                           _Pool())
    assert not any(key.startswith("by_source/") for key in row)
