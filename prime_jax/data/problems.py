"""Problems: the unit of data PRIME trains and evaluates on (row formats: `formats`; readers: `readers`).

A :class:`Problem` holds the chat messages of one prompt (an optional system message, then the
user message), the ability that decides how it is graded (``"math"`` or ``"code"``), the ground
truth the grader compares with, and where it came from.

:func:`prime_jax.data.readers.read_problems` reads

* local JSONL / JSON / Parquet files (or a directory holding ``{split}.parquet`` etc.) in the
  Eurus-2-RL-Data / veRL schema ``{data_source, prompt: [chat messages], ability,
  reward_model: {style, ground_truth}, extra_info: {split, index}}``;
* Eurus-2-RL-Data rows before PRIME's conversion (``{source, instruction, task, reference}``);
* local files in each benchmark's own format (MATH-500 / MATH, AIME24, AMC23, Minerva,
  OlympiadBench, GSM8K), the format being detected from the fields;
* the benchmarks packaged with prime-jax, by name (see :data:`BENCHMARKS`);
* anything else as a Hugging Face dataset name, through ``datasets.load_dataset``.

Malformed rows (bad JSON, missing fields, empty answer, ...) are skipped and counted, by reason,
in a :class:`SkipStats`; they are never fatal. This module imports no model code (no jax).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import numbers
import re
from typing import Any

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Data a run cannot use (no usable rows, an unknown source, no prompt that fits, an
    undetectable format); ``str(error)`` is one line that says what and how to fix it."""


class DataUnavailableError(DataError, RuntimeError):
    """A Hugging Face dataset that could not be loaded (network, cache, name)."""

# --------------------------------------------------------------------------------------------
# Prompt pieces (Eurus-2 / PRIME)
# --------------------------------------------------------------------------------------------

#: Appended to every math problem (Eurus-2-7B-SFT's math prompt; PRIME evaluates with it).
MATH_TASK_SUFFIX = "\n\nPresent the answer in LaTex format: \\boxed{Your answer}"

#: The paper's chain-of-thought instruction (the Qwen2.5-Math evaluation prompt, used for instruct models).
STEP_BY_STEP_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."

#: ``data.instruction``'s named instructions: what follows a math problem's text in its user message.
INSTRUCTIONS = {"eurus2": MATH_TASK_SUFFIX, "step_by_step": STEP_BY_STEP_SUFFIX, "none": ""}


def instruction_suffix(instruction: str) -> str:
    """The suffix of ``data.instruction``: a named one (:data:`INSTRUCTIONS`), else the text itself
    after a blank line (a user's own instruction)."""
    if instruction in INSTRUCTIONS:
        return INSTRUCTIONS[instruction]
    return "\n\n" + instruction.strip()


def instruction_error(instruction: str) -> str | None:
    """Why ``data.instruction`` is unusable (None when it is fine): a single word that is no named
    instruction is a typo, not an instruction."""
    text = instruction.strip()
    if instruction in INSTRUCTIONS or (text and not re.fullmatch(r"[\w.-]+", text)):
        return None
    return (f"must be one of {sorted(INSTRUCTIONS)} or your own instruction (a sentence, e.g. 'Put the final answer "
            f"in \\boxed{{}}.'), got {instruction!r}")

#: The last line of a worked solution in the SFT demonstrations (generated word problems, GSM8K rewritten).
ANSWER_LINE = "The answer is \\boxed{{{}}}."

#: Appended to every coding problem (Eurus-2-7B-SFT's coding prompt).
CODE_TASK_SUFFIX = (
    "\n\nWrite Python code to solve the problem. Present the code in \n```python\nYour code\n```"
    "\nat the end."
)

#: The action-tag system prompt that Eurus-2-RL-Data rows carry (PRIME-RL/PRIME,
#: training data preparation script, Apache-2.0). Rows read from that data set already hold it;
#: pass it as ``system_prompt=`` to give benchmark problems the same system message.
EURUS2_SYSTEM_PROMPT = """
When tackling complex reasoning tasks, you have access to the following actions. Use them as needed to progress through your thought process.

[ASSESS]

[ADVANCE]

[VERIFY]

[SIMPLIFY]

[SYNTHESIZE]

[PIVOT]

[OUTPUT]

You should strictly follow the format below:

[ACTION NAME]

# Your action step 1

# Your action step 2

# Your action step 3

...

Next action: [NEXT ACTION NAME]

"""

ABILITIES = ("math", "code")

# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Problem:
    """One prompt: chat messages (system optional, then user), how to grade it, and provenance.

    ``meta`` holds optional extras (benchmark level/subject, the synthetic task's steps, the
    veRL row's ``extra_info``); nothing depends on it.
    """

    messages: list[dict]
    ability: str
    ground_truth: str
    source: str
    id: str
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def user_content(self) -> str:
        """Content of the last user message (the problem text with its task suffix)."""
        for m in reversed(self.messages):
            if m.get("role") == "user":
                return m["content"]
        return ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Problem":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def to_verl_row(self, split: str = "train", index: int = 0) -> dict:
        """This problem as a row of the Eurus-2-RL-Data / veRL schema."""
        return {
            "data_source": self.source,
            "prompt": [dict(m) for m in self.messages],
            "ability": self.ability,
            "reward_model": {"style": "rule", "ground_truth": self.ground_truth},
            "extra_info": {"split": split, "index": index},
        }


