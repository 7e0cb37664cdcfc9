"""Benchmark evaluation as a library: generate, grade, aggregate, write (used by `prime_jax.evaluate`).

One evaluation of one benchmark, as data moving through this module::

    problems ──render_prompts──▶ prompt ids ──generate_responses (Sampler)──▶ Generation
        ──RewardPool.score──▶ scores ──problem_metrics / aggregate──▶ metrics
        (optional) ──PRMScorer: Σ_t (log π_prm − log π_ref)──▶ best-of-n

Metrics, per benchmark, over its problems (a problem's ``n`` samples are rows ``[i·n, (i+1)·n)``):

* ``pass@k`` for k in 1, 2, 4, …, n: the unbiased estimator of Chen et al. (2021),
  ``1 − C(n−c, k) / C(n, k)`` with ``c`` the number of correct samples (score ≥ 1; math scores
  are 0/1, a code score is the fraction of tests passed, "correct" means all passed). With greedy
  decoding (n = 1) ``pass@1`` is the mean score on math.
* ``avg@n``: the mean score over all samples (the sampled pass@1 for 0/1 scores).
* ``maj@k`` (n > 1, k ≥ 2 of the same list): majority vote over the first k samples' extracted
  answers, equal when their normalised strings (``rewards.math.normalize_answer``) are equal;
  ties go to the answer seen first; the majority answer's grade counts (samples without an
  answer do not vote; none at all scores 0).
* ``best@n`` (with a PRM): the grade of the sample with the largest implicit process reward
  ``Σ_t (log π_prm(y_t) − log π_ref(y_t))`` (PRIME's PRM used as a best-of-n reranker).

Problems whose prompt is longer than the prompt limit are not generated for; they count as
wrong (score 0) in every metric, so scores stay comparable with published numbers, and are
reported as ``num_dropped``.

Host-side helpers (metrics, files) need no jax; the generation and PRM pieces import it lazily.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

#: A sample counts as correct for pass@k when its score is at least this (math: 1.0 / 0.0).
CORRECT_THRESHOLD = 1.0 - 1e-6

#: Published greedy pass@1 (%) from PRIME_SPEC.md (Cui et al., 2025), by model and benchmark.
PUBLISHED: dict[str, dict[str, float]] = {
    "Eurus-2-7B-SFT (start, step 0)": {"aime24": 3.3, "amc23": 30.1, "math500": 66.2, "minerva_math": 32.7,
                                       "olympiadbench": 29.8, "leetcode": 21.7, "livecodebench": 17.8},
    "RLOO, outcome verifier only, 240 steps": {"aime24": 20.0, "amc23": 47.0, "math500": 73.2,
                                               "minerva_math": 36.4, "olympiadbench": 35.4, "leetcode": 28.3,
                                               "livecodebench": 26.7},
    "PRIME, 240 steps": {"aime24": 20.0, "amc23": 50.6, "math500": 78.2, "minerva_math": 39.3,
                         "olympiadbench": 40.3, "leetcode": 31.1, "livecodebench": 27.5},
    "Eurus-2-7B-PRIME, 592 steps": {"aime24": 26.7, "amc23": 57.8, "math500": 79.2, "minerva_math": 38.6,
                                    "olympiadbench": 42.1, "leetcode": 33.3, "livecodebench": 28.6},
    "Qwen2.5-Math-7B-Instruct": {"aime24": 13.3, "amc23": 50.6, "math500": 79.8, "minerva_math": 34.6,
                                 "olympiadbench": 40.7, "leetcode": 11.7, "livecodebench": 11.3},
}
#: Column titles of the published table, in its order.
PUBLISHED_COLUMNS: dict[str, str] = {
    "aime24": "AIME24", "amc23": "AMC", "math500": "MATH-500", "minerva_math": "Minerva",
    "olympiadbench": "OlympiadBench", "leetcode": "LeetCode", "livecodebench": "LiveCodeBench",
}
#: PRIME's five math benchmarks (the "math average" of the paper's README).
MATH_FIVE = ("aime24", "amc23", "math500", "minerva_math", "olympiadbench")


# ----------------------------------------------------------------------------------------------
# Settings and results
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EvalSettings:
    """How to sample. temperature 0 is greedy (then n should be 1)."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    max_prompt_tokens: int | None = 1024
    batch_size: int = 256  # prompts per generate call (each gives n rows)
    seed: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Generation:
    """What a generation function returns for P prompts × n samples (prompt-major rows).

    texts: the decoded responses (stop token removed, special tokens skipped) - what graders read.
    response_ids: each row's response tokens (stop token included), for PRM scoring.
    finished: whether each row ended with a stop token (False: cut at the length limit).
    """

    texts: list[str]
    response_ids: list[list[int]]
    finished: list[bool]

    def __post_init__(self):
        if not (len(self.texts) == len(self.response_ids) == len(self.finished)):
            raise ValueError(f"Generation: {len(self.texts)} texts, {len(self.response_ids)} response_ids, "
                             f"{len(self.finished)} finished")


