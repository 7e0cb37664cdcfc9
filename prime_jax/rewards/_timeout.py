"""A soft time limit for code running in a process's main thread (SIGALRM / setitimer).

Used by the grading workers around math grading. It raises :class:`SoftTimeout`, a
``BaseException`` so that library code catching ``Exception`` (sympy, math-verify) does not
swallow it. C code that never returns to the interpreter cannot be interrupted this way; the
pool's hard kill is the backstop for that.
"""
from __future__ import annotations

import contextlib
import signal
import threading


class SoftTimeout(BaseException):
    """The soft time limit ran out."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`SoftTimeout` in the block after ``seconds`` (main thread only; else no-op)."""
    if (
        seconds is None
        or seconds <= 0
        or threading.current_thread() is not threading.main_thread()
        or not hasattr(signal, "setitimer")
    ):
        yield
        return

    def _handler(signum, frame):
        raise SoftTimeout(f"soft time limit of {seconds:.3g}s exceeded")

    old = signal.signal(signal.SIGALRM, _handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
