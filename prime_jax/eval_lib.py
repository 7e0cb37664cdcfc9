"""Benchmark evaluation as a library: generate, grade, aggregate (used by `prime_jax.evaluate` and the
trainer's held-out eval; output files: `prime_jax.eval_report`).

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
* ``prm_vote@n`` (with a PRM, math): a vote weighted by the PRM: each answer scores the sum of its
  samples' P(correct) = sigmoid(β Σq) (what the PRM's cross-entropy loss fits; β: the PRM run's
  ``algo.beta``, else the config's), and the top answer's grade counts (reward-weighted voting,
  which the implicit-PRM paper's evaluation code also reports; with all weights equal it is
  maj@n).

Problems whose prompt is longer than the prompt limit are not generated for; they count as
wrong (score 0) in every metric, so scores stay comparable with published numbers, and are
reported as ``num_dropped``.

Host-side helpers (metrics, files) need no jax; the generation and PRM pieces import it lazily.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import time
import zlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

#: A sample counts as correct for pass@k when its score is at least this (math: 1.0 / 0.0).
CORRECT_THRESHOLD = 1.0 - 1e-6


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


def settings_from_config(config, *, n: int = 1, temperature: float | None = None, top_p: float | None = None,
                         max_new_tokens: int | None = None, batch_size: int | None = None,
                         seed: int | None = None) -> EvalSettings:
    """EvalSettings of a run config, each overridable: temperature rollout.eval_temperature (with n > 1
    and that 0: rollout.temperature), top_p / top_k rollout's, max_new_tokens rollout.eval_max_new_tokens
    or rollout.max_new_tokens, prompts per call rollout.eval_batch, prompt limit data.max_prompt_tokens."""
    r = config.rollout
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if temperature is None:
        temperature = r.eval_temperature if (n == 1 or r.eval_temperature > 0) else r.temperature
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if temperature == 0 and n > 1:
        logger.warning("greedy decoding with n=%d: every sample of a problem is the same", n)
    settings = EvalSettings(
        n=n, temperature=float(temperature), top_p=float(r.top_p if top_p is None else top_p), top_k=int(r.top_k),
        max_new_tokens=int(max_new_tokens or r.eval_max_new_tokens or r.max_new_tokens),
        max_prompt_tokens=int(config.data.max_prompt_tokens) or None,
        batch_size=int(batch_size or r.eval_batch), seed=int(config.seed if seed is None else seed))
    if settings.max_new_tokens < 1 or settings.batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {settings}")
    return settings


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
    return weighted_vote_index(keys, [1.0] * len(keys))


def weighted_vote_index(keys: Sequence[str | None], weights: Sequence[float]) -> int | None:
    """Index of the first sample holding the answer with the largest summed weight (non-None keys).

    A reward-weighted majority vote: with weights all 1 it is ``majority_index``; with a verifier's
    estimate of P(correct) per sample it weighs how often an answer is sampled by how likely each
    copy is right (reward-weighted voting, as the implicit-PRM paper's evaluation code has it).
    Ties: the first seen."""
    if len(keys) != len(weights):
        raise ValueError(f"weighted_vote_index: {len(keys)} keys but {len(weights)} weights")
    totals: dict[str, float] = {}
    for k, w in zip(keys, weights):
        if k is not None:
            totals[k] = totals.get(k, 0.0) + float(w)
    if not totals:
        return None
    best = max(totals.values())
    return next(i for i, k in enumerate(keys) if k is not None and totals[k] == best)


def prm_p_correct(q_sum: float, beta: float) -> float:
    """The implicit PRM's probability that a response is right, sigmoid(β Σq) (what its ce loss fits)."""
    z = beta * float(q_sum)
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def problem_metrics(scores: Sequence[float], keys: Sequence[str | None] | None = None,
                    prm_rewards: Sequence[float] | None = None,
                    prm_weights: Sequence[float] | None = None) -> dict[str, float]:
    """Metrics of one problem's n samples (see the module docstring). ``keys``: the samples'
    normalised answers (``answer_key``; None where none was extracted) for maj@k; ``prm_rewards``:
    their summed q (best@n); ``prm_weights``: their P(correct) by the PRM (prm_vote@n)."""
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
    if prm_weights is not None and keys is not None and n > 1:
        i = weighted_vote_index(keys, prm_weights)
        out[f"prm_vote@{n}"] = scores[i] if i is not None else 0.0
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
    """Implicit process rewards of responses, ``q_t = (log π_prm − log π_ref)(y_t | x, y_<t)``
    (``algo.implicit_token_rewards``, EOS included): summed per response (``__call__``, best-of-n)
    or per token (``token_rewards``, the training run's HTML page).

    prm_model / ref_model: `Qwen2ForCausalLM`s or their `(graphdef, state)` (same tokenizer);
    ref_model None scores ``log π_prm`` alone. Log-probs use ``temperature``; 1.0 (the raw logits)
    is how the trainer scores the PRM and its reference. Rows are scored ``batch_size`` at a time,
    padded to power-of-two buckets (few compilations) and, with a mesh, split over its data axes.
    The jitted programs are shared by scorers of the same graphs, so a new scorer of new weights
    compiles nothing new. ``beta``: the PRM's training β; with it, evaluation records each sample's
    P(correct) = sigmoid(β Σq) and reports the PRM-weighted vote (prm_vote@n).
    """

    def __init__(self, prm_model, ref_model, *, mesh=None, temperature: float = 1.0, chunk_size: int = 128,
                 batch_size: int = 64, beta: float | None = None):
        from flax import nnx

        from prime_jax.parallel import batch_shards

        split = lambda m: m if isinstance(m, tuple) else nnx.split(m)
        self.mesh = mesh
        self.batch_size = int(batch_size)
        self.beta = None if beta is None else float(beta)  # the PRM's training β: P(correct) = sigmoid(β Σq)
        prm_graphdef, self.prm_state = split(prm_model)
        ref_graphdef, self.ref_state = split(ref_model) if ref_model is not None else (None, None)
        self._programs = _q_programs(prm_graphdef, ref_graphdef, mesh, float(temperature), int(chunk_size))
        self._rows_multiple = 1 if mesh is None else batch_shards(mesh)

    def __call__(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """`[B]` float32 summed q of each (prompt, response) pair (responses need >= 1 token)."""
        out = np.zeros(len(prompt_ids), np.float32)
        for idx, batch in self._batches(prompt_ids, response_ids):
            out[idx] = self._run("sums", batch)[:len(idx)]
        return out

    def token_rewards(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
                      ) -> list[np.ndarray]:
        """Each response's `[len(response)]` float32 q."""
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(prompt_ids)
        for idx, batch in self._batches(prompt_ids, response_ids):
            q = self._run("tokens", batch)
            for j, i in enumerate(idx):
                out[i] = q[j, :len(response_ids[i])]
        return out

    def _run(self, which: str, batch) -> np.ndarray:
        from prime_jax.parallel import put_rows, to_host

        if self.mesh is not None:
            batch = put_rows(batch, self.mesh)
        return to_host(self._programs[which](self.prm_state, self.ref_state, batch))

    def _batches(self, prompt_ids, response_ids):
        """(row indices, padded host batch) of `batch_size` rows at a time, similar lengths together."""
        from prime_jax.sampling import PAD_ID

        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
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
            yield idx, batch


@functools.lru_cache(maxsize=8)
def _q_programs(prm_graphdef, ref_graphdef, mesh, temperature: float, chunk_size: int) -> dict:
    """{"tokens": jit (prm_state, ref_state, batch) -> q [B, R], "sums": -> [B]}, results replicated."""
    import jax
    from flax import nnx

    from prime_jax import algo
    from prime_jax.models import response_logprobs

    def q_tokens(prm_state, ref_state, batch):
        args = (batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], batch["response_mask"])
        lp_prm = response_logprobs(nnx.merge(prm_graphdef, prm_state), *args, temperature=temperature,
                                   chunk_size=chunk_size)
        lp_ref = 0.0 if ref_state is None else response_logprobs(
            nnx.merge(ref_graphdef, ref_state), *args, temperature=temperature, chunk_size=chunk_size)
        return algo.implicit_token_rewards(lp_prm, lp_ref, batch["response_mask"])

    def q_sums(prm_state, ref_state, batch):
        return q_tokens(prm_state, ref_state, batch).sum(axis=-1)

    if mesh is None:
        return {"tokens": jax.jit(q_tokens), "sums": jax.jit(q_sums)}
    from prime_jax.parallel import replicated  # readable on every host

    return {"tokens": jax.jit(q_tokens, out_shardings=replicated(mesh)),
            "sums": jax.jit(q_sums, out_shardings=replicated(mesh))}


# ----------------------------------------------------------------------------------------------
# One benchmark
# ----------------------------------------------------------------------------------------------
class ProcessShareGrader:
    """A grading pool for several processes: each grades its `host_share` of the responses in its
    own `pool` and every process gets all scores and statuses (one process: `pool` itself)."""

    STATUSES = ("ok", "timeout", "error")

    def __init__(self, pool):
        self.pool = pool

    def score(self, items: Sequence[tuple]):
        import jax

        from prime_jax.parallel import gather_shares, host_share
        from prime_jax.rewards.pool import BatchResult

        if jax.process_count() == 1:
            return self.pool.score(items)
        share = host_share(len(items))
        graded = self.pool.score([items[i] for i in share])
        codes = [self.STATUSES.index(s) for s in graded.statuses]
        scores = gather_shares(np.asarray(graded.scores, np.float32), len(items))
        statuses = gather_shares(np.asarray(codes, np.int32), len(items))
        return BatchResult([float(x) for x in scores], [self.STATUSES[int(c)] for c in statuses])


def benchmark_key(key, name: str):
    """The PRNG key of a benchmark: stable across runs and benchmark orders."""
    import jax

    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def evaluate_benchmark(name: str, problems: Sequence, *, tokenizer, pool, settings: EvalSettings,
                       generate: Callable[[list[list[int]], int], Generation], prm_scorer: PRMScorer | None = None,
                       extract: Callable[[str], str | None] | None = None, progress=None,
                       observe: Callable[..., None] | None = None) -> BenchmarkResult:
    """Generate for, grade and score the problems of one benchmark, `settings.batch_size` prompts
    at a time.

    generate(prompt_ids, chunk) -> Generation with len(prompt_ids) × settings.n rows (prompt-major);
    `chunk` numbers the calls (0, 1, ...), for their PRNG keys.
    pool: a `RewardPool` (``.score([(response, ground_truth, ability), ...])``).
    progress: a `prime_jax.eval_progress.ProgressFile`: each finished chunk's records are written
    to it at once, and chunks it already holds are not generated again (resume).
    observe(problems, prompt_ids, generation, records): called with each generated chunk (the
    trainer picks the responses of its HTML page from them).
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
    sampled = [r for r in records if r["sample"] is not None]
    per_problem = [problem_metrics([r["score"] for r in recs],
                                   [answer_key(r["extracted_answer"]) for r in recs] if p.ability == "math" else None,
                                   [r["prm_reward"] for r in recs] if "prm_reward" in recs[0] else None,
                                   [r["prm_p_correct"] for r in recs] if "prm_p_correct" in recs[0] else None)
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
                   n: int, generate, prm_scorer, extract, timing: collections.Counter, observe=None
                   ) -> list[list[dict]]:
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
        import jax

        chunk_key = key if chunk == 0 else jax.random.fold_in(key, 1_000_003 + chunk)
        return generate_responses(sampler, model, tokenizer, prompt_ids, settings, stop_token_ids=stop_token_ids,
                                  key=chunk_key)
    return generate