@dataclasses.dataclass
class BenchmarkResult:
    name: str
    metrics: dict[str, Any]
    records: list[dict]


# ----------------------------------------------------------------------------------------------
# Metrics (pure host maths)
# ----------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): P(at least one of k draws without replacement from n
    samples, c of them correct, is correct) = 1 − C(n−c, k)/C(n, k), computed stably."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def k_values(n: int) -> list[int]:
    """1, 2, 4, ... below n, and n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return ks


def answer_key(answer: str | None) -> str | None:
    """The string under which majority voting groups an extracted answer (None: no vote)."""
    if answer is None:
        return None
    from prime_jax.rewards.math import normalize_answer

    try:
        key = normalize_answer(answer)
    except Exception:  # noqa: BLE001 - a pathological answer votes as its raw text
        key = answer.strip()
    return key or None


def majority_index(keys: Sequence[str | None]) -> int | None:
    """Index of the first sample holding the most common (non-None) key; ties: first seen."""
    counts = collections.Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    for i, k in enumerate(keys):
        if k is not None and counts[k] == best:
            return i
    return None  # unreachable


def problem_metrics(scores: Sequence[float], keys: Sequence[str | None] | None = None,
                    prm_rewards: Sequence[float] | None = None) -> dict[str, float]:
    """Metrics of one problem's n samples (see the module docstring). ``keys``: the samples'
    normalised answers (``answer_key``; None where none was extracted) for maj@k."""
    scores = [float(s) for s in scores]
    n = len(scores)
    if n == 0:
        raise ValueError("problem_metrics: no samples")
    c = sum(s >= CORRECT_THRESHOLD for s in scores)
    out = {f"pass@{k}": pass_at_k(n, c, k) for k in k_values(n)}
    out[f"avg@{n}"] = float(np.mean(scores))
    if n > 1 and keys is not None:
        for k in k_values(n):
            if k < 2:
                continue
            i = majority_index(keys[:k])
            out[f"maj@{k}"] = scores[i] if i is not None else 0.0
    if prm_rewards is not None and n > 1:
        out[f"best@{n}"] = scores[int(np.argmax(np.asarray(prm_rewards, np.float64)))]
    return out


def aggregate(per_problem: Sequence[Mapping[str, float]], num_dropped: int = 0) -> dict[str, float]:
    """Mean of every per-problem metric over problems; dropped problems count as 0."""
    names: list[str] = []
    for m in per_problem:
        names += [k for k in m if k not in names]
    total = len(per_problem) + num_dropped
    return {k: (float(sum(m.get(k, 0.0) for m in per_problem)) / total if total else 0.0) for k in names}


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

    The evaluation CLI looks this function up at call time, so tests can replace it.
    """
    import jax

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
# Implicit PRM as a best-of-n reranker
# ----------------------------------------------------------------------------------------------
def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


