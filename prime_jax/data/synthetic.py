"""A tiny multi-step arithmetic task for PRIME demo runs on a CPU (a ~1M-parameter model).

Each problem is a left-to-right chain of 2-4 operations (2-3 in the default preset) on small
non-negative integers, written with explicit parentheses so that ordinary precedence gives the
same value::

    user:       Compute ((7+5)*2)-3
    assistant:  7+5=12
                12*2=24
                24-3=21
                \\boxed{21}

Every intermediate value and the answer lie in ``[0, max_value]`` (999 by default). The
assistant text, :func:`demonstration`, is the step-by-step solution used for SFT (about 20
tokens in the default preset, 13-45 across presets, with the tiny character tokenizer; prompts
are about 36 tokens with the chat template); the ground truth is the final value as a string, so
the ordinary math verifier (last ``\\boxed{}``) grades it.

Difficulty is set by a preset (:data:`DIFFICULTY`) and/or the individual knobs: number of
steps, size of the start value and operands, largest multiplier, and the operators allowed. The
hard part for a small model is carrying through 2-3 digit additions and multiplications, and
errors compound over steps. Measured with a 0.82M-parameter decoder (4 layers, width 128, this
package's tiny tokenizer), SFT on the demonstrations for 300 steps of 64 sequences (AdamW,
peak lr 2e-3), accuracy on 128 unseen problems, greedy / sampled at temperature 1:

* ``"easy"`` (1-2 steps, numbers <= 9, factors <= 3): 75% / 62%
* ``"demo"`` (default; 2-3 steps, numbers <= 9, factors <= 3): 64% / 52%
* ``"medium"`` (2-4 steps, numbers <= 20, factors <= 5): 4% / 2% (loss still falling at 300
  steps; it needs a longer SFT)

Lower the knobs if a model gets ~0%, raise them if ~100%. Generation is deterministic:
problem ``i`` depends only on ``(seed, stream, i)``.
"""
from __future__ import annotations

import re
from typing import Iterable

import numpy as np

from .problems import Problem, apply_system_prompt

SOURCE = "synthetic_arith"
PROMPT_PREFIX = "Compute "

#: Difficulty presets; any knob passed to make_problems overrides its preset value.
DIFFICULTY: dict[str, dict] = {
    "easy": dict(min_steps=1, max_steps=2, max_start=9, max_operand=9, max_factor=3, ops="+-*"),
    "demo": dict(min_steps=2, max_steps=3, max_start=9, max_operand=9, max_factor=3, ops="+-*"),
    "medium": dict(min_steps=2, max_steps=4, max_start=20, max_operand=20, max_factor=5, ops="+-*"),
    "hard": dict(min_steps=3, max_steps=5, max_start=50, max_operand=99, max_factor=9, ops="+-*"),
}

_TOKEN_RE = re.compile(r"\d+|[-+*]")


