"""Readers: local files (JSONL / JSON / Parquet, or a folder of them), the packaged benchmarks
(:data:`BENCHMARKS`) and Hugging Face datasets, into :class:`Problem` lists with a :class:`SkipStats`."""
from __future__ import annotations

import collections
import difflib
import importlib.resources
import itertools
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

logger = logging.getLogger(__name__)

from .problems import DataError, DataUnavailableError, MATH_TASK_SUFFIX, Problem, SkipStats, _Skip, apply_system_prompt
from .formats import _PARSERS, _canonical_fmt, detect_format, format_layouts

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
    import pyarrow.parquet as pq  # parquet files only (start-up cost)

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
        import datasets  # hub datasets only (start-up cost)
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
    "gsm8k_train": ("gsm8k/train.jsonl", "gsm8k"),
    "math_train": ("math/train.jsonl", "math"),
}
_BENCH_ALIASES = {"math-500": "math500", "minerva": "minerva_math", "amc": "amc23", "aime": "aime24",
                  "olympiad": "olympiadbench", "math": "math_train",
                  "gsm8k-train": "gsm8k_train"}

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
    ``"minerva_math"``, ``"olympiadbench"``, ``"gsm8k"``, ``"gsm8k_train"``, ``"math_train"``), offline.
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
    rows, label, fmt, source = _open_rows(path_or_name, fmt, split, source)
    rows = iter(rows)
    if fmt is None:
        rows, fmt = _detect_rows_format(rows, label)
    fmt = _canonical_fmt(fmt)
    stats = SkipStats(source=source or label)
    suffix = MATH_TASK_SUFFIX if task_suffix is None else task_suffix
    problems = _parse_rows(rows, _PARSERS[fmt], source or fmt, suffix, system_prompt, stats)
    stats.log()
    return problems, stats


def _open_rows(path_or_name: str | os.PathLike, fmt: str | None, split: str,
               source: str | None) -> tuple[Iterable, str, str | None, str | None]:
    """(numbered rows, the label logs use, fmt, source) of a file, directory, packaged benchmark
    or HF dataset (see `read_problems`); a benchmark sets its own format and source by default."""
    s = os.fspath(path_or_name)
    p = Path(s).expanduser()
    if p.exists():
        if p.is_dir():
            p = _resolve_dir(p, split)
        return _iter_file(p), str(p), fmt, source
    if isinstance(path_or_name, os.PathLike) or _looks_like_path(s):
        raise FileNotFoundError(f"no such data file or directory: {s}")
    n = _benchmark_name(s)
    if n is not None:
        return (_iter_file(benchmark_path(n)), f"benchmark {n}", BENCHMARKS[n][1] if fmt is None else fmt,
                source or n)
    check_source_name(s)
    return _iter_hf(s, split), f"hf:{s}[{split}]", fmt, source


def _parse_rows(rows: Iterator, parse, src: str, suffix: str, system_prompt: str | None,
                stats: SkipStats) -> list[Problem]:
    """The rows' problems; a malformed row is counted in `stats` by reason and skipped."""
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
    return problems


def _detect_rows_format(rows: Iterator, label: str) -> tuple[Iterator, str]:
    """(the same rows, their format) by a vote of the first 64 rows' fields."""
    head = list(itertools.islice(rows, 64))
    votes = collections.Counter(f for f in (detect_format(r) for _, r in head) if f)
    rows = itertools.chain(head, rows)
    if votes:
        return rows, votes.most_common(1)[0][0]
    if any(isinstance(r, dict) for _, r in head):
        fields = next(sorted(r) for _, r in head if isinstance(r, dict))
        raise DataError(f"{label}: cannot detect the data format from the fields {fields}; set data.format "
                        f"(--config.data.format=NAME) to one of: {format_layouts()}")
    return rows, "verl"  # nothing readable in the head: every row is skipped by the reader anyway


def write_verl_parquet(problems: Iterable[Problem], path: str | os.PathLike, split: str = "train") -> None:
    """Write problems as an Eurus-2-RL-Data / veRL parquet file (readable by read_problems)."""
    import pyarrow as pa  # parquet files only (start-up cost)
    import pyarrow.parquet as pq  # parquet files only (start-up cost)

    rows = [p.to_verl_row(split, i) for i, p in enumerate(problems)]
    pq.write_table(pa.Table.from_pylist(rows), path)
