"""Host loss, said in one line: which process stopped answering, and how to resume.

When one host of a pod dies (kill -9, a kernel panic, a lost VM), the others notice in two ways:
a collective they are in fails at once (Gloo's "Connection closed by peer", an XLA runtime error
naming no process), and after its heartbeat timeout the JAX coordination service declares the
task dead and aborts every other process (a fatal log line and a C++ stack trace, exit 134; its
callback cannot be replaced from Python in this jaxlib). Neither says which host was lost or what
to do next.

`HostWatch` runs one daemon thread per process that, every second, bumps this process's counter
in the coordination service's key-value store and reads everyone else's. A process whose counter
has not moved for `timeout_s` seconds (`distributed.heartbeat_timeout`) stopped answering: the
watch prints one line, ``prime_jax.<tool>: error: process 1 of 2 (host h1) stopped answering
...; <resume hint>``, and exits with status 1. The coordination service is started with a longer
heartbeat timeout (`service_timeout`) so that this line comes first; it stays the backstop. A
collective that failed in the main thread waits for the watch's verdict (`explain_failure`).
A process that finished normally says so (`stop`) before it disconnects, so finishing first is
not mistaken for dying.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import threading
import time
from typing import Callable

logger = logging.getLogger(__name__)

_PREFIX = "prime_jax_host_watch"
_active: "HostWatch | None" = None


def service_timeout(timeout_s: int) -> int:
    """The coordination service's own heartbeat timeout: the watch (at `timeout_s`) speaks first.

    At least 5 minutes: the service's heartbeats starve on a loaded CPU (measured on a 2-core box at load
    ~5: both processes of a 2-process run declared dead 40 s into compiling, and aborted), and a false
    verdict there aborts every host, where the watch's only names one.
    """
    return max(2 * int(timeout_s) + 30, 300)


class HostWatch:
    """See the module docstring. `client`: jax's DistributedRuntimeClient."""

    def __init__(self, client, process_id: int, num_processes: int, timeout_s: float, *, tool: str = "main",
                 interval_s: float | None = None):
        self.client, self.process_id, self.num_processes = client, process_id, num_processes
        self.timeout_s = float(timeout_s)
        self.interval_s = interval_s or min(1.0, self.timeout_s / 5)
        self.tool = tool
        self.resume_hint: Callable[[], str] = lambda: "rerun the same command on all hosts to resume"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prime-host-watch", daemon=True)
        self._hosts: dict[int, str] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "HostWatch":
        try:
            self.client.key_value_set(f"{_PREFIX}/host/{self.process_id}", socket.gethostname(), allow_overwrite=True)
        except Exception:  # noqa: BLE001 - a name only for the message
            pass
        self._thread.start()
        return self

    def stop(self) -> None:
        """This process is done: tell the others (so they do not take its silence for death) and stop."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.client.key_value_set(f"{_PREFIX}/done/{self.process_id}", "1", allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator may be gone already
            pass

    # ------------------------------------------------------------------ the watch
    def _run(self) -> None:
        count, seen, changed = 0, {}, {}
        started = time.monotonic()
        unreachable_since = None
        while not self._stop.wait(self.interval_s):
            count += 1
            now = time.monotonic()
            try:
                self.client.key_value_set(f"{_PREFIX}/alive/{self.process_id}", str(count), allow_overwrite=True)
                alive = dict(self._entries("alive"))
                done = {int(k) for k, _ in self._entries("done")}
                unreachable_since = None
            except Exception as e:  # noqa: BLE001 - the coordination service (process 0) is not answering
                if self._stop.is_set():
                    return
                unreachable_since = unreachable_since or now
                if now - unreachable_since >= min(self.timeout_s, 10.0):
                    self._lost(0, f"the coordinator (process 0) stopped answering ({_short(e)})")
                continue
            for pid in range(self.num_processes):
                if pid == self.process_id or pid in done:
                    continue
                value = alive.get(str(pid))
                if value != seen.get(pid):
                    seen[pid], changed[pid] = value, now
                if now - changed.get(pid, started) > self.timeout_s:
                    self._lost(pid, f"process {pid} of {self.num_processes}{self._host(pid)} stopped answering "
                                    f"(no sign of life for {self.timeout_s:.0f} s)")

    def _entries(self, kind: str) -> list[tuple[str, str]]:
        return [(k.rsplit("/", 1)[-1], v) for k, v in self.client.key_value_dir_get(f"{_PREFIX}/{kind}/")]

    def _host(self, pid: int) -> str:
        if pid not in self._hosts:
            try:
                self._hosts[pid] = f" (host {self.client.key_value_try_get(f'{_PREFIX}/host/{pid}')})"
            except Exception:  # noqa: BLE001
                self._hosts[pid] = ""
        return self._hosts[pid]

    def _lost(self, pid: int, what: str) -> None:
        """One line, exit 1 (no interpreter shutdown: its collectives and threads would only add noise)."""
        try:
            hint = self.resume_hint()
        except Exception:  # noqa: BLE001
            hint = "rerun the same command on all hosts to resume"
        print(f"prime_jax.{self.tool}: error: {what}; {hint}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        if self.process_id == 0:
            time.sleep(min(2.0, self.timeout_s / 2))  # the service lives here: let the others read their verdict
        os._exit(1)


def _short(error: BaseException) -> str:
    return " ".join(str(error).split())[:160]


# ----------------------------------------------------------------------------------------------
# the process's one watch
# ----------------------------------------------------------------------------------------------
def start(client, process_id: int, num_processes: int, timeout_s: float) -> HostWatch:
    """Starts this process's watch (see the module docstring); stopped at exit before jax disconnects."""
    global _active
    _active = HostWatch(client, process_id, num_processes, timeout_s).start()
    atexit.register(_active.stop)  # registered after jax's own shutdown hook, so it runs before it
    return _active


def configure(tool: str, resume_hint: Callable[[], str] | None = None) -> None:
    """Names the CLI in the watch's line and says how to resume (e.g. the run's last checkpoint)."""
    if _active is not None:
        _active.tool = tool
        if resume_hint is not None:
            _active.resume_hint = resume_hint


def stop() -> None:
    if _active is not None:
        _active.stop()


_LOST_PEER = ("Gloo", "Connection closed by peer", "Connection reset by peer", "UNAVAILABLE", "DEADLINE_EXCEEDED",
              "coordination service", "Barrier", "barrier", "heartbeat", "Socket closed", "Broken pipe")


def looks_like_a_lost_host(error: BaseException) -> bool:
    """An error a dead peer causes in this process's main thread: a failed cross-process collective,
    barrier or key-value call (an out-of-memory or a bug keeps its traceback at once)."""
    text = f"{type(error).__name__}: {error}"
    return any(s in text for s in _LOST_PEER)


def explain_failure(error: BaseException) -> None:
    """Called with an exception of the main thread: when it may come from a lost host, wait for the
    watch to name it (it exits the process); returns (the caller re-raises) when no host was lost."""
    watch = _active
    if watch is None or watch._stop.is_set() or not looks_like_a_lost_host(error):
        return
    logger.debug("a collective failed (%s); waiting for the host watch", _short(error))
    deadline = time.monotonic() + watch.timeout_s + 5 * watch.interval_s + 5
    while time.monotonic() < deadline and watch._thread.is_alive():
        time.sleep(0.2)
