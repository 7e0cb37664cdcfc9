"""Naming evaluation sources, and reading the SFT demonstrations file.

Each evaluation source (``data.eval`` of a run, ``--benchmarks`` of ``prime_jax.evaluate``) gets
a name that keys its metrics (``eval/<name>/accuracy``) and its files (``<name>.jsonl``):

* a packaged benchmark: its canonical name (``math500``; the alias ``math-500`` too);
* ``synthetic``: ``synthetic``; ``heldout`` (``data.holdout``'s problems of ``data.train``): ``heldout``;
* a file, folder or Hugging Face dataset id: its last path part without the data extension
  (``data/x.jsonl`` -> ``x``, ``x.jsonl`` -> ``x``, ``org/ds`` -> ``ds``);
* when two sources would share a name, their parent folders are prefixed, joined by ``-``, until
  the names differ (``a/test.jsonl,b/test.jsonl`` -> ``a-test``, ``b-test``). The same source
  listed twice is an error.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from .problems import DataError, SkipStats
from .readers import BENCHMARKS, _benchmark_name

logger = logging.getLogger(__name__)

_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".pq")


def _name_parts(source: str) -> list[str]:
    """The path parts of a source, the last one without its data extension."""
    parts = [p for p in Path(source).expanduser().parts if p not in ("/", ".", "..", "~")] or [source]
    last = parts[-1]
    for suffix in _DATA_SUFFIXES:
        if last.lower().endswith(suffix) and len(last) > len(suffix):
            last = last[: -len(suffix)]
            break
    return [*parts[:-1], last]


def eval_source_names(sources: Sequence[str], reserved: str | Sequence[str] = ("synthetic", "heldout")
                      ) -> dict[str, str]:
    """{unique name: source}, in the order given (see the module docstring for the rule);
    `reserved` names (the generated and held-out sets) are their own names."""
    reserved = (reserved,) if isinstance(reserved, str) else tuple(reserved)
    sources = [s.strip() for s in sources if s.strip()]
    duplicates = sorted({s for s in sources if sources.count(s) > 1})
    if duplicates:
        raise DataError(f"evaluation source {duplicates[0]!r} is listed twice")
    parts, depth = {}, {}
    for s in sources:
        packaged = _benchmark_name(s) if not Path(s).expanduser().exists() else None
        parts[s] = [packaged] if packaged in BENCHMARKS else ([s] if s in reserved else _name_parts(s))
        depth[s] = 1

    def name(s: str) -> str:
        return "-".join(parts[s][-depth[s]:])

    while True:
        by_name: dict[str, list[str]] = {}
        for s in sources:
            by_name.setdefault(name(s), []).append(s)
        clashes = [group for group in by_name.values() if len(group) > 1]
        if not clashes:
            return {name(s): s for s in sources}
        grew = False
        for group in clashes:
            for s in group:
                if depth[s] < len(parts[s]):
                    depth[s] += 1
                    grew = True
        if not grew:  # e.g. "x.jsonl" and "x.json" in the same folder
            raise DataError(f"evaluation sources {clashes[0]} cannot be told apart by name; rename one file")


def source_format(data_format: str, source: str) -> str | None:
    """The `fmt` to read `source` with under the config's ``data.format``: None (detect) for
    "auto" and for packaged benchmarks (bare names that are not files), which keep their own."""
    packaged = "/" not in source and not Path(source).expanduser().exists()
    return None if data_format == "auto" or packaged else data_format


def is_messages_file(source: str) -> bool:
    """Whether `source` is a JSONL file of chat demonstrations (its first row has ``messages``),
    rather than problems with worked solutions."""
    path = Path(source).expanduser()
    if not path.is_file():
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    return True  # read_sft_pairs counts it as bad_json
                return isinstance(row, dict) and "messages" in row
    return True  # an empty file: read_sft_pairs says there is no usable demonstration


def read_sft_pairs(path: str | Path, limit: int) -> tuple[list[tuple[list[dict], str]], SkipStats]:
    """(prompt messages, demonstration) pairs from a JSONL file of ``{"messages": [..., {"role":
    "assistant", "content": ...}]}`` rows, the first `limit` usable ones.

    Rows that are not JSON, have no ``messages`` list, or do not end with a non-empty assistant
    message are skipped and counted by reason (``bad_json``, ``no_messages``, ``no_assistant_reply``)
    with their line number, like ``data.train``'s rows; a file with no usable row raises DataError.
    """
    stats = SkipStats(source=f"sft.data {path}")
    pairs: list[tuple[list[dict], str]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, 1):
            if len(pairs) >= limit:
                break
            if not line.strip():
                continue
            where = f"line {line_number}"
            try:
                row = json.loads(line)
            except ValueError:
                stats.skip("bad_json", where)
                continue
            messages = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
                stats.skip("no_messages", where)
                continue
            if messages[-1].get("role") != "assistant" or not messages[-1]["content"].strip():
                stats.skip("no_assistant_reply", where)
                continue
            pairs.append(([dict(m) for m in messages[:-1]], messages[-1]["content"]))
            stats.keep()
    stats.log(logger)
    if not pairs:
        raise DataError(f"no usable demonstration ({stats.summary()})")
    return pairs, stats
