"""Per-sample records of an evaluation written as they are produced, so that an interrupted
evaluation keeps what it did and the same command resumes it.

``WORKDIR/eval[/<tag>]/progress/<benchmark>.jsonl``: a header line saying what is being evaluated
(settings, checkpoint, the problems' ids), then one line per finished chunk of prompts
(``{"chunk": k, "records": [[record, ...] per problem]}``). A rerun whose header matches reuses
the finished chunks; a different header (other settings, checkpoint or problems) starts afresh.
When the benchmark's results are written, the file is removed.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class ProgressFile:
    """Finished chunks of one benchmark's evaluation (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, header: dict[str, Any]):
        self.path = Path(path)
        self.header = json.loads(json.dumps(header, default=str))  # as it reads back from the file
        self.done: dict[int, list[list[dict]]] = self._load()
        if not self.done:  # (re)start the file with this header
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"header": self.header}) + "\n")
        else:
            logger.warning("%s: resuming, %d chunk(s) already evaluated (%s)", self.header.get("benchmark"),
                           len(self.done), self.path)

    def _load(self) -> dict[int, list[list[dict]]]:
        if not self.path.exists():
            return {}
        done = {}
        with open(self.path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                try:
                    row = json.loads(line)
                except ValueError:  # the partial last line of a killed run
                    break
                if i == 0 and row.get("header") != self.header:
                    return {}
                if i > 0:
                    done[int(row["chunk"])] = row["records"]
        return done

    def add(self, chunk: int, records: list[list[dict]]) -> None:
        """Appends a finished chunk (records per problem) and flushes it to disk."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"chunk": chunk, "records": records}, ensure_ascii=False, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[chunk] = records

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()  # only when empty
        except OSError:
            pass
