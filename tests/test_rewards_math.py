"""Math verifier: extraction, equivalence table, MATH-500 / GSM8K agreement, adversarial inputs,
and the grading pool (timeouts and crashes are counted, the caller never hangs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prime_jax.rewards import RewardPool, grade_response
from prime_jax.rewards.math import (MathGrader, extract_answer, grade, grade_batch, is_equiv,
                                    normalize_answer)
from prime_jax.rewards.pool import GradingPool, Task

REPO = Path(__file__).resolve().parents[1]


def _data_file(name: str) -> Path | None:
    for base in (REPO / "prime_jax" / "data" / "benchmarks", REPO.parent / "shared" / "data"):
        p = base / name / "test.jsonl"
        if p.exists():
            return p
    return None


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def grader():
    with MathGrader(num_workers=2, timeout=5.0) as g:
        yield g


# ----------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("text, expected", [
    ("so the answer is $\\boxed{42}$.", "42"),
    ("first \\boxed{1} then \\boxed{\\frac{a}{b^{2}}}", "\\frac{a}{b^{2}}"),
    ("nested \\boxed{\\left\\{ 1, 2 \\right\\}} done", "\\left\\{ 1, 2 \\right\\}"),
    ("old style \\boxed 5.", "5"),
    ("$\\boxed {7}$", "7"),
    ("framed \\fbox{x+1}", "x+1"),
    ("She makes 9 * 2 = $18 a day.\n#### 18", "18"),
    ("#### Step 1\nwork\nThe answer is 12.", "12"),
    ("Thus, the final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
    ("Final Answer: 3.5", "3.5"),
    ("The answer is: **17**", "17"),
    ("no answer here", None),
    ("broken \\boxed{12", None),
    ("\\boxed{}", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_strips_null_bytes():
    assert extract_answer("\\boxed{1\x002}\x00") == "12"


# ----------------------------------------------------------------------------- equivalence table
EQUIVALENT = [
    # fractions
    ("\\frac{1}{2}", "1/2"), ("\\dfrac{3}{4}", "\\frac{3}{4}"), ("\\frac43", "\\frac{4}{3}"),
    ("\\tfrac{5}{10}", "\\frac{1}{2}"), ("-\\frac{2}{3}", "\\frac{-2}{3}"), ("\\frac{6}{8}", "0.75"),
    # decimals
    ("0.5", "\\frac{1}{2}"), (".25", "0.25"), ("18.90", "18.9"), ("3.0", "3"),
    # percentages
    ("50\\%", "50"), ("25%", "25"), ("12.5\\%", "0.125"),
    # units
    ("10\\text{ cm}", "10"), ("5 \\text{ inches}", "5"), ("864 \\mbox{ inches}^2", "864"),
    ("5.4 \\text{ cents}", "5.4"), ("12 square units", "12"), ("\\$32,\\!348", "32348"), ("7 dollars", "7"),
    # radicals
    ("2\\sqrt{2}", "\\sqrt{8}"), ("\\sqrt2", "\\sqrt{2}"), ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
    ("11\\sqrt2", "11\\sqrt{2}"), ("\\sqrt{12}", "2\\sqrt{3}"),
    # intervals
    ("[-2,7]", "[-2, 7]"), ("(-\\infty, 0]", "(-\\infty,0]"),
    ("\\left(\\frac{3}{5},\\frac{8}{3}\\right]", "(0.6, 8/3]"), ("(0,9) \\cup (9,36)", "(0, 9)\\cup(9, 36)"),
    # tuples
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi/2)"), ("(1, -2)", "(1,-2)"),
    ("\\left( \\frac{3}{2}, -13 \\right)", "(1.5,-13)"),
    # sets and solution lists
    ("\\{1,2\\}", "\\{2, 1\\}"), ("1, 2", "2, 1"),
    ("\\{1\\pm\\sqrt{5},-2\\}", "\\{-2, 1+\\sqrt{5}, 1-\\sqrt{5}\\}"),
    # expressions and equations
    ("x^2+2x+1", "(x+1)^2"), ("p - q", "-q + p"), ("2k+2", "2(k+1)"), ("6r^2-4r-24", "2(3r^2-2r-12)"),
    ("(a+5)(b+2)", "ab+2a+5b+10"), ("y = 2x + 3", "y=3+2x"), ("x=5", "5"), ("x = -3", "-3"),
    ("5x - 7y + 11z + 4 = 0", "5x-7y+11z+4=0"), ("\\cot x", "\\cot(x)"),
    # pi
    ("2\\pi", "2 \\pi"), ("\\frac{20000}{\\pi}", "20000/\\pi"), ("18+2\\pi", "2\\pi+18"),
    # thousands separators
    ("1,000", "1000"), ("10,\\!080", "10080"), ("11,\\! 111,\\! 111,\\! 100", "11111111100"), ("1{,}000", "1000"),
    # negative numbers
    ("-\\frac{35}{9}", "-35/9"), ("-0.5", "-\\frac{1}{2}"), ("-12", "-12.0"),
    # degrees
    ("90^\\circ", "90"), ("30^{\\circ}", "30"), ("145°", "145"), ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}"),
    # text and multiple choice
    ("\\text{Evelyn}", "Evelyn"), ("\\text{east}", "East"), ("\\text{(C)}", "C"), ("(B)", "\\text{(B)}"),
    # complex numbers
    ("6 - 5i", "-5i+6"), ("1+2i", "2i+1"),
    # matrices / vectors
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
     "\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\\\ \\frac{5}{3} \\end{pmatrix}"),
    ("\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", "\\begin{pmatrix}-1&0\\\\0&-1\\end{pmatrix}"),
    ("1 \\pm \\sqrt{19}", "1\\pm\\sqrt{19}"),
]

NOT_EQUIVALENT = [
    ("\\frac{1}{2}", "\\frac{1}{3}"), ("\\frac{3}{4}", "0.7"), ("0.33", "\\frac{1}{3}"), ("2.5", "25"),
    ("50\\%", "0.6"), ("10\\text{ cm}", "11"), ("2\\sqrt{2}", "\\sqrt{2}"), ("\\sqrt{8}", "3"),
    ("[-2,7]", "(-2,7]"), ("(-\\infty, 0]", "(-\\infty, 0)"), ("(1,2)", "(2,1)"),
    ("(3, \\frac{\\pi}{2})", "(3, \\pi)"), ("\\{1,2\\}", "\\{1,3\\}"), ("x^2+2x+1", "(x-1)^2"),
    ("p - q", "q - p"), ("2k+2", "2k"), ("\\pi", "3"), ("2\\pi", "\\pi"), ("1,000", "100"),
    ("1000", "1001"), ("-3", "3"), ("-\\frac{1}{2}", "\\frac{1}{2}"), ("90^\\circ", "45^\\circ"),
    ("\\text{east}", "\\text{west}"), ("\\text{east}", "\\text{seat}"), ("\\text{(C)}", "\\text{(D)}"),
    ("6 - 5i", "6 + 5i"), ("x=5", "x=6"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}"),
    ("12345678901234567890", "12345678901234567891"), ("\\frac{20000}{\\pi}", "20000"),
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}"), ("\\text{even}", "\\text{odd}"), ("0", "\\emptyset"),
]


def test_table_size():
    assert len(EQUIVALENT) + len(NOT_EQUIVALENT) >= 60


@pytest.mark.parametrize("a, b", EQUIVALENT)
def test_equivalent(a, b):
    # both directions, and through the full response -> extract -> grade path
    assert is_equiv(a, b), (normalize_answer(a), normalize_answer(b))
    assert is_equiv(b, a), (normalize_answer(b), normalize_answer(a))
    assert grade(f"Work... so the answer is $\\boxed{{{a}}}$.", b) == 1.0


@pytest.mark.parametrize("a, b", NOT_EQUIVALENT)
def test_not_equivalent(a, b):
    assert not is_equiv(a, b)
    assert not is_equiv(b, a)
    assert grade(f"\\boxed{{{a}}}", b) == 0.0


def test_no_answer_scores_zero():
    assert grade("I think it is probably five", "5") == 0.0
    assert grade(None, "5") == 0.0  # type: ignore[arg-type]
    assert grade("\\boxed{5}", "") == 0.0


def test_ground_truth_forms():
    assert grade("\\boxed{18}", "#### 18") == 1.0
    assert grade("\\boxed{18}", "$\\boxed{18}$") == 1.0
    assert grade("\\boxed{18}", 18) == 1.0  # type: ignore[arg-type]


def test_grade_response_dispatch():
    assert grade_response("\\boxed{\\frac{1}{2}}", "0.5", "math") == 1.0
    with pytest.raises(ValueError):
        grade_response("x", "y", "poetry")


# ----------------------------------------------------------------------------- real data
@pytest.mark.timeout(300)
def test_math500_self_and_mismatch(grader):
    path = _data_file("math500")
    if path is None:
        pytest.skip("MATH-500 test.jsonl not found")
    rows = _read_jsonl(path)
    assert len(rows) == 500
    sols, answers = [r["solution"] for r in rows], [r["answer"] for r in rows]
    res = grader.grade_batch(sols, answers)
    assert res.timeouts == 0 and res.errors == 0, res.statuses
    self_rate = sum(res) / len(res)
    # mismatched pairs: solution i against the next problem's answer that differs as a string
    n = len(rows)
    other = []
    for i in range(n):
        j = (i + 1) % n
        while answers[j] == answers[i]:
            j = (j + 1) % n
        other.append(answers[j])
    mis = grader.grade_batch(sols, other)
    assert mis.errors == 0
    mis_rate = sum(mis) / len(mis)
    print(f"\nMATH-500: self-agreement {self_rate:.4f}, mismatched pairs graded correct {mis_rate:.4f} "
          f"({res.wall_s:.1f}s + {mis.wall_s:.1f}s on 2 workers)")
    assert self_rate >= 0.99
    assert mis_rate <= 0.01


@pytest.mark.timeout(300)
def test_gsm8k_formats_and_mismatch(grader):
    path = _data_file("gsm8k")
    if path is None:
        pytest.skip("GSM8K test.jsonl not found")
    rows = _read_jsonl(path)
    sols = [r["answer"] for r in rows]
    answers = [s.split("####")[-1].strip() for s in sols]
    bodies = [s.rsplit("####", 1)[0] for s in sols]
    n = len(rows)
    hashes = grader.grade_batch(sols, answers)  # "#### 18" format
    boxed = grader.grade_batch([b + f"The answer is \\boxed{{{a}}}." for b, a in zip(bodies, answers)], answers)
    other = []
    for i in range(n):
        j = (i + 1) % n
        while answers[j] == answers[i]:
            j = (j + 1) % n
        other.append(answers[j])
    mis = grader.grade_batch(sols, other)
    rates = [sum(r) / n for r in (hashes, boxed, mis)]
    print(f"\nGSM8K: '####' {rates[0]:.4f}, boxed {rates[1]:.4f}, mismatched {rates[2]:.4f}")
    assert hashes.errors == boxed.errors == mis.errors == 0
    assert rates[0] >= 0.99 and rates[1] >= 0.99
    assert rates[2] <= 0.01


# ----------------------------------------------------------------------------- adversarial
ADVERSARIAL = {
    "million_chars": "a" * 10**6,
    "million_chars_then_box": "x" * 10**6 + "\\boxed{" + "1" * 10**6 + "}",
    "power_tower": "Clearly the answer is \\boxed{9^{9^{9^{9}}}}",
    "power_tower_plain": "The answer is 9**9**9**9",
    "huge_exponent": "\\boxed{2^{999999999}}",
    "huge_factorial": "\\boxed{1000000!}",
    "deep_braces_balanced": "\\boxed" + "{" * 100_000 + "7" + "}" * 100_000,
    "deep_braces_open": "\\boxed" + "{" * 100_000,
    "deep_parens": "The answer is " + "(" * 5000 + "7",
    "malformed_latex": "\\boxed{\\frac{1}{\\sqrt{}}\\left( \\right] ^^ _ \\begin{pmatrix}}",
    "malformed_frac": "\\boxed{\\frac{}{}}",
    "unicode": "\\boxed{\u2603\u00e9\U0001F600 \u221a2 \u202e}",
    "null_bytes": "\x00" * 1000 + "\\boxed{\x00}" + "\x00" * 1000,
    "many_boxes": "\\boxed{1}" * 100_000,
    "backslashes": "\\" * 10**6,
    "caret_chain": "\\boxed{" + "x^" * 2000 + "2}",
}


@pytest.mark.timeout(120)
def test_adversarial_answers_bounded_and_zero(grader):
    names = list(ADVERSARIAL)
    budget = 3.0
    t0 = time.monotonic()
    res = grader.grade_batch([ADVERSARIAL[k] for k in names], ["7"] * len(names), timeout=budget)
    wall = time.monotonic() - t0
    assert list(res) == [0.0] * len(names), dict(zip(names, res))
    # every item within its budget (+ kill grace); with 2 workers the whole batch is bounded by
    # ceil(n / 2) * (budget + grace) and in practice far less
    assert wall <= (len(names) + 1) // 2 * (budget + grader.kill_grace) + 5
    print(f"\nadversarial: {len(names)} items in {wall:.2f}s, statuses {dict(zip(names, res.statuses))}")


@pytest.mark.timeout(60)
def test_adversarial_extraction_is_fast_in_process():
    for name, text in ADVERSARIAL.items():
        t0 = time.monotonic()
        extract_answer(text)
        assert time.monotonic() - t0 < 1.0, name


# ----------------------------------------------------------------------------- pool behaviour
@pytest.mark.timeout(120)
def test_hung_worker_is_killed_replaced_and_counted(grader):
    before = grader.stats.as_dict()
    t0 = time.monotonic()
    res = grader.run([
        Task("time:sleep", (60,), budget=1.0, soft=False),  # C-level hang: only a kill ends it
        Task("time:sleep", (60,), budget=1.0, soft=True),  # interrupted by the soft limit
        Task("os:_exit", (3,), budget=5.0),  # the worker crashes
        Task("prime_jax.rewards.math:grade", ("\\boxed{2}", "2")),
    ])
    wall = time.monotonic() - t0
    assert res.statuses == ["timeout", "timeout", "error", "ok"]
    assert list(res) == [0.0, 0.0, 0.0, 1.0]
    assert res.timeouts == 2 and res.errors == 1
    assert wall < 1.0 + grader.kill_grace + 10  # never waits for the 60 s sleeps
    after = grader.stats.as_dict()
    assert after["timeouts"] - before["timeouts"] == 2
    assert after["errors"] - before["errors"] == 1
    assert after["worker_restarts"] - before["worker_restarts"] >= 2
    # the pool still works with its replacement workers
    again = grader.grade_batch(["\\boxed{3}"] * 4, ["3"] * 4)
    assert list(again) == [1.0] * 4 and again.timeouts == again.errors == 0


def test_module_grade_batch_and_counts():
    res = grade_batch(["\\boxed{1}", "\\boxed{2}", "nothing"], ["1", "3", "4"], timeout=5.0, num_workers=1)
    assert isinstance(res, list) and list(res) == [1.0, 0.0, 0.0]
    assert res.timeouts == 0 and res.errors == 0 and res.statuses == ["ok"] * 3


def test_reward_pool_math_items():
    with RewardPool(num_workers=1, math_timeout=5.0) as pool:
        res = pool.grade([("\\boxed{\\frac12}", "0.5", "math"), ("\\boxed{3}", "4", "math")])
        assert list(res) == [1.0, 0.0]
        assert pool.stats.graded == 2 and pool.stats.timeouts == 0
    assert pool.closed
    with pytest.raises(RuntimeError):
        pool.run([])


def test_pool_close_stops_workers():
    pool = GradingPool(num_workers=1)
    procs = [w.proc for w in pool._workers]
    pool.close(timeout=0.5)
    for p in procs:
        assert p.poll() is not None


def test_rewards_package_does_not_import_jax():
    code = ("import sys; import prime_jax.rewards as r; "
            "assert r.grade_response('\\\\boxed{2}', '2', 'math') == 1.0; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax', 'torch')"
            " or m.startswith(('prime_jax.models', 'prime_jax.train', 'prime_jax.sampling'))]; "
            "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
