"""Benchmark evaluation as a library: generate, grade, aggregate (used by `prime_jax.evaluate` and the
trainer's held-out eval; settings and metrics: `prime_jax.eval.results`; output files: `prime_jax.eval.report`).

One evaluation of one benchmark, as data moving through this module::

    problems ──render_prompts──▶ prompt ids ──generate_responses (Sampler)──▶ Generation
        ──RewardPool.score──▶ scores ──problem_metrics / aggregate──▶ metrics
        (optional) ──PRMScorer: Σ_t (log π_prm − log π_ref)──▶ best-of-n
"""
from __future__ import annotations

import collections
import logging
import time
import zlib
from typing import Any, Callable, Sequence

import jax
import numpy as np

from prime_jax.data import render_prompts
from prime_jax.eval.prm_scorer import PRMScorer
from prime_jax.eval.results import (BenchmarkResult, EvalSettings, Generation, aggregate, answer_key, k_values,
                                    majority_index, prm_p_correct, problem_metrics)
from prime_jax.parallel import gather_shares, host_share
from prime_jax.rewards import CORRECT_THRESHOLD
from prime_jax.rewards.math import extract_answer
from prime_jax.rewards.pool import BatchResult

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------
def decode_responses(tokenizer, tokens: np.ndarray, lengths: np.ndarray, finished: np.ndarray) -> list[str]:
    """Response texts without the stop token and special tokens (what the verifier reads)."""
    rows = [row[: int(length) - int(done)] for row, length, done in
            zip(np.asarray(tokens).tolist(), np.asarray(lengths).tolist(), np.asarray(finished).tolist())]
    return list(tokenizer.batch_decode(rows, skip_special_tokens=True))


def generate_responses(sampler, model, tokenizer, prompt_ids: Sequence[Sequence[int]], settings: EvalSettings, *,
                       stop_token_ids: Sequence[int], key) -> Generation:
    """n samples for every prompt with `sampler` (a `prime_jax.sampling.Sampler`), prompt-major.

    Prompts are sorted by length and generated `settings.batch_size` at a time (fewer padded
    columns per call); the output is in the input order. `model` is a `Qwen2ForCausalLM` or its
    `(graphdef, state)`; `key` a PRNG key (call i uses `fold_in(key, i)`).
    """
    n, num = settings.n, len(prompt_ids)
    texts: list[str | None] = [None] * (num * n)
    responses: list[list[int] | None] = [None] * (num * n)
    finished: list[bool] = [False] * (num * n)
    order = sorted(range(num), key=lambda i: len(prompt_ids[i]))
    for call, start in enumerate(range(0, num, settings.batch_size)):
        idx = order[start:start + settings.batch_size]
        rollouts = sampler.generate(
            model, [list(prompt_ids[i]) for i in idx], max_new_tokens=settings.max_new_tokens, n=n,
            temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
            stop_token_ids=list(stop_token_ids), key=jax.random.fold_in(key, call))
        chunk_texts = decode_responses(tokenizer, rollouts.tokens, rollouts.lengths, rollouts.finished)
        chunk_ids = rollouts.response_lists()
        for j, i in enumerate(idx):
            for s in range(n):
                r = j * n + s
                texts[i * n + s] = chunk_texts[r]
                responses[i * n + s] = chunk_ids[r]
                finished[i * n + s] = bool(rollouts.finished[r])
    return Generation(texts=texts, response_ids=responses, finished=finished)


# ----------------------------------------------------------------------------------------------
# One benchmark
# ----------------------------------------------------------------------------------------------
class ProcessShareGrader:
    """A grading pool for several processes: each grades its `host_share` of the responses in its
    own `pool` and every process gets all scores and statuses (one process: `pool` itself)."""

    STATUSES = ("ok", "timeout", "error")

    def __init__(self, pool):
        self.pool = pool

    def grade(self, items: Sequence[tuple]):
        if jax.process_count() == 1:
            return self.pool.grade(items)
        share = host_share(len(items))
        graded = self.pool.grade([items[i] for i in share])
        codes = [self.STATUSES.index(s) for s in graded.statuses]
        scores = gather_shares(np.asarray(graded.scores, np.float32), len(items))
        statuses = gather_shares(np.asarray(codes, np.int32), len(items))
        return BatchResult([float(x) for x in scores], [self.STATUSES[int(c)] for c in statuses])


