"""Row formats: how a row of each source's own layout (veRL / Eurus-2-RL-Data, MATH, AIME24,
AMC23, Minerva, OlympiadBench, GSM8K) becomes a :class:`Problem`, and which format a row has.
A row that does not parse raises ``_Skip`` with the reason (counted by the reader)."""
from __future__ import annotations

from __future__ import annotations

import logging
import numbers
import re
from typing import Any

logger = logging.getLogger(__name__)

from .problems import ABILITIES, ANSWER_LINE, EURUS2_SYSTEM_PROMPT, Problem, _Skip, _answer_to_str, _nonempty_answer, _require, _row_id, _strip_dollars, _text, last_boxed


# --------------------------------------------------------------------------------------------
# Row parsers, one per format. Each returns a Problem or raises _Skip.
# --------------------------------------------------------------------------------------------


def _math_problem(text: str, gt: str, source: str, pid: str, suffix: str, meta=None) -> Problem:
    return Problem(
        messages=[{"role": "user", "content": text + suffix}],
        ability="math",
        ground_truth=_nonempty_answer(gt),
        source=source,
        id=pid,
        meta=meta or {},
    )


def _parse_verl(row: dict, i: int, source: str, suffix: str) -> Problem:
    prompt, ability, rm = _require(row, "prompt", "ability", "reward_model")
    if hasattr(prompt, "tolist"):  # numpy array (pandas-read parquet)
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise _Skip("bad_prompt")
    messages = []
    for m in prompt:
        if not isinstance(m, dict):
            raise _Skip("bad_prompt")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise _Skip("bad_prompt")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise _Skip("bad_prompt")
    if not isinstance(ability, str) or ability.lower() not in ABILITIES:
        raise _Skip("bad_ability")
    if not isinstance(rm, dict):
        raise _Skip("missing_field:reward_model.ground_truth")
    gt = rm.get("ground_truth")
    if gt is None:
        raise _Skip("missing_field:reward_model.ground_truth")
    extra = row.get("extra_info")
    meta = {"extra_info": extra} if isinstance(extra, dict) else {}
    if rm.get("style") is not None:
        meta["reward_style"] = rm["style"]
    ds = row.get("data_source")
    return Problem(
        messages=messages,
        ability=ability.lower(),
        ground_truth=_nonempty_answer(_answer_to_str(gt)),
        source=str(ds) if ds else source,
        id=str(i),
        meta=meta,
    )


_EURUS_TASKS = {"math": "math", "coding": "code", "code": "code"}


def _parse_eurus_raw(row: dict, i: int, source: str, suffix: str) -> Problem:
    """Eurus-2-RL-Data before PRIME's conversion: ``{source, instruction, task: "Math" |
    "Coding", reference}``; converted as PRIME's data preparation does (the Eurus-2 system
    prompt, then the instruction, which already carries its task suffix)."""
    text = _text(row, "instruction")
    task, ref = _require(row, "task", "reference")
    ability = _EURUS_TASKS.get(str(task).lower())
    if ability is None:
        raise _Skip("bad_ability")
    ds = row.get("source")
    return Problem(
        messages=[{"role": "system", "content": EURUS2_SYSTEM_PROMPT},
                  {"role": "user", "content": text}],
        ability=ability,
        ground_truth=_nonempty_answer(_answer_to_str(ref)),
        source=str(ds) if ds else source,
        id=str(i),
    )


def _parse_math(row: dict, i: int, source: str, suffix: str) -> Problem:
    text = _text(row, "problem")
    (ans,) = _require(row, "answer")
    meta = {k: row[k] for k in ("level", "type", "subject", "solution") if row.get(k) is not None}
    return _math_problem(text, _answer_to_str(ans), source, _row_id(row, "unique_id", i), suffix, meta)


def _parse_qa(row: dict, i: int, source: str, suffix: str) -> Problem:
    """AIME24 / AMC23: ``problem`` (or ``question``) + ``answer`` (string or number)."""
    text = _text(row, "problem", "question")
    (ans,) = _require(row, "answer")
    return _math_problem(text, _answer_to_str(ans), source, _row_id(row, "id", i), suffix)


def _parse_minerva(row: dict, i: int, source: str, suffix: str) -> Problem:
    text = _text(row, "problem")
    (sol,) = _require(row, "solution")
    ans = last_boxed(sol) if isinstance(sol, str) else None
    if ans is None:
        raise _Skip("no_boxed_answer")
    meta = {"type": row["type"]} if row.get("type") is not None else {}
    return _math_problem(text, ans, source, _row_id(row, "idx", i), suffix, meta)


