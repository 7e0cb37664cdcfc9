"""Math outcome verifier: extract the final answer and grade it against the ground truth.

``grade(response, ground_truth)`` is 1.0 when the response's final answer is mathematically
equivalent to the ground truth, else 0.0 (no answer: 0.0).  Equivalence is decided in order by

1. a normalised string match (``$``, ``\\text{}``, units, ``\\left/\\right``, ``\\dfrac``, spaces,
   degree signs, ``x =`` prefixes, thousands separators, trailing periods, ... removed);
2. an exact numeric comparison when both sides are plain numbers (integers, decimals, fractions;
   with a percent sign on either side also the x100 / /100 readings);
3. ``math_verify`` (parse both, symbolic/numeric ``verify``) for everything else: expressions,
   radicals, ``\\pi``, intervals, tuples, sets, matrices, equations.

Pure-text answers (``\\text{east}``) are compared as strings only (math-verify would read them as
products of symbols and accept anagrams).  Answers whose evaluation could explode (towers of
exponents, huge exponents or factorials, very long strings) never reach sympy.

``grade`` runs in the calling process with no time limit of its own; trainers use
:class:`MathGrader` / :func:`grade_batch`, which grade in worker processes with a time budget per
answer (math-verify relies on ``signal.alarm``, so it must never run in threads or in the
trainer's process).  This module does not import jax or any model code.
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Sequence

from prime_jax.rewards.pool import BatchResult, GradingPool, Task

__all__ = ["extract_answer", "normalize_answer", "is_equiv", "grade", "MathGrader", "grade_batch",
           "MAX_RESPONSE_CHARS"]

MAX_RESPONSE_CHARS = 65536  # only the last 64k characters of a response are considered
MAX_ANSWER_CHARS = 4096  # a boxed answer longer than this (or unbalanced within it) is no answer
_PHRASE_TAIL_CHARS = 4096  # "the answer is ..." is looked for in the last 4k characters
_SYMBOLIC_MAX_CHARS = 1000  # longer answers are compared as strings only

# ------------------------------------------------------------------------------ extraction
_BOX_CMDS = ("\\boxed", "\\fbox")
_PHRASE_RE = re.compile(
    r"(?:final\s+answer|the\s+answer)\s*(?:is|:|=)\s*:?\s*([^\n]{1,400})", re.IGNORECASE)


def _match_braces(text: str, open_idx: int, limit: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_idx`` (escapes skipped), or None."""
    depth = 0
    i, end = open_idx, min(len(text), open_idx + limit + 2)
    while i < end:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


_NOT_FOUND = object()


def _last_boxed(text: str):
    """Content of the last ``\\boxed{...}`` / ``\\boxed x`` / ``\\fbox{...}``.

    Returns ``_NOT_FOUND`` when there is none, None when the last one is broken (unbalanced,
    empty or too long)."""
    end = len(text)
    for _ in range(64):  # skip look-alike macros such as \boxedtext, a bounded number of times
        pos, cmd = max((text.rfind(c, 0, end), c) for c in _BOX_CMDS)
        if pos < 0:
            return _NOT_FOUND
        j = pos + len(cmd)
        while j < len(text) and text[j] == " " and j - pos < 64:
            j += 1
        if j < len(text) and text[j] == "{":
            close = _match_braces(text, j, MAX_ANSWER_CHARS)
            if close is None:
                return None
            content = text[j + 1: close].strip()
            return content or None
        if j > pos + len(cmd) and j < len(text):  # "\boxed 5": one token after the space
            m = re.match(r"[^\s$]{1,200}", text[j: j + 201])
            if m:
                return m.group(0).rstrip(".,;") or None
            return None
        if j < len(text) and not text[j].isalpha():  # "\boxed5" style
            m = re.match(r"[0-9.+\-]{1,200}", text[j: j + 201])
            if m:
                return m.group(0)
        end = pos  # \boxedfoo: a different macro, look further back
    return _NOT_FOUND


def _last_hashes(text: str) -> str | None:
    """GSM8K style ``#### 18`` (the first line after the last ``####``)."""
    pos = text.rfind("####")
    if pos < 0:
        return None
    line = text[pos + 4: pos + 4 + 400].lstrip("# \t").split("\n", 1)[0].strip()
    if not line or re.match(r"[A-Za-z]{2,}", line):  # a markdown header ("#### Step 2"), not an answer
        return None
    return line


