"""Grading worker process: receives tasks over a pipe, returns ``(seq, score, status, info)``.

Started by :class:`prime_jax.rewards.pool.GradingPool` as ``python -c``; exits on EOF (pool
closed) or, while idle, when its parent process is gone.  It stays single-threaded (the code
sandbox forks only in single-threaded processes).
"""
from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
from multiprocessing.connection import Connection

from prime_jax.rewards._timeout import SoftTimeout, time_limit


def _resolve(name: str, cache: dict):
    fn = cache.get(name)
    if fn is None:
        module, _, attr = name.partition(":")
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        fn = cache[name] = obj
    return fn


def main(rfd: int, wfd: int, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="[grading worker %(process)d] %(levelname)s %(name)s: %(message)s")
    from prime_jax.rewards.sandbox_procs import become_subreaper  # in the worker process only

    become_subreaper()  # reap what code sandboxes leave behind (see sandbox_procs.become_subreaper)
    inbox = Connection(rfd, writable=False)
    outbox = Connection(wfd, readable=False)
    cache: dict = {}
    # warm the usual graders so the first task's budget is not spent on imports
    for name in ("prime_jax.rewards.math:grade", "prime_jax.rewards.code:grade_detailed"):
        try:
            _resolve(name, cache)
        except Exception:  # noqa: BLE001
            pass
    try:
        import math_verify  # noqa: F401  (sympy, latex2sympy: the slow imports)
    except Exception:  # noqa: BLE001
        pass
    try:
        outbox.send(("ready", os.getpid()))
    except (OSError, ValueError):
        return  # the pool was closed while this worker was starting
    while True:
        try:
            while not inbox.poll(1.0):
                if os.getppid() != parent_pid:
                    return  # orphaned: the pool's process is gone
            msg = inbox.recv()
        except (EOFError, OSError):
            return
        seq, fn_name, args, kwargs, soft_budget = msg
        try:
            fn = _resolve(fn_name, cache)
            with time_limit(soft_budget):
                out = fn(*args, **kwargs)
            if isinstance(out, tuple):  # (score, info)
                score, info = out
            else:
                score, info = out, None
            reply = ("result", seq, float(score), "ok", info)
        except SoftTimeout as e:
            reply = ("result", seq, 0.0, "timeout", str(e))
        except BaseException as e:  # noqa: BLE001 - any failure of one task scores 0
            reply = ("result", seq, 0.0, "error", f"{type(e).__name__}: {e}"[:500])
        try:
            outbox.send(reply)
        except (OSError, ValueError):
            return
        except Exception:  # noqa: BLE001 - info not picklable
            outbox.send(("result", seq, reply[2], reply[3], None))
