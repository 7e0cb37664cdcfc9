"""Problems: the unit of data PRIME trains and evaluates on, and readers for every source.

A :class:`Problem` holds the chat messages of one prompt (an optional system message, then the
user message), the ability that decides how it is graded (``"math"`` or ``"code"``), the ground
truth the grader compares with, and where it came from.

:func:`read_problems` reads

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
import importlib.resources
import itertools
import json
import logging
import math
import numbers
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

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
    meta = {k: row[k] for k in ("level", "type", "subject") if row.get(k) is not None}
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


def _parse_gsm8k(row: dict, i: int, source: str, suffix: str) -> Problem:
    text = _text(row, "question", "problem")
    (ans,) = _require(row, "answer")
    gt = gsm8k_answer(ans)
    if gt is None:
        raise _Skip("bad_answer_format")
    return _math_problem(text, gt, source, _row_id(row, "idx", i), suffix)


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


# --------------------------------------------------------------------------------------------
# Raw row sources. Each yields (row_number, row) where row is a dict or a _Skip.
# --------------------------------------------------------------------------------------------

def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        i = 0
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, ValueError):
                row = _Skip("bad_json")
            yield i, row
            i += 1


def _iter_json(path: Path) -> Iterator[tuple[int, Any]]:
    """A JSON array of rows, or a pandas column-oriented object ``{col: {idx: value}}``."""
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = json.load(f)
        except (json.JSONDecodeError, ValueError):
            # Maybe it is JSONL with a .json name.
            yield from _iter_jsonl(path)
            return
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        keys = list(next(iter(data.values())).keys())
        data = [{c: data[c].get(k) for c in data} for k in keys]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of rows")
    yield from enumerate(data)


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield i, row
            i += 1


def _iter_file(path: Path) -> Iterator[tuple[int, Any]]:
    name = path.name.lower()
    if name.endswith(".parquet") or name.endswith(".pq"):
        return _iter_parquet(path)
    if name.endswith(".json"):
        return _iter_json(path)
    return _iter_jsonl(path)


def _iter_hf(name: str, split: str) -> Iterator[tuple[int, Any]]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise RuntimeError("reading a Hugging Face dataset needs the `datasets` package") from e
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network down, unknown name, missing split, ...
        raise DataUnavailableError(
            f"could not load Hugging Face dataset {name!r} (split {split!r}): "
            f"{type(e).__name__}: {e}. It is not a local path or a packaged benchmark "
            f"({', '.join(BENCHMARKS)}); if the network is unavailable, download the data "
            f"elsewhere and pass the local .parquet/.jsonl path instead."
        ) from e
    return enumerate(ds)


# --------------------------------------------------------------------------------------------
# Packaged benchmarks
# --------------------------------------------------------------------------------------------

#: Packaged benchmarks: name -> (file under prime_jax/data/benchmarks, format).
BENCHMARKS: dict[str, tuple[str, str]] = {
    "math500": ("math500/test.jsonl", "math"),
    "aime24": ("aime24/test.jsonl", "aime24"),
    "amc23": ("amc23/test.jsonl", "amc23"),
    "minerva_math": ("minerva_math/test.jsonl", "minerva"),
    "olympiadbench": ("olympiadbench/test.jsonl", "olympiadbench"),
    "gsm8k": ("gsm8k/test.jsonl", "gsm8k"),
    "math_train": ("math/train.jsonl", "math"),
}
_BENCH_ALIASES = {"math-500": "math500", "minerva": "minerva_math", "amc": "amc23", "aime": "aime24",
                  "olympiad": "olympiadbench", "math": "math_train"}

#: PRIME's five math benchmarks (the published table's order).
MATH_EVAL_BENCHMARKS = ("aime24", "amc23", "math500", "minerva_math", "olympiadbench")


def benchmarks_dir() -> Path:
    """Folder of the packaged benchmark files (found through importlib.resources)."""
    try:
        root = importlib.resources.files(__package__ or "prime_jax.data") / "benchmarks"
        p = Path(str(root))
        if p.is_dir():
            return p
    except (ModuleNotFoundError, TypeError):  # pragma: no cover
        pass
    return Path(__file__).resolve().parent / "benchmarks"


def _benchmark_name(name: str) -> str | None:
    n = name.lower()
    n = _BENCH_ALIASES.get(n, n)
    return n if n in BENCHMARKS else None


def benchmark_path(name: str) -> Path:
    """Path of a packaged benchmark's file."""
    n = _benchmark_name(name)
    if n is None:
        raise KeyError(f"unknown benchmark {name!r}; packaged: {', '.join(BENCHMARKS)}")
    return benchmarks_dir() / BENCHMARKS[n][0]


def load_benchmark(
    name: str, *, system_prompt: str | None = None, task_suffix: str | None = None
) -> tuple[list[Problem], SkipStats]:
    """Problems of a packaged benchmark (``"math500"``, ``"aime24"``, ``"amc23"``,
    ``"minerva_math"``, ``"olympiadbench"``, ``"gsm8k"``, ``"math_train"``), offline.
    ``source`` of each problem is the benchmark's name."""
    n = _benchmark_name(name)
    if n is None:
        raise KeyError(f"unknown benchmark {name!r}; packaged: {', '.join(BENCHMARKS)}")
    return read_problems(
        benchmark_path(n), fmt=BENCHMARKS[n][1], system_prompt=system_prompt,
        task_suffix=task_suffix, source=n,
    )


# --------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------

_DATA_EXTS = (".parquet", ".pq", ".jsonl", ".json")


def _looks_like_path(s: str) -> bool:
    return (
        s.startswith((".", "/", "~"))
        or os.sep in s and not re.fullmatch(r"[\w.-]+/[\w.-]+", s)
        or s.lower().endswith(_DATA_EXTS)
    )


