"""Code outcome verifier: run the response's last ```python block on stdin/stdout test cases.

Ground truth is a JSON string (or dict) ``{"inputs": [...], "outputs": [...]}``.  Each of the
first ``max_tests`` (10) cases runs in a fresh sandbox (:mod:`prime_jax.rewards.sandbox`) with the
input on stdin; it passes when the program exits 0 and its stdout equals the expected output after
stripping trailing whitespace of every line (and trailing blank lines).  The score is 1.0 when all
of them pass, else the fraction passed.  No code block, malformed tests or a sandbox failure score
0.0 (the reason is logged and returned in :class:`CodeResult`).  No jax, no model code here.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from typing import Any, Sequence

from prime_jax.rewards.pool import BatchResult, GradingPool, Task
from prime_jax.rewards.sandbox import get_sandbox

logger = logging.getLogger(__name__)

__all__ = ["extract_code", "parse_tests", "CodeResult", "grade", "grade_detailed", "CodeGrader",
           "grade_batch", "MAX_CODE_CHARS"]

MAX_CODE_CHARS = 200_000  # responses are clipped to their last 200k characters
MAX_TESTS = 10
_BLOCK_RE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclasses.dataclass
class CodeResult:
    score: float
    passed: int = 0
    total: int = 0
    statuses: list = dataclasses.field(default_factory=list)  # per test: pass/fail/timeout/...
    reason: str = ""  # why the score is 0 without running (no code, bad tests, sandbox error)
    sandbox_error: bool = False

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def extract_code(response: str) -> str | None:
    """The last complete ```python (or ```py / ```python3) block, or None."""
    if not isinstance(response, str) or not response:
        return None
    text = response[-MAX_CODE_CHARS:].replace("\x00", "")
    last = None
    for last in _BLOCK_RE.finditer(text):
        pass
    if last is None:
        return None
    code = last.group(1)
    return code if code.strip() else None


def _as_text(x: Any) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, (list, tuple)) and all(isinstance(e, str) for e in x):
        return "\n".join(x)
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return str(x)
    raise ValueError(f"test value of type {type(x).__name__} is not stdin/stdout text")


def parse_tests(tests_json: str | bytes | dict) -> tuple[list[str], list[str]]:
    """``(inputs, outputs)`` of a stdin/stdout test spec; raises ValueError with the reason."""
    spec = tests_json
    if isinstance(spec, (bytes, bytearray)):
        spec = spec.decode("utf-8", "replace")
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"tests are not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"tests must be a JSON object, got {type(spec).__name__}")
    if spec.get("fn_name"):
        raise ValueError("call-based tests (fn_name) are not supported; stdin/stdout only")
    inputs, outputs = spec.get("inputs"), spec.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise ValueError("tests need list fields 'inputs' and 'outputs'")
    if len(inputs) != len(outputs):
        raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
    if not inputs:
        raise ValueError("no test cases")
    return [_as_text(x) for x in inputs], [_as_text(x) for x in outputs]


def _normalize_output(s: str) -> list[str]:
    return [line.rstrip() for line in s.rstrip().splitlines()]


def grade_detailed(response: str, tests_json: str | dict, timeout: float = 5.0, *,
                   memory_mb: int = 1024, max_tests: int = MAX_TESTS,
                   total_timeout: float | None = None,
                   sandbox_options: dict | None = None) -> CodeResult:
    """Run the response's program on the first ``max_tests`` cases; see the module docstring.

    ``timeout`` is the wall-clock limit per test case; ``total_timeout`` (default
    ``(timeout + 1) * number of cases``) bounds the whole grading: cases not started by then
    fail (status ``not_run``).  ``sandbox_options`` go to
    :class:`~prime_jax.rewards.sandbox.Sandbox` (e.g. ``{"use_pidns": False}``)."""
    code = extract_code(response)
    if code is None:
        return CodeResult(0.0, reason="no ```python block in the response")
    try:
        inputs, outputs = parse_tests(tests_json)
    except ValueError as e:
        logger.warning("code grading: malformed tests (%s): score 0", e)
        return CodeResult(0.0, reason=f"malformed tests: {e}")
    inputs, outputs = inputs[:max_tests], outputs[:max_tests]
    total = len(inputs)
    # default whole-response budget: every case's limit plus ~1 s of sandbox start-up per case
    budget = total_timeout if total_timeout is not None else (timeout + 1.0) * total
    deadline = time.monotonic() + budget
    sandbox = get_sandbox(memory_mb=memory_mb, **(sandbox_options or {}))
    statuses: list[str] = []
    passed = 0
    for stdin, expected in zip(inputs, outputs):
        left = deadline - time.monotonic()
        if left <= 0:
            statuses.append("not_run")
            continue
        r = sandbox.run(code, stdin, min(timeout, left))
        if r.status == "sandbox_error":
            logger.error("code grading: sandbox error: %s", r.detail)
            return CodeResult(0.0, passed, total, statuses + ["sandbox_error"],
                              reason=f"sandbox error: {r.detail}", sandbox_error=True)
        if r.status == "ok":
            got = r.stdout.decode("utf-8", "replace")
            ok = _normalize_output(got) == _normalize_output(expected)
            statuses.append("pass" if ok else "wrong_answer")
            passed += ok
        else:
            statuses.append(r.status)
    score = 1.0 if passed == total else passed / total
    return CodeResult(score, passed, total, statuses)