def benchmark_key(key, name: str):
    """The PRNG key of a benchmark: stable across runs and benchmark orders."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def evaluate_benchmark(name: str, problems: Sequence, *, tokenizer, pool, settings: EvalSettings,
                       generate: Callable[[list[list[int]], int], Generation], prm_scorer: PRMScorer | None = None,
                       extract: Callable[[str], str | None] | None = None, progress=None,
                       observe: Callable[..., None] | None = None) -> BenchmarkResult:
    """Generate for, grade and score the problems of one benchmark, `settings.batch_size` prompts
    at a time.

    generate(prompt_ids, chunk) -> Generation with len(prompt_ids) × settings.n rows (prompt-major);
    `chunk` numbers the calls (0, 1, ...), for their PRNG keys.
    pool: a `RewardPool` (``.grade([(response, ground_truth, ability), ...])``).
    progress: a `prime_jax.eval.progress.ProgressFile`: each finished chunk's records are written
    to it at once, and chunks it already holds are not generated again (resume).
    observe(problems, prompt_ids, generation, records): called with each generated chunk (the
    trainer picks the responses of its HTML page from them).
    """
    t0 = time.perf_counter()
    n = settings.n
    ids, kept, stats = render_prompts(list(problems), tokenizer, settings.max_prompt_tokens)
    kept_ids = {id(p) for p in kept}
    dropped = [p for p in problems if id(p) not in kept_ids]
    if dropped:
        logger.warning("%s: %d of %d problems dropped (%s)", name, len(dropped), len(problems), stats.summary())

    records_by_problem: dict[int, list[dict]] = {}
    timing = collections.Counter()
    order = sorted(range(len(kept)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    for chunk, start in enumerate(range(0, len(kept), settings.batch_size)):
        chunk_problems = [kept[i] for i in order[start:start + settings.batch_size]]
        done = progress.done.get(chunk) if progress is not None else None
        if done is None:
            done = _chunk_records(name, chunk_problems, [ids[i] for i in order[start:start + settings.batch_size]],
                                  chunk,
                                  tokenizer=tokenizer, pool=pool, n=n, generate=generate, prm_scorer=prm_scorer,
                                  extract=extract, timing=timing, observe=observe)
            if progress is not None:
                progress.add(chunk, done)
        for p, recs in zip(chunk_problems, done):
            records_by_problem[id(p)] = recs
    for p in dropped:
        records_by_problem[id(p)] = [{
            "benchmark": name, "problem_id": p.id, "sample": None, "prompt": None, "response": None,
            "extracted_answer": None, "ground_truth": p.ground_truth, "score": 0.0, "correct": False,
            "dropped": "prompt_too_long"}]
    records = [dict(rec, problem_index=k) for k, p in enumerate(problems) for rec in records_by_problem[id(p)]]
    metrics = _benchmark_metrics([records_by_problem[id(p)] for p in kept], kept, records, n,
                                 num_problems=len(problems), num_dropped=len(dropped), timing=timing, t0=t0)
    logger.info("%s: pass@1 %.4f over %d problems (n=%d) in %.1fs", name, metrics["pass@1"], len(problems), n,
                metrics["time_total_s"])
    return BenchmarkResult(name=name, metrics=metrics, records=records)


def _benchmark_metrics(kept_records: list[list[dict]], kept: Sequence, records: list[dict], n: int, *,
                       num_problems: int, num_dropped: int, timing: collections.Counter, t0: float) -> dict[str, Any]:
    """A benchmark's metrics from its records (`kept_records[i]`: the n records of `kept[i]`, a problem
    whose prompt fitted; `records`: every record, dropped problems' too)."""
    sampled = [r for r in records if r["sample"] is not None]
    per_problem = [problem_metrics([r["score"] for r in recs],
                                   [answer_key(r["extracted_answer"]) for r in recs] if p.ability == "math" else None,
                                   [r["prm_reward"] for r in recs] if "prm_reward" in recs[0] else None,
                                   [r["prm_p_correct"] for r in recs] if "prm_p_correct" in recs[0] else None)
                   for p, recs in zip(kept, kept_records)]
    metrics: dict[str, Any] = aggregate(per_problem, num_dropped)
    if not per_problem:
        metrics.update({k: 0.0 for k in (f"pass@{k}" for k in k_values(n))})
    statuses = collections.Counter(r["grading_status"] for r in sampled)
    metrics.update({
        "num_problems": num_problems, "num_dropped": num_dropped, "n": n,
        "response_length": float(np.mean([r["num_tokens"] for r in sampled])) if sampled else 0.0,
        "truncated_frac": float(1.0 - np.mean([r["finished"] for r in sampled])) if sampled else 0.0,
        "no_answer_frac": float(np.mean([r["extracted_answer"] is None for r in sampled])) if sampled else 0.0,
        "grading_timeouts": statuses.get("timeout", 0), "grading_errors": statuses.get("error", 0),
        "time_generate_s": timing["generate"], "time_grade_s": timing["grade"], "time_prm_s": timing["prm"],
        "time_total_s": time.perf_counter() - t0,
    })
    return metrics