def _draw(rng: np.random.Generator, n_steps: int, *, max_start: int, max_operand: int,
          max_factor: int, max_value: int, ops: str) -> tuple[int, list[tuple[str, int]]]:
    a = int(rng.integers(1, max_start + 1))
    start, steps = a, []
    for _ in range(n_steps):
        choices = []
        if "+" in ops and a < max_value:
            choices.append(("+", 1, min(max_operand, max_value - a)))
        if "-" in ops and a >= 1:
            choices.append(("-", 1, min(max_operand, a)))
        if "*" in ops and a >= 1 and max_factor >= 2 and a * 2 <= max_value:
            choices.append(("*", 2, min(max_factor, max_value // a)))
        if not choices:  # cannot happen with the default operators
            raise ValueError(f"no operator applies to {a} with ops={ops!r}")
        op, lo, hi = choices[int(rng.integers(len(choices)))]
        x = int(rng.integers(lo, hi + 1))
        a = a + x if op == "+" else a - x if op == "-" else a * x
        steps.append((op, x))
    return start, steps


def expression(start: int, steps: Iterable[tuple[str, int]]) -> str:
    """``7, [('+',5), ('*',2), ('-',3)]`` -> ``"((7+5)*2)-3"``: left to right, parenthesised."""
    steps = list(steps)
    e = str(start)
    for k, (op, x) in enumerate(steps):
        e = f"{e}{op}{x}"
        if k < len(steps) - 1:
            e = f"({e})"
    return e


def _apply(a: int, op: str, x: int) -> int:
    return a + x if op == "+" else a - x if op == "-" else a * x


def parse_expression(text: str) -> tuple[int, list[tuple[str, int]]]:
    """Start value and steps of a chain expression (parentheses and a prefix are ignored)."""
    toks = _TOKEN_RE.findall(text)
    if len(toks) < 1 or len(toks) % 2 == 0 or not toks[0].isdigit():
        raise ValueError(f"not a chain expression: {text!r}")
    steps = [(toks[k], int(toks[k + 1])) for k in range(1, len(toks), 2)]
    return int(toks[0]), steps


def solve(text: str) -> int:
    """Value of a chain expression (or a problem's user text), left to right."""
    a, steps = parse_expression(text)
    for op, x in steps:
        a = _apply(a, op, x)
    return a


def make_problems(
    n: int,
    seed: int = 0,
    *,
    difficulty: str = "demo",
    min_steps: int | None = None,
    max_steps: int | None = None,
    max_start: int | None = None,
    max_operand: int | None = None,
    max_factor: int | None = None,
    max_value: int = 999,
    ops: str | None = None,
    stream: int = 0,
    exclude: Iterable[str] | None = None,
    unique: bool = False,
    system_prompt: str | None = None,
) -> list[Problem]:
    """``n`` arithmetic problems (ability "math", ground truth the answer as a string).

    ``stream`` picks an independent sequence for the same seed (e.g. 0 train, 1 eval);
    ``exclude`` is a set of expressions never to produce (e.g. the training set's, to get a
    disjoint eval set) and ``unique`` drops repeats. Problem ``i`` of a stream depends on
    ``(seed, stream, i)`` only, so a prefix of a longer list is the shorter list (when nothing
    is excluded).
    """
    cfg = dict(DIFFICULTY[difficulty])
    for k, v in dict(min_steps=min_steps, max_steps=max_steps, max_start=max_start,
                     max_operand=max_operand, max_factor=max_factor, ops=ops).items():
        if v is not None:
            cfg[k] = v
    if not 1 <= cfg["min_steps"] <= cfg["max_steps"]:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {cfg['min_steps']}, {cfg['max_steps']}")
    if cfg["max_start"] > max_value or max_value < 1:
        raise ValueError("need 1 <= max_start <= max_value")
    def draw(rng):
        n_steps = int(rng.integers(cfg["min_steps"], cfg["max_steps"] + 1))
        return _draw(rng, n_steps, max_start=cfg["max_start"], max_operand=cfg["max_operand"],
                     max_factor=cfg["max_factor"], max_value=max_value, ops=cfg["ops"])

    return draw_chain_problems(n, seed, stream, draw, expression, exclude=exclude, unique=unique,
                               system_prompt=system_prompt, prefix=PROMPT_PREFIX, source=SOURCE, id_prefix="arith")


def draw_chain_problems(n: int, seed: int, stream: int, draw, write, *, exclude: Iterable[str] | None, unique: bool,
                        system_prompt: str | None, prefix: str, source: str, id_prefix: str, salt: tuple = ()
                        ) -> list[Problem]:
    """The first ``n`` problems of a stream of chain draws, skipping excluded (and, with ``unique``,
    repeated) expressions; shared by this task and :mod:`.chains`.

    ``draw(rng) -> (start, steps)`` makes one chain from the generator seeded by ``(seed, stream, i,
    *salt)``; ``write(start, steps)`` is its expression, shown after ``prefix`` in the user message.
    """
    seen = set(exclude or ())
    out: list[Problem] = []
    i, max_tries = 0, 100 * n + 1000
    while len(out) < n:
        if i >= max_tries:
            raise ValueError(f"could not draw {n} problems with these constraints (got {len(out)})")
        start, steps = draw(np.random.default_rng([int(seed), int(stream), i, *salt]))
        expr = write(start, steps)
        i += 1
        if expr in seen:
            continue
        if unique or exclude is not None:
            seen.add(expr)
        a, values = start, []
        for op, x in steps:
            a = _apply(a, op, x)
            values.append(a)
        messages = apply_system_prompt([{"role": "user", "content": prefix + expr}], system_prompt)
        out.append(Problem(messages=messages, ability="math", ground_truth=str(a), source=source,
                           id=f"{id_prefix}-{seed}-{stream}-{i - 1}",
                           meta={"expression": expr, "start": start, "steps": [list(s) for s in steps],
                                 "values": values}))
    return out


def demonstration(problem: Problem) -> str:
    """The step-by-step solution, one ``a<op>x=r`` line per step, then ``\\boxed{answer}``."""
    a, steps = parse_expression(problem.meta.get("expression") or problem.user_content)  # a prefix is ignored
    lines = []
    for op, x in steps:
        r = _apply(a, op, x)
        lines.append(f"{a}{op}{x}={r}")
        a = r
    lines.append(f"\\boxed{{{a}}}")
    return "\n".join(lines)


def sft_messages(problem: Problem) -> list[dict]:
    """The problem's messages plus the demonstration as the assistant's reply (for SFT)."""
    return list(problem.messages) + [{"role": "assistant", "content": demonstration(problem)}]