def _parse_olympiadbench(row: dict, i: int, source: str, suffix: str) -> Problem:
    question = _text(row, "question", "problem")
    context = row.get("context")
    text = f"{context.strip()}\n{question}" if isinstance(context, str) and context.strip() else question
    (fa,) = _require(row, "final_answer")
    items = fa if isinstance(fa, (list, tuple)) else [fa]
    gt = ", ".join(s for s in (_strip_dollars(_answer_to_str(x)) for x in items) if s)
    meta = {k: row[k] for k in ("subfield", "unit", "answer_type", "is_multiple_answer") if row.get(k) is not None}
    return _math_problem(text, gt, source, _row_id(row, "id", i), suffix, meta)


def gsm8k_answer(answer: str) -> str | None:
    """The final answer of a GSM8K solution: the text after the last ``####``, commas removed
    (``"... #### 2,125"`` -> ``"2125"``). ``None`` when there is no ``####``."""
    if not isinstance(answer, str) or "####" not in answer:
        return None
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_demonstration(solution: str) -> str | None:
    """A GSM8K worked solution as an SFT demonstration in the ``\\boxed{}`` answer format: the
    ``<<...>>`` calculator annotations removed and the final ``#### n`` replaced by
    :data:`ANSWER_LINE` (``The answer is \\boxed{n}.``, commas dropped from n). None without ``####``."""
    answer = gsm8k_answer(solution)
    if not answer:
        return None
    body = _CALCULATOR.sub("", solution.rsplit("####", 1)[0])
    lines = [line.rstrip() for line in body.strip().splitlines() if line.strip()]
    return "\n".join([*lines, ANSWER_LINE.format(answer)])


def worked_solution(problem: Problem) -> str | None:
    """The demonstration of a problem read with its worked solution (GSM8K: rewritten by
    :func:`gsm8k_demonstration`; MATH: the solution, which ends in its ``\\boxed{}``), else None."""
    solution = problem.meta.get("solution")
    if not isinstance(solution, str) or not solution.strip():
        return None
    if "####" in solution:
        return gsm8k_demonstration(solution)
    return solution.strip() if last_boxed(solution) is not None else None


def _parse_gsm8k(row: dict, i: int, source: str, suffix: str) -> Problem:
    text = _text(row, "question", "problem")
    (ans,) = _require(row, "answer")
    gt = gsm8k_answer(ans)
    if gt is None:
        raise _Skip("bad_answer_format")
    return _math_problem(text, gt, source, _row_id(row, "idx", i), suffix, {"solution": ans})


_PARSERS = {
    "verl": _parse_verl,
    "eurus_raw": _parse_eurus_raw,
    "math": _parse_math,
    "aime24": _parse_qa,
    "amc23": _parse_qa,
    "minerva": _parse_minerva,
    "olympiadbench": _parse_olympiadbench,
    "gsm8k": _parse_gsm8k,
}
_FMT_ALIASES = {
    "eurus": "verl", "eurus2": "verl", "parquet": "verl",
    "math500": "math", "math_train": "math", "hendrycks_math": "math",
    "aime": "aime24", "amc": "amc23", "qa": "aime24",
    "minerva_math": "minerva",
}
#: Accepted values of ``fmt``.
FORMATS = tuple(_PARSERS) + tuple(_FMT_ALIASES)


def detect_format(row: Any) -> str | None:
    """The format a row's fields say it is in (a key of ``FORMATS``), or ``None``."""
    if not isinstance(row, dict):
        return None
    has = lambda k: row.get(k) is not None  # noqa: E731
    if has("prompt") and has("reward_model"):
        return "verl"
    if has("instruction") and has("reference") and has("task"):
        return "eurus_raw"
    if has("final_answer"):
        return "olympiadbench"
    if (has("question") or has("problem")) and isinstance(row.get("answer"), str) and "####" in row["answer"]:
        return "gsm8k"
    if has("problem") and has("answer") and has("unique_id"):
        return "math"
    if has("problem") and has("solution") and "answer" not in row:
        return "minerva"
    if (has("problem") or has("question")) and has("answer"):
        a = row["answer"]
        return "amc23" if isinstance(a, numbers.Real) and not isinstance(a, bool) else "aime24"
    return None


#: The fields each format reads (what `detect_format` looks for), for error messages and docs.
FORMAT_FIELDS = {
    "verl": "prompt (chat messages), ability, reward_model.ground_truth",
    "eurus_raw": "instruction, reference, task",
    "math": "problem, answer, unique_id",
    "aime24": "problem or question, answer",
    "amc23": "problem or question, answer (a number)",
    "minerva": "problem, solution with \\boxed{}",
    "olympiadbench": "question, final_answer",
    "gsm8k": "question, answer ending '#### N'",
}


def format_layouts() -> str:
    """'name (fields); ...' for every format, one line."""
    return "; ".join(f"{name} ({fields})" for name, fields in FORMAT_FIELDS.items())


def _canonical_fmt(fmt: str) -> str:
    f = fmt.lower()
    f = _FMT_ALIASES.get(f, f)
    if f not in _PARSERS:
        raise ValueError(f"unknown fmt {fmt!r}; expected one of {sorted(FORMATS)}")
    return f