def _phrase_answer(text: str) -> str | None:
    tail = text[-_PHRASE_TAIL_CHARS:]
    last = None
    for last in _PHRASE_RE.finditer(tail):
        pass
    if last is None:
        return None
    ans = last.group(1).strip().strip("*").strip()
    m = re.search(r"\$\$?(.+?)\$\$?", ans)
    if m:
        ans = m.group(1)
    else:
        ans = re.split(r"\.\s|\.$", ans, maxsplit=1)[0]
    ans = ans.strip().rstrip(".").strip()
    return ans or None


def extract_answer(text: str) -> str | None:
    """The final answer of ``text``, or None.

    Looks at the last :data:`MAX_RESPONSE_CHARS` characters (null bytes removed) for, in order:
    the last ``\\boxed{...}`` (brace-matched; also ``\\boxed 5`` and ``\\fbox{...}``; if the last
    one is broken, there is no answer), GSM8K's ``#### 18``, then "the answer is ..." /
    "final answer: ..." (the last such phrase; ``$...$`` inside it is unwrapped)."""
    if not isinstance(text, str) or not text:
        return None
    if len(text) > MAX_RESPONSE_CHARS:
        text = text[-MAX_RESPONSE_CHARS:]
    if "\x00" in text:
        text = text.replace("\x00", "")
    boxed = _last_boxed(text)
    if boxed is not _NOT_FOUND:
        return boxed
    return _last_hashes(text) or _phrase_answer(text)


# ------------------------------------------------------------------------------ normalisation
_TEXT_MACROS = ("\\text", "\\textbf", "\\textit", "\\textrm", "\\mbox", "\\mathrm", "\\mathbf",
                "\\boldsymbol", "\\mathit", "\\operatorname")
_UNITS = (
    r"(?:square|sq\.?|cubic|cu\.?)?\s*(?:units?|cm|mm|km|meters?|metres?|centimeters?|millimeters?"
    r"|kilometers?|inches|inch|feet|foot|ft|yards?|yd|miles?|mi|degrees?|deg|radians?|rad"
    r"|dollars?|cents?|hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|weeks?|months?|years?"
    r"|pounds?|lbs?|ounces?|oz|grams?|kg|kilograms?|liters?|litres?|gallons?|mph|kph|km/h"
    r"|percent|people|persons?|students?|points?|ways?|times|sq\s*ft|sq\s*units)"
    r"(?:\s*\^\s*\{?[23]\}?|²|³)?")
_UNIT_SUFFIX_RE = re.compile(r"^(.*?[0-9}).)])\s*(?:" + _UNITS + r")\s*\.?$", re.IGNORECASE)
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_CHOICE_RE = re.compile(r"^\(?([A-Ea-e])\)?$")
_VAR_PREFIX_RE = re.compile(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?[\w]+\}?)?(?:\([a-zA-Z]\))?=(?!=)")


def _unwrap_macros(s: str, names: Sequence[str]) -> str:
    """``\\text{abc}`` -> ``abc`` for the given macros (brace-matched, bounded passes)."""
    for _ in range(32):
        best = None
        for name in names:
            i = s.find(name + "{")
            if i >= 0 and (best is None or i < best[0]):
                best = (i, name)
        if best is None:
            return s
        i, name = best
        j = i + len(name)
        close = _match_braces(s, j, len(s))
        if close is None:
            return s
        s = s[:i] + s[j + 1: close] + s[close + 1:]
    return s


