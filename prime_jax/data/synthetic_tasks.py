"""The synthetic demo tasks behind the data source ``"synthetic"``, picked by ``data.synthetic.task``.

* ``arith`` (:mod:`.synthetic`): short arithmetic chains with multi-digit values;
* ``chains`` (:mod:`.chains`): long chains of one-digit steps, where per-step credit matters;
* ``word`` (:mod:`.word_problems`): word problems in natural language with worked solutions, for
  real pretrained models and their tokenizers (the user message ends with the run's instruction).

``synthetic`` is the config's ``data.synthetic`` section (any object with those attributes).
"""
from __future__ import annotations

from typing import Iterable

from . import chains, synthetic, word_problems
from .problems import Problem

SYNTHETIC_TASKS = ("arith", "chains", "word")
_ARITH_KNOBS = ("min_steps", "max_steps", "max_start", "max_operand", "max_factor")
_WORD_DEFAULTS = dict(min_steps=1, max_steps=2, max_start=20, max_operand=20, max_factor=5)
_MODULES = {"arith": synthetic, "chains": chains, "word": word_problems}
_BY_SOURCE = {synthetic.SOURCE: synthetic, chains.SOURCE: chains, word_problems.SOURCE: word_problems}


def task_kwargs(synthetic_cfg) -> dict:
    """The generator's keyword arguments from the config section (0 means the task's default)."""
    s = synthetic_cfg
    if s.task == "chains":
        lo = s.min_steps or 5
        return dict(min_length=lo, max_length=s.max_steps or max(lo, 5))
    if s.task == "word":
        knobs = {k: s[k] or default for k, default in _WORD_DEFAULTS.items()}
        knobs["max_steps"] = s.max_steps or max(knobs["min_steps"], _WORD_DEFAULTS["max_steps"])
        return dict(max_value=s.max_value, **knobs)
    knobs = {k: s[k] for k in _ARITH_KNOBS if s[k]}
    return dict(difficulty=s.difficulty, max_value=s.max_value, **knobs)


def make_task_problems(synthetic_cfg, n: int, seed: int, *, stream: int, exclude: Iterable[str] | None = None,
                       unique: bool = False, system_prompt: str | None = None, task_suffix: str = "") -> list[Problem]:
    """``n`` problems of the configured task (stream 0 train, 1 held-out, 2 SFT demonstrations);
    ``task_suffix`` (the run's instruction) ends the word task's user messages (the other tasks' prompts
    are fixed)."""
    if synthetic_cfg.task not in SYNTHETIC_TASKS:
        raise ValueError(f"data.synthetic.task: unknown task {synthetic_cfg.task!r}; expected one of {SYNTHETIC_TASKS}")
    extra = {"task_suffix": task_suffix} if synthetic_cfg.task == "word" else {}
    return _MODULES[synthetic_cfg.task].make_problems(n, seed, stream=stream, exclude=exclude, unique=unique,
                                                      system_prompt=system_prompt, **task_kwargs(synthetic_cfg), **extra)


def task_demonstration(problem: Problem) -> str:
    """The step-by-step solution of a problem of any task (told apart by its source)."""
    return _BY_SOURCE[problem.source].demonstration(problem)


def first_deviation(demonstration: str, response: str) -> int | None:
    """Character index where `response` first departs from the task's step-by-step `demonstration`
    (its first slipped step, on the synthetic tasks, whose answers have one fixed form); None if
    it does not (a correct response, or one that only stops early)."""
    for i, (want, got) in enumerate(zip(demonstration, response)):
        if want != got:
            return i
    return None


def token_at_char(tokenizer, response_ids, char: int) -> int:
    """Index of the response token that holds character `char` of the decoded response."""
    end = 0
    for t, token in enumerate(response_ids):
        end += len(tokenizer.decode([int(token)]))
        if char < end:
            return t
    return len(response_ids) - 1


def first_error_token(problem: Problem, response_ids, tokenizer) -> int | None:
    """Token index where a response first departs from the problem's demonstration (its first
    error, on the synthetic tasks); None if it never does (it is right, or stopped early).

    response_ids: the response's text tokens (no padding, no stop token)."""
    text = tokenizer.decode([int(t) for t in response_ids], skip_special_tokens=True)
    char = first_deviation(task_demonstration(problem), text)
    return None if char is None else token_at_char(tokenizer, response_ids, char)


def is_task_problem(problem: Problem) -> bool:
    """Whether `problem` is one of the synthetic tasks' (whose demonstrations are known)."""
    return problem.source in _BY_SOURCE


def steps_right(problem: Problem, response: str) -> bool:
    """Whether `response` writes every step of the problem's demonstration as it is (right steps, not
    only a right final answer: an outcome reward cannot tell the two apart)."""
    return response.strip().startswith(task_demonstration(problem))