def grade(response: str, tests_json: str | dict, timeout: float = 5.0, **kwargs) -> float:
    """Score in [0, 1] of the response's last ```python block on the tests (see module doc)."""
    return grade_detailed(response, tests_json, timeout, **kwargs).score


class _SandboxFailure(Exception):
    pass


def _grade_in_worker(response: str, tests_json, timeout: float, memory_mb: int, max_tests: int,
                     total_timeout: float | None, sandbox_options: dict | None = None):
    res = grade_detailed(response, tests_json, timeout, memory_mb=memory_mb, max_tests=max_tests,
                         total_timeout=total_timeout, sandbox_options=sandbox_options)
    if res.sandbox_error:
        raise _SandboxFailure(res.reason)  # counted as a grading error, not a wrong program
    return res.score, {"passed": res.passed, "total": res.total, "statuses": res.statuses,
                       "reason": res.reason}


def code_tasks(responses: Sequence[str], tests: Sequence, timeout: float = 5.0, *,
               memory_mb: int = 1024, max_tests: int = MAX_TESTS,
               total_timeout: float | None = None, sandbox_options: dict | None = None) -> list[Task]:
    if len(responses) != len(tests):
        raise ValueError(f"{len(responses)} responses but {len(tests)} test specs")
    total = total_timeout if total_timeout is not None else (timeout + 1.0) * max_tests
    # budget for the pool's hard kill: the tests' own limits plus sandbox start-up per test
    budget = total + 2.0 * max_tests + 10.0
    out = []
    for r, t in zip(responses, tests):
        r = r[-MAX_CODE_CHARS:] if isinstance(r, str) else ""
        out.append(Task("prime_jax.rewards.code:_grade_in_worker",
                        (r, t, float(timeout), int(memory_mb), int(max_tests), total,
                         dict(sandbox_options or {})),
                        budget=budget, soft=False))
    return out


class CodeGrader(GradingPool):
    """Pool of grading processes for code (each runs sandboxes); see :class:`MathGrader`."""

    def __init__(self, num_workers: int | None = None, timeout: float = 5.0, *,
                 memory_mb: int = 1024, max_tests: int = MAX_TESTS,
                 total_timeout: float | None = None, sandbox_options: dict | None = None,
                 **kwargs):
        super().__init__(num_workers, **kwargs)
        self.timeout, self.memory_mb, self.max_tests, self.total_timeout = (
            float(timeout), memory_mb, max_tests, total_timeout)
        self.sandbox_options = dict(sandbox_options or {})

    def grade_batch(self, responses: Sequence[str], tests: Sequence) -> BatchResult:
        return self.run(code_tasks(responses, tests, self.timeout, memory_mb=self.memory_mb,
                                   max_tests=self.max_tests, total_timeout=self.total_timeout,
                                   sandbox_options=self.sandbox_options))


def grade_batch(responses: Sequence[str], tests: Sequence, timeout: float = 5.0,
                num_workers: int | None = None, **kwargs) -> BatchResult:
    """Grade a batch of code responses in a temporary pool (see :class:`CodeGrader`)."""
    with CodeGrader(num_workers=num_workers, timeout=timeout, **kwargs) as grader:
        return grader.grade_batch(responses, tests)
