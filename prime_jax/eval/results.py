"""What an evaluation is and its numbers: its settings (`EvalSettings`), results, and the metrics of a
benchmark (the evaluator that produces them: `prime_jax.eval.lib`; output files: `prime_jax.eval.report`).

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

Host-side only: no jax (the generation and PRM pieces live in `eval.lib` and `eval.prm_scorer`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np

from prime_jax.rewards import CORRECT_THRESHOLD
from prime_jax.rewards.math import normalize_answer

logger = logging.getLogger(__name__)


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
