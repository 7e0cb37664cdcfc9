"""Generated word problems with worked solutions (``data.synthetic.task = "word"``), for real
pretrained models: natural-language arithmetic a step or two easier than GSM8K, written the way
GSM8K's solutions are once their ``#### n`` becomes ``\\boxed{n}`` (:func:`.formats.gsm8k_demonstration`)::

    user:       Maya has 4 bags with 6 marbles in each bag. She gives 5 marbles to Leo. How many
                marbles does Maya have now?

                Please reason step by step, and put your final answer within \\boxed{}.
    assistant:  Maya has 4 * 6 = 24 marbles.
                After giving 5 marbles to Leo, she has 24 - 5 = 19 marbles.
                The answer is \\boxed{19}.

A problem is a start (``a`` items, or ``a`` containers of ``k`` items: one multiplication step),
then additions and subtractions in words (buys, finds, is given / gives away, eats, sells, loses),
and possibly a last step that shares the items equally (an exact division; the question then asks
how many each gets). ``min_steps..max_steps`` counts every operation (the start's multiplication
included); every running value stays in ``[0, max_value]``.

Small pretrained models lose these at the format and at one slipped step, which is what RL and a
process reward are for (benchmarks/README.md measures SmolLM2-135M-Instruct on them). The ground
truth is the answer as a string, graded by the ordinary math verifier. Generation is
deterministic: problem ``i`` depends only on ``(seed, stream, i)``. ``meta["expression"]`` is the
problem text without the instruction (what ``exclude`` and the held-out set compare).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .problems import ANSWER_LINE, Problem, apply_system_prompt

SOURCE = "synthetic_word"

#: (name, subject pronoun, object pronoun)
PEOPLE = (("Maya", "she", "her"), ("Leo", "he", "him"), ("Sam", "he", "him"), ("Nina", "she", "her"),
          ("Omar", "he", "him"), ("Priya", "she", "her"), ("Lucas", "he", "him"), ("Emma", "she", "her"),
          ("Kenji", "he", "him"), ("Sofia", "she", "her"), ("Ben", "he", "him"), ("Grace", "she", "her"),
          ("Carlos", "he", "him"), ("Aisha", "she", "her"), ("Tom", "he", "him"), ("Lily", "she", "her"))
#: (item, its plural, container, its plural, whether it can be eaten)
ITEMS = (("apple", "apples", "basket", "baskets", True), ("marble", "marbles", "bag", "bags", False),
         ("sticker", "stickers", "sheet", "sheets", False), ("pencil", "pencils", "box", "boxes", False),
         ("cookie", "cookies", "jar", "jars", True), ("stamp", "stamps", "album", "albums", False),
         ("shell", "shells", "bucket", "buckets", False), ("card", "cards", "pack", "packs", False),
         ("balloon", "balloons", "bunch", "bunches", False), ("orange", "oranges", "crate", "crates", True),
         ("crayon", "crayons", "box", "boxes", False), ("candy", "candies", "bag", "bags", True),
         ("book", "books", "shelf", "shelves", False), ("egg", "eggs", "carton", "cartons", True),
         ("bead", "beads", "jar", "jars", False), ("muffin", "muffins", "tray", "trays", True))
_GAIN = (("{s} buys {x} more {items}.", "After buying {x} more, {s} has"),
         ("{s} finds {x} more {items}.", "After finding {x} more, {s} has"),
         ("{f} gives {o} {x} {items}.", "After getting {x} from {f}, {s} has"))
_LOSS = (("{s} gives {x} {items} to {f}.", "After giving {x} {items} to {f}, {s} has"),
         ("{s} sells {x} {items}.", "After selling {x} {items}, {s} has"),
         ("{s} loses {x} {items}.", "After losing {x} {items}, {s} has"))
_EAT = ("{s} eats {x} {items}.", "After eating {x} {items}, {s} has")


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _draw(rng: np.random.Generator, n_steps: int, *, max_start: int, max_operand: int, max_factor: int,
          max_value: int) -> tuple[str, list[str], int]:
    """One problem: (question text, solution lines without the answer line, answer)."""
    person = PEOPLE[int(rng.integers(len(PEOPLE)))]
    name, s, o = person
    friend = PEOPLE[int(rng.integers(len(PEOPLE)))][0]
    if friend == name:
        friend = PEOPLE[(PEOPLE.index(person) + 1) % len(PEOPLE)][0]
    item, plural, container, containers, edible = ITEMS[int(rng.integers(len(ITEMS)))]

    def count(k: int) -> str:
        return f"{k} {item if k == 1 else plural}"

    steps_left = n_steps
    share = steps_left >= 2 and max_factor >= 2 and rng.random() < 0.3  # last step: an equal share
    if max_factor >= 2 and rng.random() < 0.4:  # a start in containers: one multiplication
        bags, per = int(rng.integers(2, max_factor + 1)), int(rng.integers(2, max(2, min(max_start, max_value // 2)) + 1))
        while bags * per > max_value:
            per -= 1
        a = bags * per
        question = [f"{name} has {bags} {containers} with {per} {plural} in each {container}."]
        lines = [f"{name} has {bags} * {per} = {count(a)}."]
        steps_left -= 1
    else:
        a = int(rng.integers(max(2, min(5, max_start)), max_start + 1))
        question = [f"{name} has {count(a)}."]
        lines = []
    for _ in range(steps_left - int(share)):
        if a < max_value and (a < 2 or rng.random() < 0.5):
            x = int(rng.integers(1, min(max_operand, max_value - a) + 1))
            said, solved = _GAIN[int(rng.integers(len(_GAIN)))]
            r, op = a + x, "+"
        else:  # leaves at least one
            x = int(rng.integers(1, min(max_operand, a - 1) + 1))
            said, solved = _EAT if edible and rng.random() < 0.3 else _LOSS[int(rng.integers(len(_LOSS)))]
            r, op = a - x, "-"
        words = dict(s=s, o=o, f=friend, x=x, items=item if x == 1 else plural)
        question.append(_sentence(said.format(**words)))
        lines.append(f"{solved.format(**words)} {a} {op} {x} = {count(r)}.")
        a = r
    if share:
        divisors = [d for d in range(2, max_factor + 1) if a % d == 0]
        if divisors:
            d = divisors[int(rng.integers(len(divisors)))]
            question.append(f"{_sentence(s)} shares them equally among {d} friends.")
            question.append(f"How many {plural} does each friend get?")
            lines.append(f"Each friend gets {a} / {d} = {count(a // d)}.")
            return " ".join(question), lines, a // d
    question.append(f"How many {plural} does {name} have now?")
    return " ".join(question), lines, a


def demonstration(problem: Problem) -> str:
    """The worked solution: one sentence per step with its arithmetic, then the answer line."""
    return "\n".join([*problem.meta["lines"], ANSWER_LINE.format(problem.ground_truth)])


def make_problems(n: int, seed: int = 0, *, min_steps: int = 1, max_steps: int = 2, max_start: int = 20,
                  max_operand: int = 20, max_factor: int = 5, max_value: int = 999, stream: int = 0,
                  exclude: Iterable[str] | None = None, unique: bool = False, system_prompt: str | None = None,
                  task_suffix: str = "") -> list[Problem]:
    """``n`` word problems of ``min_steps..max_steps`` operations (ability "math", answer a whole
    number); the user message is the question plus ``task_suffix`` (the run's instruction).

    ``exclude``: question texts never to produce (the held-out set's); ``unique`` drops repeats.
    """
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    if not 2 <= max_start <= max_value:
        raise ValueError(f"need 2 <= max_start <= max_value, got {max_start}, {max_value}")
    seen = set(exclude or ())
    out: list[Problem] = []
    i, max_tries = 0, 100 * n + 1000
    while len(out) < n:
        if i >= max_tries:
            raise ValueError(f"could not draw {n} distinct word problems with these settings (got {len(out)})")
        rng = np.random.default_rng([int(seed), int(stream), i, 11])  # 11: streams apart from the other tasks'
        i += 1
        n_steps = int(rng.integers(min_steps, max_steps + 1))
        text, lines, answer = _draw(rng, n_steps, max_start=max_start, max_operand=max_operand,
                                    max_factor=max_factor, max_value=max_value)
        if text in seen:
            continue
        if unique or exclude is not None:
            seen.add(text)
        messages = apply_system_prompt([{"role": "user", "content": text + task_suffix}], system_prompt)
        out.append(Problem(messages=messages, ability="math", ground_truth=str(answer), source=SOURCE,
                           id=f"word-{seed}-{stream}-{i - 1}",
                           meta={"expression": text, "lines": lines, "steps": len(lines)}))
    return out