def normalize_answer(ans: str) -> str:
    """Canonical string form used for the exact-match stage (idempotent on its own output)."""
    s = ans.replace("\x00", "").strip()
    if not s:
        return ""
    if "\\boxed" in s or "\\fbox" in s:
        inner = _last_boxed(s)
        if isinstance(inner, str):
            s = inner
    s = s.replace("\n", " ").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:displaystyle|textstyle|scriptstyle)", "", s)
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = s.replace("\\!", "").replace("\\,", " ").replace("\\;", " ").replace("\\:", " ")
    s = s.replace("\\ ", " ").replace("~", " ").replace("\\quad", " ").replace("\\qquad", " ")
    s = _unwrap_macros(s, _TEXT_MACROS)
    # degrees
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree(?![a-zA-Z])", "", s)
    # percent
    s = s.replace("\\%", "").replace("%", "")
    s = s.strip()
    m = _UNIT_SUFFIX_RE.match(s)
    if m:
        s = m.group(1)
    if _THOUSANDS_RE.match(s.replace("{,}", ",")):
        s = s.replace("{,}", "").replace(",", "")
    s = re.sub(r"(\d)\{,\}(\d{3})", r"\1\2", s)
    s = re.sub(r"\s+", "", s)
    # x = 5 -> 5 (a single variable or \theta on the left of the only "=")
    if s.count("=") == 1 and _VAR_PREFIX_RE.match(s):
        s = s.split("=", 1)[1]
    # \frac12 -> \frac{1}{2}, \frac{a}2 -> \frac{a}{2}, \frac3{4} -> \frac{3}{4}, \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\{[^{}]*\})(\d)", r"\\frac\1{\2}", s)
    s = re.sub(r"\\frac(\d)(\{)", r"\\frac{\1}\2", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    s = re.sub(r"\\leq?(?![a-zA-Z])", r"\\le", s)
    s = re.sub(r"\\geq?(?![a-zA-Z])", r"\\ge", s)
    s = s.replace("\\varnothing", "\\emptyset").replace("\\infin", "\\infty")
    s = re.sub(r"(?<![\d}a-zA-Z])\.(\d)", r"0.\1", s)  # .5 -> 0.5
    s = re.sub(r"^\+", "", s)
    s = s.rstrip(".").rstrip("\\").strip()
    m = _CHOICE_RE.match(s)
    if m:
        s = m.group(1).upper()
    if re.fullmatch(r"[A-Za-z][A-Za-z ]*[A-Za-z]", s):
        s = s.lower()
    return s


# ------------------------------------------------------------------------------ numbers
_INT_RE = re.compile(r"[+-]?\d{1,400}")
_DEC_RE = re.compile(r"[+-]?(?:\d{1,400}\.\d{0,400}|\.\d{1,400})")
_SLASH_RE = re.compile(r"([+-]?\d{1,400})/(\d{1,400})")
_FRAC_RE = re.compile(r"([+-]?)\\frac\{([+-]?\d{1,400})\}\{(\d{1,400})\}")


def _to_number(s: str) -> Fraction | None:
    """Exact value of a plain number: integer, decimal, ``a/b`` or ``\\frac{a}{b}``."""
    try:
        if _INT_RE.fullmatch(s) or _DEC_RE.fullmatch(s):
            return Fraction(s)
        m = _SLASH_RE.fullmatch(s)
        if m:
            return Fraction(int(m.group(1)), int(m.group(2)))
        m = _FRAC_RE.fullmatch(s)
        if m:
            v = Fraction(int(m.group(2)), int(m.group(3)))
            return -v if m.group(1) == "-" else v
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _num_equal(a: Fraction, b: Fraction) -> bool:
    if a == b:
        return True
    if a.denominator == 1 and b.denominator == 1:
        return False  # integers: exact only
    return abs(a - b) <= Fraction(1, 10**6) * max(Fraction(1), abs(b))


def _has_percent(s: str) -> bool:
    return "%" in s or "percent" in s.lower()


# ------------------------------------------------------------------------------ guards
_BIG_DIGITS = re.compile(r"\d{5,}")


def _exponent_groups(s: str):
    """Yield the exponent text following each ``^`` (braced group, or one token)."""
    for m in re.finditer(r"\^", s):
        j = m.end()
        while j < len(s) and s[j] == " ":
            j += 1
        if j < len(s) and s[j] == "{":
            close = _match_braces(s, j, 400)
            yield s[j + 1: close] if close is not None else s[j:]
            nxt = close + 1 if close is not None else len(s)
        else:
            t = re.match(r"\\[a-zA-Z]+|\d+|.", s[j:])
            yield t.group(0) if t else ""
            nxt = j + (len(t.group(0)) if t else 0)
        if s[nxt: nxt + 1] == "^":
            yield "^"  # a^b^c


def _risky(s: str) -> bool:
    """Would sympy risk an enormous evaluation on this answer?"""
    if len(s) > _SYMBOLIC_MAX_CHARS:
        return True
    if "**" in s and ("**" in s.split("**", 1)[1] or _BIG_DIGITS.search(s.split("**", 1)[1])):
        return True
    if "^" in s:
        for e in _exponent_groups(s):
            if "^" in e or "**" in e or "!" in e or _BIG_DIGITS.search(e):
                return True
    depth = deepest = 0
    for c in s:
        if c in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]}":
            depth -= 1
    if deepest > 12:  # the LaTeX parser backtracks badly on deep nesting
        return True
    if re.search(r"\d{4,}\s*!", s) or re.search(r"!\s*!", s) or "\\uparrow" in s:
        return True
    return False


# ------------------------------------------------------------------------------ equivalence
def _mv_parse(expr: str):
    from math_verify import parse  # slow (sympy): loaded by the grading workers only
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

    cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
    wrapped = expr if ("\\boxed" in expr) else "\\boxed{" + expr + "}"
    out = parse(wrapped, extraction_config=cfg, parsing_timeout=None)
    if not out:
        out = parse("$" + expr + "$", extraction_config=cfg, parsing_timeout=None)
    return out