class PRMScorer:
    """Summed implicit process reward of responses: ``Σ_t (log π_prm − log π_ref)(y_t | x, y_<t)``
    (``algo.implicit_token_rewards`` summed over the response, EOS included).

    prm_model / ref_model: `Qwen2ForCausalLM`s (same tokenizer); ref_model None scores
    ``Σ_t log π_prm`` alone. Log-probs use ``temperature``; 1.0 (the raw logits) is how the trainer
    scores the PRM and its reference. Rows are scored ``batch_size`` at a time,
    padded to power-of-two buckets (few compilations) and, with a mesh, split over its data axes.
    """

    def __init__(self, prm_model, ref_model, *, mesh=None, temperature: float = 1.0, chunk_size: int = 128,
                 batch_size: int = 64):
        import jax
        from flax import nnx

        from prime_jax import algo
        from prime_jax.models import response_logprobs

        self.mesh = mesh
        self.batch_size = int(batch_size)
        prm_graphdef, self.prm_state = nnx.split(prm_model)
        ref_graphdef, self.ref_state = nnx.split(ref_model) if ref_model is not None else (None, None)

        def q_sums(prm_state, ref_state, batch):
            args = (batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], batch["response_mask"])
            lp_prm = response_logprobs(nnx.merge(prm_graphdef, prm_state), *args, temperature=temperature,
                                       chunk_size=chunk_size)
            lp_ref = 0.0 if ref_state is None else response_logprobs(
                nnx.merge(ref_graphdef, ref_state), *args, temperature=temperature, chunk_size=chunk_size)
            q = algo.implicit_token_rewards(lp_prm, lp_ref, batch["response_mask"])
            return q.sum(axis=-1)

        self._rows_multiple = 1
        if mesh is None:
            self._q_sums = jax.jit(q_sums)
        else:  # the [B] sums come back replicated (readable on every host)
            from prime_jax.parallel import replicated

            self._q_sums = jax.jit(q_sums, out_shardings=replicated(mesh))
            from prime_jax.parallel import logical_to_spec

            spec = logical_to_spec(("batch",), mesh)[0]
            axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
            self._rows_multiple = math.prod(mesh.shape[a] for a in axes)

    def __call__(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """`[B]` float32 summed q of each (prompt, response) pair (responses need >= 1 token)."""
        from prime_jax.parallel import to_host
        from prime_jax.sampling import PAD_ID

        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        out = np.zeros(len(prompt_ids), np.float32)
        order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), len(response_ids[i])))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            rows = _next_pow2(len(idx))
            rows = -(-rows // self._rows_multiple) * self._rows_multiple
            P = max(16, _next_pow2(max(len(prompt_ids[i]) for i in idx)))
            R = max(8, _next_pow2(max(max(len(response_ids[i]), 1) for i in idx)))
            batch = {"prompt_ids": np.full((rows, P), PAD_ID, np.int32), "prompt_mask": np.zeros((rows, P), np.int32),
                     "response_ids": np.full((rows, R), PAD_ID, np.int32),
                     "response_mask": np.zeros((rows, R), np.int32)}
            for j, i in enumerate(idx):
                p, r = list(prompt_ids[i]), list(response_ids[i])
                batch["prompt_ids"][j, P - len(p):] = p
                batch["prompt_mask"][j, P - len(p):] = 1
                batch["response_ids"][j, :len(r)] = r
                batch["response_mask"][j, :len(r)] = 1
            for j in range(len(idx), rows):  # padding rows: one dummy token, ignored
                batch["prompt_mask"][j, -1] = 1
                batch["response_mask"][j, 0] = 1
            if self.mesh is not None:
                from prime_jax.parallel import put_rows

                batch = put_rows(batch, self.mesh)
            sums = to_host(self._q_sums(self.prm_state, self.ref_state, batch))
            out[idx] = sums[:len(idx)]
        return out


# ----------------------------------------------------------------------------------------------
# One benchmark
# ----------------------------------------------------------------------------------------------
def benchmark_key(key, name: str):
    """The PRNG key of a benchmark: stable across runs and benchmark orders."""
    import jax

    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def evaluate_benchmark(name: str, problems: Sequence, *, tokenizer, pool, settings: EvalSettings,
                       generate: Callable[[list[list[int]], int], Generation], prm_scorer: PRMScorer | None = None,
                       extract: Callable[[str], str | None] | None = None, progress=None) -> BenchmarkResult:
    """Generate for, grade and score the problems of one benchmark, `settings.batch_size` prompts
    at a time.

    generate(prompt_ids, chunk) -> Generation with len(prompt_ids) × settings.n rows (prompt-major);
    `chunk` numbers the calls (0, 1, ...), for their PRNG keys.
    pool: a `RewardPool` (``.score([(response, ground_truth, ability), ...])``).
    progress: a `prime_jax.eval_progress.ProgressFile`: each finished chunk's records are written
    to it at once, and chunks it already holds are not generated again (resume).
    """
    from prime_jax.data import render_prompts

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
                                  extract=extract, timing=timing)
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
    sampled = [r for r in records if r["sample"] is not None]
    per_problem = [problem_metrics([r["score"] for r in recs],
                                   [answer_key(r["extracted_answer"]) for r in recs] if p.ability == "math" else None,
                                   [r["prm_reward"] for r in recs] if "prm_reward" in recs[0] else None)
                   for p in kept for recs in [records_by_problem[id(p)]]]

    metrics: dict[str, Any] = aggregate(per_problem, len(dropped))
    if not per_problem:
        metrics.update({k: 0.0 for k in (f"pass@{k}" for k in k_values(n))})
    statuses = collections.Counter(r["grading_status"] for r in sampled)
    metrics.update({
        "num_problems": len(problems), "num_dropped": len(dropped), "n": n,
        "response_length": float(np.mean([r["num_tokens"] for r in sampled])) if sampled else 0.0,
        "truncated_frac": float(1.0 - np.mean([r["finished"] for r in sampled])) if sampled else 0.0,
        "no_answer_frac": float(np.mean([r["extracted_answer"] is None for r in sampled])) if sampled else 0.0,
        "grading_timeouts": statuses.get("timeout", 0), "grading_errors": statuses.get("error", 0),
        "time_generate_s": timing["generate"], "time_grade_s": timing["grade"], "time_prm_s": timing["prm"],
        "time_total_s": time.perf_counter() - t0,
    })
    logger.info("%s: pass@1 %.4f over %d problems (n=%d) in %.1fs", name, metrics["pass@1"], len(problems), n,
                metrics["time_total_s"])
    return BenchmarkResult(name=name, metrics=metrics, records=records)


