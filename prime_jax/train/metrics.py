"""Run metrics: WORKDIR/metrics.jsonl (one JSON object per row), TensorBoard, optional W&B.

Rows other tools rely on:

* training rows carry ``step`` (1, 2, ...) and the step's numbers (names below);
* eval rows carry ``step`` and ``eval/accuracy`` (a fraction in [0, 1]; the mean over the eval
  sources of each source's ``eval/<source>/accuracy``). An eval row for step 0 (the start, after
  SFT and before RL) is always written.

Every wall-clock-dependent value is named ``time/...`` or ``perf/...``; everything else is a
deterministic function of the config and seed (a resumed run reproduces it exactly).

On resume from the checkpoint of step k, rows with ``step > k`` (and a partial last line left by
a kill) are removed first, so the file never holds duplicated or half-written steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
WALL_CLOCK_PREFIXES = ("time/", "perf/")


def to_json_value(value: Any):
    """numpy/jax scalars -> Python numbers; non-finite floats -> None (strict JSON)."""
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f if math.isfinite(f) else None


def read_metrics(path: str | Path) -> list[dict]:
    """All complete rows of a metrics file (a partial last line is ignored)."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def last_eval_row(path: str | Path) -> dict | None:
    """The last held-out evaluation row (one with ``eval/accuracy``) of a metrics file, or None."""
    evals = [r for r in read_metrics(path) if "eval/accuracy" in r]
    return evals[-1] if evals else None


def truncate_metrics(path: str | Path, max_step: int | None) -> int:
    """Keeps only complete rows with ``step <= max_step`` (None: keep nothing). Atomic; returns rows dropped."""
    p = Path(path)
    if not p.exists():
        return 0
    text = p.read_text()
    kept, dropped = [], 0
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if max_step is not None and int(row.get("step", -1)) <= max_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped or not text.endswith("\n") and text:
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, p)
    return dropped


def masked_stats(values: np.ndarray, mask: np.ndarray, prefix: str) -> dict[str, float]:
    """mean/std/min/max of ``values`` where ``mask`` is set."""
    v = np.asarray(values, np.float64)[np.asarray(mask) > 0]
    if v.size == 0:
        return {f"{prefix}/mean": 0.0, f"{prefix}/std": 0.0, f"{prefix}/min": 0.0, f"{prefix}/max": 0.0}
    return {f"{prefix}/mean": float(v.mean()), f"{prefix}/std": float(v.std()),
            f"{prefix}/min": float(v.min()), f"{prefix}/max": float(v.max())}


def mean_of(rows: Iterable[Mapping[str, Any]], key: str, reduce=np.mean) -> float:
    values = [float(r[key]) for r in rows if key in r]
    return float(reduce(values)) if values else 0.0


class MetricsLogger:
    """Appends rows to WORKDIR/metrics.jsonl and mirrors numbers to TensorBoard / W&B.

    resume_step: the step of the restored checkpoint (rows after it are dropped and TensorBoard
    events from later steps are purged); None for a fresh run (the file is emptied).
    """

    def __init__(self, workdir: str | Path, *, resume_step: int | None, tensorboard: bool = True,
                 wandb: bool = False, wandb_project: str = "prime-jax", run_name: str = "run",
                 config: Mapping[str, Any] | None = None, enabled: bool = True):
        self.workdir = Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        dropped = truncate_metrics(self.path, resume_step)
        if dropped and resume_step is None:
            logger.info("metrics.jsonl: %d rows of an earlier start that saved no checkpoint removed (this run "
                        "starts at step 0)", dropped)
        elif dropped:
            logger.info("metrics.jsonl: dropped %d rows after step %d (resumed from its checkpoint)", dropped,
                        resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # optional dependency

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(self.workdir / "tb"), purge_step=purge)
        if wandb:
            try:
                import wandb as wandb_lib  # optional dependency
            except ImportError:
                logger.warning("logging.wandb is on but `wandb` is not installed; W&B logging is off")
            else:
                self._wandb = wandb_lib.init(project=wandb_project, name=run_name, dir=str(self.workdir),
                                             config=dict(config or {}), resume="allow", id=run_name)

    def write(self, row: Mapping[str, Any]) -> dict:
        """Appends one row (must carry ``step``); returns it as written."""
        out = {k: to_json_value(v) for k, v in row.items()}
        if "step" not in out:
            raise ValueError("a metrics row needs a 'step'")
        if not self.enabled:
            return out
        self._file.write(json.dumps(out, sort_keys=False) + "\n")
        self._file.flush()
        step = int(out["step"])
        numbers = {k: v for k, v in out.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        return out

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