def _resolve_dir(d: Path, split: str) -> Path:
    for ext in _DATA_EXTS:
        p = d / f"{split}{ext}"
        if p.is_file():
            return p
    files = sorted(p for p in d.iterdir() if p.is_file() and p.name.lower().endswith(_DATA_EXTS))
    if len(files) == 1:
        return files[0]
    raise FileNotFoundError(
        f"{d}: no {split}.parquet/.jsonl/.json, and {len(files)} data files to choose from; "
        "pass the file itself"
    )


def check_source_name(s: str) -> None:
    """Raises DataError when `s` is neither an existing path, a packaged benchmark, nor shaped like
    a Hugging Face dataset id (owner/name): a typo, reported at once rather than after the hub
    client's retries."""
    if Path(s).expanduser().exists() or _benchmark_name(s) is not None or "/" in s.strip("/"):
        return
    import difflib

    close = difflib.get_close_matches(s.lower(), [*BENCHMARKS, *_BENCH_ALIASES], n=2)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise DataError(f"unknown data source {s!r}{hint}: not a file or folder, not a packaged benchmark "
                    f"({', '.join(BENCHMARKS)}), nor a Hugging Face dataset id (owner/name)")


def read_problems(
    path_or_name: str | os.PathLike,
    *,
    fmt: str | None = None,
    split: str = "train",
    system_prompt: str | None = None,
    task_suffix: str | None = None,
    source: str | None = None,
) -> tuple[list[Problem], SkipStats]:
    """Read problems from a local file/directory, a packaged benchmark, or a HF dataset.

    Args:
      path_or_name: a local ``.jsonl``/``.json``/``.parquet`` file; a directory holding
        ``{split}.parquet`` (or ``.jsonl``/``.json``), or a single data file; the name of a
        packaged benchmark (:data:`BENCHMARKS`); otherwise a Hugging Face dataset name, read
        with ``datasets.load_dataset(name, split=split)`` (needs the network or the HF cache;
        failure raises a ``DataUnavailableError`` (a RuntimeError) saying so). Any other name
        raises ``DataError`` at once (a typo, not a hub id).
      fmt: one of :data:`FORMATS`; ``None`` detects it from the first rows' fields (a file
        whose fields match no format raises ``DataError`` listing :data:`FORMAT_FIELDS`).
      split: the split of a HF dataset, or the file name stem inside a directory.
      system_prompt: ``None`` keeps the rows' messages as they are (benchmark rows get no
        system message); ``""`` removes system messages; any other text becomes the system
        message.
      task_suffix: appended to the problem text of benchmark-format rows; default
        :data:`MATH_TASK_SUFFIX`. veRL rows already carry theirs and are left alone.
      source: the ``source`` of benchmark-format problems (default: the format name); veRL rows
        use their ``data_source``.

    Returns:
      ``(problems, stats)``; malformed rows are skipped and counted by reason in ``stats``
      (also logged), never raised.
    """
    suffix = MATH_TASK_SUFFIX if task_suffix is None else task_suffix
    s = os.fspath(path_or_name)
    p = Path(s).expanduser()
    if p.exists():
        if p.is_dir():
            p = _resolve_dir(p, split)
        rows, label = _iter_file(p), str(p)
    elif isinstance(path_or_name, os.PathLike) or _looks_like_path(s):
        raise FileNotFoundError(f"no such data file or directory: {s}")
    elif _benchmark_name(s) is not None:
        n = _benchmark_name(s)
        if fmt is None:
            fmt = BENCHMARKS[n][1]
        source = source or n
        rows, label = _iter_file(benchmark_path(n)), f"benchmark {n}"
    else:
        check_source_name(s)
        rows, label = _iter_hf(s, split), f"hf:{s}[{split}]"

    rows = iter(rows)
    if fmt is None:
        head = list(itertools.islice(rows, 64))
        votes = collections.Counter(f for f in (detect_format(r) for _, r in head) if f)
        rows = itertools.chain(head, rows)
        if votes:
            fmt = votes.most_common(1)[0][0]
        elif any(isinstance(r, dict) for _, r in head):
            fields = next(sorted(r) for _, r in head if isinstance(r, dict))
            raise DataError(f"{label}: cannot detect the data format from the fields {fields}; set data.format "
                            f"(--config.data.format=NAME) to one of: {format_layouts()}")
        else:
            fmt = "verl"  # nothing readable in the head: every row is skipped below anyway
    fmt = _canonical_fmt(fmt)
    parse = _PARSERS[fmt]
    src = source or fmt

    stats = SkipStats(source=source or label)
    problems: list[Problem] = []
    for i, row in rows:
        where = f"row {i}"
        try:
            if isinstance(row, _Skip):
                raise row
            if not isinstance(row, dict):
                raise _Skip("not_an_object")
            prob = parse(row, i, src, suffix)
        except _Skip as e:
            stats.skip(e.reason, where)
            continue
        except Exception as e:  # a row shaped in a way no parser foresaw: still not fatal
            stats.skip(f"bad_row:{type(e).__name__}", where)
            continue
        prob.messages = apply_system_prompt(prob.messages, system_prompt)
        problems.append(prob)
        stats.keep()
    stats.log()
    return problems, stats


def write_verl_parquet(problems: Iterable[Problem], path: str | os.PathLike, split: str = "train") -> None:
    """Write problems as an Eurus-2-RL-Data / veRL parquet file (readable by read_problems)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [p.to_verl_row(split, i) for i, p in enumerate(problems)]
    pq.write_table(pa.Table.from_pylist(rows), path)