@dataclasses.dataclass
class SkipStats:
    """What a reader or renderer kept and skipped. ``total == kept + n_skipped``.

    ``skipped`` counts rows by reason (``"bad_json"``, ``"missing_field:answer"``,
    ``"empty_answer"``, ``"prompt_too_long"``, ...); ``first_seen`` says where each reason was
    first met (e.g. ``"row 17"``), to find the culprit quickly.
    """

    source: str = ""
    total: int = 0
    kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_seen: dict = dataclasses.field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def keep(self) -> None:
        self.total += 1
        self.kept += 1

    def skip(self, reason: str, where: str | None = None) -> None:
        self.total += 1
        self.skipped[reason] += 1
        if where is not None and reason not in self.first_seen:
            self.first_seen[reason] = where

    def merge(self, other: "SkipStats") -> "SkipStats":
        out = SkipStats(
            source=self.source if self.source == other.source else f"{self.source}+{other.source}",
            total=self.total + other.total,
            kept=self.kept + other.kept,
            skipped=self.skipped + other.skipped,
            first_seen={**other.first_seen, **self.first_seen},
        )
        return out

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "total": self.total,
            "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
        }

    def summary(self) -> str:
        s = f"{self.source or 'data'}: kept {self.kept}/{self.total}"
        if self.skipped:
            reasons = ", ".join(
                f"{r}={n}" + (f" (first at {self.first_seen[r]})" if r in self.first_seen else "")
                for r, n in sorted(self.skipped.items())
            )
            s += f", skipped {self.n_skipped}: {reasons}"
        return s

    def log(self, log: logging.Logger | None = None) -> None:
        """Log the summary: a warning when something was skipped, info otherwise."""
        (log or logger).log(logging.WARNING if self.skipped else logging.INFO, "%s", self.summary())

    __str__ = summary


class _Skip(Exception):
    """Raised by a row parser: the row is malformed; ``reason`` is counted."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Small text helpers
# --------------------------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces matched.

    Also accepts the brace-less form ``\\boxed 2`` (the argument runs to the next space or
    ``$``). Returns ``None`` when there is none or its braces are unbalanced.
    """
    if not isinstance(text, str):
        return None
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    j = idx + (6 if text.startswith("\\boxed", idx) else 5)
    if j < len(text) and text[j] == " ":
        m = re.match(r" +([^ $\n]+)", text[j:])
        return m.group(1).rstrip(".,;") if m else None
    while j < len(text) and text[j].isspace():
        j += 1
    if j >= len(text) or text[j] != "{":
        return None
    depth = 0
    for k in range(j, len(text)):
        c = text[k]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1 : k]
    return None


def _answer_to_str(x: Any) -> str:
    """A ground truth as a string: 27.0 -> "27", 0.5 -> "0.5", strings stripped."""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, numbers.Integral):
        return str(int(x))
    if isinstance(x, numbers.Real):
        f = float(x)
        if math.isfinite(f) and f.is_integer():
            return str(int(f))
        return repr(f)
    if isinstance(x, str):
        return x.strip()
    if isinstance(x, (list, tuple, dict)):
        return json.dumps(x, ensure_ascii=False)
    return str(x).strip()


def _strip_dollars(s: str) -> str:
    """Remove unescaped ``$`` math delimiters: ``"$69$,$84$"`` -> ``"69,84"``."""
    return re.sub(r"(?<!\\)\$", "", s).strip()


def apply_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """``None``: messages unchanged; ``""``: system messages removed; text: it becomes the
    (single, first) system message."""
    if system_prompt is None:
        return messages
    rest = [m for m in messages if m.get("role") != "system"]
    if system_prompt == "":
        return rest
    return [{"role": "system", "content": system_prompt}] + rest


def _require(row: dict, *keys: str) -> list[Any]:
    out = []
    for k in keys:
        v = row.get(k)
        if v is None:
            raise _Skip(f"missing_field:{k}")
        out.append(v)
    return out


def _text(row: dict, *keys: str) -> str:
    """The first present, non-empty string field among ``keys``."""
    present = False
    for k in keys:
        v = row.get(k)
        if v is None:
            continue
        present = True
        if isinstance(v, str) and v.strip():
            return v
    raise _Skip("empty_problem" if present else f"missing_field:{keys[0]}")


def _nonempty_answer(s: str) -> str:
    if not s or not s.strip():
        raise _Skip("empty_answer")
    return s.strip()


def _row_id(row: dict, key: str, fallback: int) -> str:
    v = row.get(key)
    return str(v) if v is not None and str(v) != "" else str(fallback)
