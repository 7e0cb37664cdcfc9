"""A process pool for grading that never hangs its caller.

Workers are plain ``python -c`` subprocesses (not ``multiprocessing``: nothing of the trainer's
``__main__`` is re-imported, nothing is forked from a threaded, jax-holding process) talking over
two pipes.  Each task has a time budget: the worker applies it as a soft limit (SIGALRM, for
tasks marked ``soft``) and the parent kills the worker ``kill_grace`` seconds after the budget
if no answer came, starting a fresh one in its place.  A timeout or a crash scores 0.0 and is
counted, per batch (:class:`BatchResult`) and cumulatively (:class:`GradingStats`).

The caller's wall time for a batch is bounded by about
``ceil(len(tasks) / num_workers) * (budget + kill_grace)`` plus worker start-up.
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any, Sequence

logger = logging.getLogger(__name__)

_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Task:
    """One call ``fn(*args, **kwargs)`` in a worker; ``fn`` is ``"module:function"``.

    ``budget`` is the time in seconds the task may take; ``soft`` applies it inside the worker
    with SIGALRM too (set it False for code that manages its own subprocesses and timeouts)."""

    fn: str
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    budget: float = 5.0
    soft: bool = True


@dataclasses.dataclass
class GradingStats:
    """Cumulative counters of a pool."""

    graded: int = 0
    ok: int = 0
    timeouts: int = 0
    errors: int = 0
    worker_restarts: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class BatchResult(list):
    """The scores of one batch (a ``list[float]``) plus what happened to each item.

    ``statuses[i]`` is ``"ok"``, ``"timeout"`` (soft limit or hard kill) or ``"error"`` (the
    grader raised or its worker died); ``infos[i]`` is the grader's detail (may be None)."""

    def __init__(self, scores: Sequence[float], statuses: Sequence[str], infos: Sequence[Any] = (),
                 wall_s: float = 0.0):
        super().__init__(float(s) for s in scores)
        self.statuses = list(statuses)
        self.infos = list(infos) if infos else [None] * len(self.statuses)
        self.wall_s = wall_s

    @property
    def scores(self) -> list[float]:
        return list(self)

    @property
    def timeouts(self) -> int:
        return sum(s == "timeout" for s in self.statuses)

    @property
    def errors(self) -> int:
        return sum(s == "error" for s in self.statuses)

    def counts(self) -> dict:
        return {"n": len(self), "timeouts": self.timeouts, "errors": self.errors,
                "mean_score": (sum(self) / len(self)) if len(self) else 0.0, "wall_s": self.wall_s}

    def __repr__(self) -> str:
        return (f"BatchResult(n={len(self)}, mean={self.counts()['mean_score']:.4f}, "
                f"timeouts={self.timeouts}, errors={self.errors})")


class _Worker:
    def __init__(self, python: str, start_timeout: float):
        p_r, c_w = os.pipe()  # worker -> parent
        c_r, p_w = os.pipe()  # parent -> worker
        code = (f"import sys; sys.path[0] = {_PKG_ROOT!r}; "
                f"from prime_jax.rewards._worker import main; main({c_r}, {c_w}, {os.getpid()})")
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"
        try:
            self.proc = subprocess.Popen([python, "-c", code], pass_fds=(c_r, c_w), env=env,
                                         stdin=subprocess.DEVNULL, close_fds=True)
        finally:
            os.close(c_r)
            os.close(c_w)
        self.recv_conn = Connection(p_r, writable=False)
        self.send_conn = Connection(p_w, readable=False)
        self.ready = False
        self.start_deadline = time.monotonic() + start_timeout
        self.task: int | None = None  # index in the current batch
        self.seq = 0
        self.deadline = float("inf")

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.close_pipes()

    def close_pipes(self) -> None:
        for c in (self.recv_conn, self.send_conn):
            try:
                c.close()
            except OSError:
                pass


_live_pools: "weakref.WeakSet[GradingPool]" = weakref.WeakSet()


@atexit.register
def _close_all_pools() -> None:
    for pool in list(_live_pools):
        pool.close(timeout=0.5)