def _chunk_records(name: str, problems: Sequence, ids: Sequence[Sequence[int]], chunk: int, *, tokenizer, pool,
                   n: int, generate, prm_scorer, extract, timing: collections.Counter, observe=None
                   ) -> list[list[dict]]:
    """Generates, grades (and PRM-scores) one chunk of prompts; the records of each problem."""
    extract = extract or extract_answer
    t = time.perf_counter()
    gen = generate([list(x) for x in ids], chunk)
    timing["generate"] += time.perf_counter() - t
    if len(gen.texts) != len(problems) * n:
        raise ValueError(f"{name}: generation returned {len(gen.texts)} rows for {len(problems)} prompts x n={n}")
    t = time.perf_counter()
    graded = pool.grade([(gen.texts[i * n + s], p.ground_truth, p.ability) for i, p in enumerate(problems)
                         for s in range(n)])
    timing["grade"] += time.perf_counter() - t
    rewards = None
    if prm_scorer is not None and n > 1:
        t = time.perf_counter()
        rewards = prm_scorer([ids[r // n] for r in range(len(gen.texts))], gen.response_ids)
        timing["prm"] += time.perf_counter() - t
    prompt_texts = tokenizer.batch_decode([list(x) for x in ids], skip_special_tokens=False)
    out = []
    for i, p in enumerate(problems):
        rows = range(i * n, (i + 1) * n)
        scores = [float(graded[r]) for r in rows]
        answers = [extract(gen.texts[r]) if p.ability == "math" else None for r in rows]
        keys = [answer_key(a) for a in answers] if p.ability == "math" else None
        problem_rewards = [float(rewards[r]) for r in rows] if rewards is not None else None
        majority = majority_index(keys) if keys is not None and n > 1 else None
        best = int(np.argmax(problem_rewards)) if problem_rewards is not None else None
        recs = []
        for s, r in enumerate(rows):
            rec = {
                "benchmark": name, "problem_id": p.id, "sample": s,
                "prompt": prompt_texts[i], "response": gen.texts[r], "extracted_answer": answers[s],
                "ground_truth": p.ground_truth, "score": scores[s], "correct": scores[s] >= CORRECT_THRESHOLD,
                "grading_status": graded.statuses[r], "num_tokens": len(gen.response_ids[r]),
                "finished": bool(gen.finished[r]),
            }
            if n > 1 and keys is not None:
                rec["majority"] = majority is not None and keys[s] is not None and keys[s] == keys[majority]
            if problem_rewards is not None:
                rec["prm_reward"] = problem_rewards[s]
                rec["prm_best"] = s == best
                if prm_scorer.beta is not None:
                    rec["prm_p_correct"] = prm_p_correct(problem_rewards[s], prm_scorer.beta)
            recs.append(rec)
        out.append(recs)
    if observe is not None:
        observe(problems, ids, gen, out)
    return out


def sampler_generate_fn(sampler, model, tokenizer, settings: EvalSettings, *, stop_token_ids, key):
    """`generate(prompt_ids, chunk=0) -> Generation` for `evaluate_benchmark`, through
    `generate_responses`; chunk k > 0 samples with `fold_in(key, k)`, so a resumed evaluation
    draws what an uninterrupted one would."""
    def generate(prompt_ids, chunk: int = 0):
        chunk_key = key if chunk == 0 else jax.random.fold_in(key, 1_000_003 + chunk)
        return generate_responses(sampler, model, tokenizer, prompt_ids, settings, stop_token_ids=stop_token_ids,
                                  key=chunk_key)
    return generate