def _math_verify_equiv(pred: str, gt: str) -> bool:
    import math_verify  # slow (sympy): loaded by the grading workers only
    import math_verify.grader
    import math_verify.parser

    # Timeouts are enforced by the caller (worker soft limit + hard kill), not by signal.alarm
    # inside math-verify, whose warning about that is silenced here.
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    gold = _mv_parse(gt)
    target = _mv_parse(pred)
    if not gold or not target:
        return False
    return bool(math_verify.verify(gold, target, timeout_seconds=None))


def is_equiv(pred: str, ground_truth: str) -> bool:
    """Whether the extracted answer ``pred`` is equivalent to ``ground_truth``."""
    if not isinstance(pred, str) or not isinstance(ground_truth, str):
        return False
    pred = pred.replace("\x00", "")
    ground_truth = ground_truth.replace("\x00", "")
    a, b = normalize_answer(pred), normalize_answer(ground_truth)
    if not a or not b:
        return False
    if a == b:
        return True
    na, nb = _to_number(a), _to_number(b)
    if na is not None and nb is not None:
        if _num_equal(na, nb):
            return True
        if _has_percent(pred) or _has_percent(ground_truth):
            return _num_equal(na * 100, nb) or _num_equal(na, nb * 100)
        return False
    # pure text answers ("east", "Evelyn", "even"): strings only
    if re.fullmatch(r"[a-z][a-z ]+", a) or re.fullmatch(r"[a-z][a-z ]+", b):
        return False
    if _risky(pred) or _risky(ground_truth) or _risky(a) or _risky(b):
        return False
    try:
        return _math_verify_equiv(pred, ground_truth)
    except Exception:  # noqa: BLE001 - unparseable model output is simply not equivalent
        return False


def _clean_ground_truth(gt: str) -> str:
    gt = gt.replace("\x00", "").strip()
    if "\\boxed" in gt or "\\fbox" in gt:
        inner = _last_boxed(gt)
        if isinstance(inner, str):
            return inner
    if "####" in gt:
        inner = _last_hashes(gt)
        if inner:
            return inner
    return gt


def grade(response: str, ground_truth: str) -> float:
    """1.0 if the final answer of ``response`` is equivalent to ``ground_truth``, else 0.0.

    Runs in the calling process without a time limit: use :class:`MathGrader` or
    :func:`grade_batch` for untrusted responses."""
    if not isinstance(ground_truth, str):
        ground_truth = str(ground_truth)
    ans = extract_answer(response)
    if ans is None:
        return 0.0
    return 1.0 if is_equiv(ans, _clean_ground_truth(ground_truth)) else 0.0


# ------------------------------------------------------------------------------ batch grading
def _clip(text) -> str:
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    return text[-MAX_RESPONSE_CHARS:]


def math_tasks(responses: Sequence[str], ground_truths: Sequence[str], timeout: float) -> list[Task]:
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    return [Task("prime_jax.rewards.math:grade", (_clip(r), _clip(g)), budget=timeout, soft=True)
            for r, g in zip(responses, ground_truths)]


class MathGrader(GradingPool):
    """A pool of grading processes kept across trainer steps.

    >>> with MathGrader(num_workers=4, timeout=5.0) as grader:
    ...     res = grader.grade_batch(responses, answers)
    ...     res.scores, res.timeouts, res.errors, grader.stats

    Each answer gets ``timeout`` seconds (a soft limit inside the worker, then a hard kill and a
    fresh worker ``kill_grace`` seconds later); a timeout or a crash scores 0.0 and is counted.
    """

    def __init__(self, num_workers: int | None = None, timeout: float = 5.0, **kwargs):
        super().__init__(num_workers, **kwargs)
        self.timeout = float(timeout)

    def grade_batch(self, responses: Sequence[str], ground_truths: Sequence[str],
                    timeout: float | None = None) -> BatchResult:
        return self.run(math_tasks(responses, ground_truths, self.timeout if timeout is None else timeout))


def grade_batch(responses: Sequence[str], ground_truths: Sequence[str], timeout: float = 5.0,
                num_workers: int | None = None) -> BatchResult:
    """Grade a batch in a temporary process pool. The result is a ``list[float]`` of scores
    that also carries ``.statuses``, ``.timeouts`` and ``.errors`` (see :class:`BatchResult`).
    For repeated use keep a :class:`MathGrader` open instead (workers start once)."""
    with MathGrader(num_workers=num_workers, timeout=timeout) as grader:
        return grader.grade_batch(responses, ground_truths)
