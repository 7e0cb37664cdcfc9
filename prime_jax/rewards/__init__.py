"""Outcome verifiers (rule-based rewards) for math and code, and the pool that runs them.

* :func:`grade_response` - one response, in this process (no time limit; for tools and tests).
* :class:`RewardPool` - what the trainer uses: a process pool kept across steps that grades a
  batch of ``(response, ground_truth, ability)`` with a time budget per item and returns the
  scores with counts of timeouts and errors.  Grading never runs in the trainer's process.

No jax and no model code is imported here (see docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from typing import Sequence

from prime_jax.rewards import code as code_reward
from prime_jax.rewards import math as math_reward
from prime_jax.rewards.pool import BatchResult, GradingPool, GradingStats, Task
from prime_jax.rewards.sandbox import SandboxCapabilities, capabilities as sandbox_capabilities

__all__ = ["grade_response", "RewardPool", "BatchResult", "GradingPool", "GradingStats", "Task",
           "SandboxCapabilities", "sandbox_capabilities", "math_reward", "code_reward",
           "ABILITIES", "CORRECT_THRESHOLD"]

ABILITIES = ("math", "code")
#: A score counts as correct from this on (math grades 1.0 / 0.0; a code score is the fraction of tests
#: passed, so "correct" means all passed): pass@k in evaluation, the PRM's right/wrong rows in training.
CORRECT_THRESHOLD = 1.0 - 1e-6


def _ability(ability: str) -> str:
    a = (ability or "").strip().lower()
    if a in ("math", "mathematics"):
        return "math"
    if a in ("code", "coding", "program", "programming"):
        return "code"
    raise ValueError(f"unknown ability {ability!r}; expected one of {ABILITIES}")


def grade_response(response: str, ground_truth: str, ability: str, **kwargs) -> float:
    """Score one response: math -> 0/1 equivalence, code -> fraction of tests passed.

    Runs in the calling process (code still runs sandboxed in a subprocess); trainers should use
    :class:`RewardPool`."""
    if _ability(ability) == "math":
        return math_reward.grade(response, ground_truth)
    return code_reward.grade(response, ground_truth, **kwargs)


class RewardPool(GradingPool):
    """Process pool that grades mixed math/code batches for the trainer.

    >>> with RewardPool(num_workers=8) as pool:
    ...     res = pool.grade([(resp, gt, "math"), (resp2, tests_json, "code")])
    ...     res.scores, res.statuses, res.timeouts, res.errors   # per batch
    ...     pool.stats                                           # cumulative GradingStats

    ``math_timeout`` is the budget per math answer; code gets ``code_timeout`` per test case and
    at most ``code_total_timeout`` (default 10 x ``code_timeout``) per response."""

    def __init__(self, num_workers: int | None = None, *, math_timeout: float = 5.0,
                 code_timeout: float = 5.0, code_total_timeout: float | None = None,
                 code_memory_mb: int = 1024, code_max_tests: int = code_reward.MAX_TESTS, **kwargs):
        super().__init__(num_workers, **kwargs)
        self.math_timeout = float(math_timeout)
        self.code_timeout = float(code_timeout)
        self.code_total_timeout = code_total_timeout
        self.code_memory_mb = code_memory_mb
        self.code_max_tests = code_max_tests

    def tasks(self, items: Sequence[tuple[str, str, str]]) -> list[Task]:
        out: list[Task] = []
        for response, ground_truth, ability in items:
            if _ability(ability) == "math":
                out += math_reward.math_tasks([response], [ground_truth], self.math_timeout)
            else:
                out += code_reward.code_tasks(
                    [response], [ground_truth], self.code_timeout, memory_mb=self.code_memory_mb,
                    max_tests=self.code_max_tests, total_timeout=self.code_total_timeout)
        return out

    def grade(self, items: Sequence[tuple[str, str, str]]) -> BatchResult:
        """Scores (grades) for ``(response, ground_truth, ability)`` items, in order."""
        return self.run(self.tasks(items))

    def grade_math(self, responses: Sequence[str], ground_truths: Sequence[str]) -> BatchResult:
        return self.grade([(r, g, "math") for r, g in zip(responses, ground_truths, strict=True)])

    def grade_code(self, responses: Sequence[str], tests: Sequence[str]) -> BatchResult:
        return self.grade([(r, t, "code") for r, t in zip(responses, tests, strict=True)])