class GradingPool:
    """``num_workers`` grading processes, kept alive across batches until :meth:`close`.

    Not thread-safe: one batch at a time (calls from several threads are serialised)."""

    def __init__(self, num_workers: int | None = None, *, kill_grace: float = 1.0,
                 start_timeout: float = 120.0, python: str | None = None, start: bool = True):
        if num_workers is None:
            num_workers = max(1, min(32, os.cpu_count() or 1))
        if num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        self.num_workers = int(num_workers)
        self.kill_grace = float(kill_grace)
        self.start_timeout = float(start_timeout)
        self.python = python or sys.executable
        self.stats = GradingStats()
        self._workers: list[_Worker | None] = [None] * self.num_workers
        self._closed = False
        self._lock = threading.Lock()
        _live_pools.add(self)
        if start:
            for i in range(self.num_workers):
                self._workers[i] = _Worker(self.python, self.start_timeout)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close(timeout=0.2)
        except Exception:  # noqa: BLE001
            pass

    def close(self, timeout: float = 2.0) -> None:
        """Stop the workers (politely, then by SIGKILL after ``timeout`` seconds)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        workers = [w for w in self._workers if w is not None]
        self._workers = [None] * self.num_workers
        for w in workers:
            w.close_pipes()  # EOF: an idle worker exits
        deadline = time.monotonic() + timeout
        for w in workers:
            try:
                w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill()

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ running
    def run(self, tasks: Sequence[Task]) -> BatchResult:
        """Run ``tasks``; return their scores in order (0.0 for timeouts and errors)."""
        with self._lock:
            return self._run(list(tasks))

    def _replace(self, slot: int) -> None:
        w = self._workers[slot]
        if w is not None:
            w.kill()
        self._workers[slot] = _Worker(self.python, self.start_timeout)

    def _run(self, tasks: list[Task]) -> BatchResult:
        if self._closed:
            raise RuntimeError("GradingPool is closed")
        return _BatchRun(self, tasks).run()

    def map(self, fn: str, arg_tuples: Sequence[tuple], budget: float = 5.0, soft: bool = True) -> BatchResult:
        """``fn(*args)`` for each args tuple, in the workers."""
        return self.run([Task(fn, tuple(a), {}, budget, soft) for a in arg_tuples])


class _BatchRun:
    """One `GradingPool._run` call: hands `tasks` to the pool's workers, collects their replies,
    kills a worker past its task's deadline and replaces dead ones, until every task has a result."""

    def __init__(self, pool: "GradingPool", tasks: list[Task]):
        self.pool, self.tasks = pool, tasks
        n = len(tasks)
        self.scores = [0.0] * n
        self.statuses: list[str | None] = [None] * n
        self.infos: list[Any] = [None] * n
        self.pending = collections.deque(range(n))
        self.remaining = n
        self.start_failures = 0

    def run(self) -> BatchResult:
        t_start = time.monotonic()
        pool = self.pool
        while self.remaining > 0:
            if self.start_failures >= 3 * pool.num_workers and self.pending:
                for i in list(self.pending):
                    self.finish(i, 0.0, "error", "grading workers cannot start")
                self.pending.clear()
                if self.remaining == 0:
                    break
            for slot in range(pool.num_workers):
                if pool._workers[slot] is None:
                    pool._workers[slot] = _Worker(pool.python, pool.start_timeout)
            self.dispatch()
            self.receive()
            self.enforce_deadlines()
        return BatchResult(self.scores, [s or "error" for s in self.statuses], self.infos, time.monotonic() - t_start)

    def finish(self, i: int, score: float, status: str, info: Any = None) -> None:
        if self.statuses[i] is not None:
            return
        self.scores[i], self.statuses[i], self.infos[i] = (float(score) if status == "ok" else 0.0), status, info
        self.remaining -= 1
        stats = self.pool.stats
        stats.graded += 1
        if status == "ok":
            stats.ok += 1
        elif status == "timeout":
            stats.timeouts += 1
        else:
            stats.errors += 1

    def worker_died(self, slot: int, why: str) -> None:
        w = self.pool._workers[slot]
        if w.task is not None:
            self.finish(w.task, 0.0, "error", f"worker died: {why}")
            logger.warning("grading worker died on task %d (%s)", w.task, why)
        elif not w.ready:
            self.start_failures += 1
            logger.warning("grading worker failed to start (%s)", why)
        self.pool.stats.worker_restarts += 1
        self.pool._replace(slot)

    def dispatch(self) -> None:
        """Sends the next pending tasks to idle, ready workers."""
        for slot, w in enumerate(self.pool._workers):
            if self.pending and w.ready and w.task is None:
                i = self.pending.popleft()
                t = self.tasks[i]
                w.seq += 1
                try:
                    w.send_conn.send((w.seq, t.fn, tuple(t.args), dict(t.kwargs), float(t.budget) if t.soft else None))
                except (OSError, ValueError) as e:
                    self.pending.appendleft(i)
                    self.worker_died(slot, f"send failed: {e!r}")
                    continue
                w.task = i
                w.deadline = time.monotonic() + float(t.budget) + self.pool.kill_grace

    def receive(self) -> None:
        """Waits for replies (or the next deadline) and records them."""
        workers = self.pool._workers
        deadlines = [w.deadline if w.task is not None else w.start_deadline
                     for w in workers if w.task is not None or not w.ready]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 1.0
        by_conn = {w.recv_conn: slot for slot, w in enumerate(workers)}
        try:
            ready = wait(list(by_conn), timeout=timeout)
        except OSError:
            ready = []
        for conn in ready:
            slot = by_conn[conn]
            w = workers[slot]
            try:
                msg = conn.recv()
            except (EOFError, OSError) as e:
                try:
                    rc = w.proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    rc = None
                self.worker_died(slot, f"exit status {rc}" if rc is not None else repr(e))
                continue
            except Exception as e:  # noqa: BLE001 - an unpicklable reply
                self.worker_died(slot, f"bad reply: {e!r}")
                continue
            if msg[0] == "ready":
                w.ready = True
                self.start_failures = 0
                continue
            seq, score, status, info = msg[1:]
            if w.task is None or seq != w.seq:
                continue  # stale
            i, w.task, w.deadline = w.task, None, float("inf")
            self.finish(i, score, status, info)

    def enforce_deadlines(self) -> None:
        """Kills (replaces) a worker past its task's deadline, or one that never became ready."""
        pool, now = self.pool, time.monotonic()
        for slot, w in enumerate(pool._workers):
            if w.task is not None and now >= w.deadline:
                i = w.task
                w.task = None
                self.finish(i, 0.0, "timeout", f"killed after {self.tasks[i].budget + pool.kill_grace:.3g}s")
                pool.stats.worker_restarts += 1
                pool._replace(slot)
            elif not w.ready and w.task is None and now >= w.start_deadline:
                self.start_failures += 1
                pool.stats.worker_restarts += 1
                logger.warning("grading worker did not become ready in %.0fs", pool.start_timeout)
                pool._replace(slot)
