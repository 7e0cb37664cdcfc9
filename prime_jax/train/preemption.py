"""Preemption: SIGTERM on any host stops every host at the same step boundary.

TPU spot VMs and maintenance events send SIGTERM to one host (or to each host at a slightly
different time) and give it about 30 s. A run must not die mid-collective on the other hosts, so
the signal only sets a flag; at each step boundary the hosts vote (`parallel.any_process`, one
tiny all-gather), and when any host was signalled all of them save the last finished step and
leave the loop together, and the CLI exits 0. Rerunning the same command resumes from that
checkpoint exactly. (A host that dies without a signal is handled by `jax.distributed`'s
heartbeat timeout, see `parallel/distributed.py`.)

Ctrl-C (SIGINT) takes the same path: the first one stops the run at the next step boundary with
a checkpoint (the CLI then exits 130, the shell's status for an interrupted command); a second
one aborts at once (KeyboardInterrupt), losing the step in progress.
"""

from __future__ import annotations

import logging
import signal
import threading

from prime_jax.parallel import any_process

logger = logging.getLogger(__name__)


class PreemptionWatch:
    """Context manager: while active, SIGTERM and SIGINT set a flag instead of killing the process.

    `should_stop()` is collective on several processes: call it on every host at every step
    boundary. `signal_name` is the first signal this process received ("SIGTERM", "SIGINT") or
    None. A second SIGINT raises KeyboardInterrupt (abort now).
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name: str | None = None
        self.saving = False  # set while the last checkpoint is written: a second Ctrl-C then waits for a third
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:  # Ctrl-C twice: stop now
            if self.saving:
                self.saving = False
                logger.warning("Ctrl-C: writing the checkpoint (seconds); Ctrl-C once more aborts without it")
                return
            raise KeyboardInterrupt
        if not self.requested:
            self.signal_name = name
            if signum == signal.SIGINT:
                logger.warning("Ctrl-C: stopping after the step in progress, with a checkpoint (Ctrl-C again "
                               "stops at once, without saving that step)")
            else:
                logger.warning("received %s: stopping at the next step boundary with a checkpoint", name)
        self.requested = True

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def should_stop(self) -> bool:
        """True on every host once any host was signalled (a collective vote)."""
        return any_process(self.requested)
