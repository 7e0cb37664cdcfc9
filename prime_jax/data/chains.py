"""A credit-assignment demo task: long chains of easy one-digit steps (``data.synthetic.task = "chains"``).

Each problem is a left-to-right chain of additions and subtractions of one-digit numbers whose
running value stays in ``[0, 9]``, so every step is easy and has a one-token result::

    user:       Chain 7-5+4-3+2+1
    assistant:  7-5=2
                2+4=6
                6-3=3
                3+2=5
                5+1=6
                \\boxed{6}

What makes it hard for a tiny model is the length (5 steps by default, ~40 response tokens with the
tiny character tokenizer): each step copies the running value and the next operand and may slip,
and one slipped step makes the final answer wrong however right the other steps are. An outcome
reward then says only *that* a response failed; a step-level reward can say *where* (the wrong
result digit), which is what PRIME's implicit process reward is meant to add. In the arithmetic task
(:mod:`prime_jax.data.synthetic`) answers are two short lines whose errors are mostly in a carried
digit, so there is little "where" to learn.

The ground truth is the final value as a string, so the ordinary math verifier (last ``\\boxed{}``)
grades it. Generation is deterministic: problem ``i`` depends only on ``(seed, stream, i)``.

A clean SFT on these chains is either near 100% or on a cliff (the tiny model learns the rule
abruptly), which leaves RL nothing to fix. ``flawed_demonstration`` gives the SFT model the kind of
error RL is for, systematic slips at particular steps: for a seeded set of step types (``3+4``,
``8-2``, ...) the demonstration writes a result one off with some probability and carries it on, so
the SFT policy slips at those steps when sampling (and greedily where it learned the slip as the
likelier token), and a response often meets more than one such step, any of which can make it wrong.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from . import synthetic
from .problems import Problem

SOURCE = "synthetic_chains"
PROMPT_PREFIX = "Chain "
MAX_VALUE = 9  # every running value is one digit


def _draw(rng: np.random.Generator, length: int) -> tuple[int, list[tuple[str, int]]]:
    """A start digit and ``length`` steps ``(op, x)``, x in 1..9, every running value in [0, 9]."""
    a = int(rng.integers(0, MAX_VALUE + 1))
    start, steps = a, []
    for _ in range(length):
        ops = [op for op, ok in (("+", a < MAX_VALUE), ("-", a > 0)) if ok]
        op = ops[int(rng.integers(len(ops)))]
        x = int(rng.integers(1, (MAX_VALUE - a if op == "+" else a) + 1))
        a = a + x if op == "+" else a - x
        steps.append((op, x))
    return start, steps


def expression(start: int, steps: Iterable[tuple[str, int]]) -> str:
    """``7, [('-',5), ('+',4)]`` -> ``"7-5+4"`` (left to right; only + and -, so no parentheses)."""
    return str(start) + "".join(f"{op}{x}" for op, x in steps)


def make_problems(n: int, seed: int = 0, *, min_length: int = 5, max_length: int = 5, stream: int = 0,
                  exclude: Iterable[str] | None = None, unique: bool = False,
                  system_prompt: str | None = None) -> list[Problem]:
    """``n`` chain problems of ``min_length..max_length`` steps (ability "math", answer a digit).

    ``stream`` picks an independent sequence for the same seed (0 train, 1 held-out, 2 SFT);
    ``exclude`` is a set of expressions never to produce (the held-out set's), ``unique`` drops repeats.
    """
    if not 1 <= min_length <= max_length:
        raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
    return synthetic.draw_chain_problems(
        n, seed, stream, lambda rng: _draw(rng, int(rng.integers(min_length, max_length + 1))), expression,
        exclude=exclude, unique=unique, system_prompt=system_prompt, prefix=PROMPT_PREFIX, source=SOURCE,
        id_prefix="chain", salt=(7,))  # 7: streams apart from the arithmetic task's


def step_types() -> list[tuple[int, str, int]]:
    """Every step ``(a, op, x)`` a chain can take: x in 1..9 and a result in [0, 9] (45 + and 45 -)."""
    return ([(a, "+", x) for a in range(MAX_VALUE) for x in range(1, MAX_VALUE + 1 - a)]
            + [(a, "-", x) for a in range(1, MAX_VALUE + 1) for x in range(1, a + 1)])


def flawed_step_types(fraction: float, seed: int) -> frozenset:
    """A seeded ``round(fraction * 90)`` of the step types (the same set for the same seed)."""
    types = step_types()
    order = np.random.default_rng([int(seed), 99]).permutation(len(types))
    return frozenset(types[i] for i in order[: int(round(fraction * len(types)))])


def _stays_in_range(value: int, steps: list[tuple[str, int]]) -> bool:
    for op, x in steps:
        value = synthetic._apply(value, op, x)
        if not 0 <= value <= MAX_VALUE:
            return False
    return True


FLAW_DIRECTIONS = ("either", "up")


def flawed_demonstration(problem: Problem, flawed: frozenset, prob: float, rng: np.random.Generator,
                         direction: str = "either") -> str:
    """The demonstration, except that at a step whose ``(running value, op, x)`` is in ``flawed`` it
    writes, with probability ``prob``, a result one off (``direction`` "either": r+1 or r-1, in random
    order; "up": r+1 only; whichever keeps this and every later running value in [0, 9]; none: the
    right one) and goes on from it, so its later lines and its ``\\boxed{}`` follow the slip. With
    "up" two slips add up instead of cancelling, so a right answer never goes through a demonstrated
    slip. Draws from ``rng`` only at flawed steps."""
    if direction not in FLAW_DIRECTIONS:
        raise ValueError(f"direction must be one of {FLAW_DIRECTIONS}, got {direction!r}")
    value, steps = synthetic.parse_expression(problem.meta.get("expression") or problem.user_content)
    lines = []
    for k, (op, x) in enumerate(steps):
        result = synthetic._apply(value, op, x)
        if (value, op, x) in flawed and rng.random() < prob:
            up_first = rng.random() < 0.5  # drawn with "up" too, so both directions draw the same stream
            if direction == "up":
                slips = [result + 1]
            else:
                slips = [result + 1, result - 1] if up_first else [result - 1, result + 1]
            slips = [r for r in slips if 0 <= r <= MAX_VALUE and _stays_in_range(r, steps[k + 1:])]
            result = slips[0] if slips else result
        lines.append(f"{value}{op}{x}={result}")
        value = result
    lines.append(f"\\boxed{{{value}}}")
    return "\n".join(lines)


def demonstration(problem: Problem) -> str:
    """The step-by-step solution: one ``a<op>x=r`` line per step, then ``\\boxed{answer}`` (the
    arithmetic task's format, so its writer serves both)."""
    return synthetic.demonstration(problem)