def _chunk_records(name: str, problems: Sequence, ids: Sequence[Sequence[int]], chunk: int, *, tokenizer, pool,
                   n: int, generate, prm_scorer, extract, timing: collections.Counter) -> list[list[dict]]:
    """Generates, grades (and PRM-scores) one chunk of prompts; the records of each problem."""
    from prime_jax.rewards.math import extract_answer

    extract = extract or extract_answer
    t = time.perf_counter()
    gen = generate([list(x) for x in ids], chunk)
    timing["generate"] += time.perf_counter() - t
    if len(gen.texts) != len(problems) * n:
        raise ValueError(f"{name}: generation returned {len(gen.texts)} rows for {len(problems)} prompts x n={n}")
    t = time.perf_counter()
    graded = pool.score([(gen.texts[i * n + s], p.ground_truth, p.ability) for i, p in enumerate(problems)
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
            recs.append(rec)
        out.append(recs)
    return out


def sampler_generate_fn(sampler, model, tokenizer, settings: EvalSettings, *, stop_token_ids, key):
    """`generate(prompt_ids, chunk=0) -> Generation` for `evaluate_benchmark`, through
    `generate_responses` (looked up at call time, so it can be replaced in tests); chunk k > 0
    samples with `fold_in(key, k)`, so a resumed evaluation draws what an uninterrupted one would."""
    def generate(prompt_ids, chunk: int = 0):
        import jax

        chunk_key = key if chunk == 0 else jax.random.fold_in(key, 1_000_003 + chunk)
        return globals()["generate_responses"](sampler, model, tokenizer, prompt_ids, settings,
                                               stop_token_ids=stop_token_ids, key=chunk_key)
    return generate


# ----------------------------------------------------------------------------------------------
# Output files
# ----------------------------------------------------------------------------------------------
def headline_metric(n: int) -> str:
    return "pass@1" if n == 1 else f"avg@{n}"


def all_dropped(metrics: Mapping[str, Any]) -> bool:
    """Every problem was dropped (prompt too long): there is no score, only a count."""
    return bool(metrics.get("num_problems")) and metrics.get("num_dropped") == metrics["num_problems"]


def headline(name: str, metrics: Mapping[str, Any], settings: EvalSettings, *, max_prompt_tokens: int) -> str:
    """The one line the CLI prints for a benchmark."""
    if all_dropped(metrics):
        return (f"{name}: all {metrics['num_problems']} problems dropped (prompts longer than "
                f"data.max_prompt_tokens={max_prompt_tokens}); no score")
    metric = headline_metric(settings.n)
    dropped = f", {metrics['num_dropped']} dropped as wrong" if metrics.get("num_dropped") else ""
    return (f"{name}: {metric} {100 * metrics[metric]:.1f}% ({metrics['num_problems']} problems{dropped}, "
            f"{metrics['time_total_s']:.1f}s)")


def summarize(results: Mapping[str, BenchmarkResult]) -> dict[str, Any]:
    """Averages over benchmarks of every metric all of them report, and PRIME's five-benchmark
    math average of pass@1 (%) when all five are present."""
    out: dict[str, Any] = {}
    if not results:
        return out
    metric_sets = [set(r.metrics) for r in results.values()]
    common = set.intersection(*metric_sets)
    skip = {"num_problems", "num_dropped", "n"}
    for k in sorted(common - skip):
        v = next(iter(results.values())).metrics[k]
        if not k.startswith("time_") and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(np.mean([r.metrics[k] for r in results.values()]))
    if all(b in results for b in MATH_FIVE):
        out["math5_pass@1_percent"] = float(np.mean([100 * results[b].metrics["pass@1"] for b in MATH_FIVE]))
    return out


def _fmt(x: Any, percent: bool = True) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return str(x)
    return f"{100 * x:.1f}" if percent else f"{x:.1f}"


def scores_markdown(results: Mapping[str, BenchmarkResult], settings: EvalSettings, *, title: str = "",
                    info: Mapping[str, Any] | None = None, prm: bool = False) -> str:
    """The scores as markdown: our metrics per benchmark, then the published table for comparison."""
    n = settings.n
    ks = k_values(n)
    cols = [f"pass@{k}" for k in ks]
    if n > 1:
        cols += [f"avg@{n}"] + [f"maj@{k}" for k in ks if k >= 2]
        if prm:
            cols.append(f"best@{n}")
    lines = [f"# {title or 'Evaluation'}", ""]
    decoding = "greedy" if settings.temperature == 0 else (
        f"temperature {settings.temperature}, top_p {settings.top_p}, top_k {settings.top_k}")
    lines.append(f"Decoding: {decoding}; n = {n} sample(s) per problem; max {settings.max_new_tokens} new tokens.")
    for k, v in (info or {}).items():
        lines.append(f"{k}: {v}")
    lines += ["", "Scores in %. Dropped problems (prompt too long) count as wrong.", ""]
    header = ["benchmark", "problems", *cols, "mean length", "truncated %", "no answer %"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for name, r in results.items():
        m = r.metrics
        problems = f"{m['num_problems']}" + (f" ({m['num_dropped']} dropped)" if m.get("num_dropped") else "")
        scores = (["all dropped"] * len(cols) if all_dropped(m) else [_fmt(m.get(c, float("nan"))) for c in cols])
        row = [name, problems, *scores,
               _fmt(m["response_length"], percent=False), _fmt(m["truncated_frac"]), _fmt(m["no_answer_frac"])]
        lines.append("| " + " | ".join(row) + " |")

    compare = [b for b in PUBLISHED_COLUMNS if b in results]
    if compare:
        metric = headline_metric(n)
        lines += ["", f"## Published results (greedy pass@1, %; PRIME_SPEC.md) beside this run ({metric})", ""]
        head = ["model", *[PUBLISHED_COLUMNS[b] for b in compare]]
        five = all(b in results for b in MATH_FIVE)
        if five:
            head.append("math avg (5)")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        ours = ["all dropped" if all_dropped(results[b].metrics) else _fmt(results[b].metrics[metric]) for b in compare]
        if five:
            ours.append(f"{np.mean([100 * results[b].metrics[metric] for b in MATH_FIVE]):.1f}")
        lines.append("| **this run** | " + " | ".join(ours) + " |")
        for model, scores in PUBLISHED.items():
            row = [f"{scores[b]:.1f}" for b in compare]
            if five:
                row.append(f"{np.mean([scores[b] for b in MATH_FIVE]):.1f}")
            lines.append(f"| {model} | " + " | ".join(row) + " |")
        limited = [b for b in compare if results[b].metrics.get("limited")]
        if limited:
            lines += ["", f"Note: only a subset of problems was evaluated for {', '.join(limited)} (--limit); "
                          "not comparable with the published numbers."]
    return "\n".join(lines) + "\n"


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def write_results(out_dir: str | os.PathLike, results: Mapping[str, BenchmarkResult], settings: EvalSettings, *,
                  info: Mapping[str, Any] | None = None, title: str = "", prm: bool = False) -> dict[str, Path]:
    """Writes ``<benchmark>.jsonl`` (one record per sample), ``scores.json`` and ``scores.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, r in results.items():
        path = out / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in r.records:
                f.write(json.dumps(rec, ensure_ascii=False, default=_json_default) + "\n")
        os.replace(tmp, path)
        paths[name] = path
    scores = {
        "settings": settings.as_dict(),
        "info": dict(info or {}),
        "benchmarks": {name: r.metrics for name, r in results.items()},
        "average": summarize(results),
        "published": {m: {b: v for b, v in s.items() if b in results} for m, s in PUBLISHED.items()},
    }
    paths["scores.json"] = out / "scores.json"
    paths["scores.json"].write_text(json.dumps(scores, indent=2, default=_json_default) + "\n")
    paths["scores.md"] = out / "scores.md"
    paths["scores.md"].write_text(scores_markdown(results, settings, title=title, info=info, prm=prm))
    return paths
