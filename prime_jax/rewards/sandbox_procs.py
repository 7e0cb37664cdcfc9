"""The code sandbox's processes on the host: a dedicated uid per grading process (when the grader
runs as root), and killing and reaping everything a sandboxed run left behind (its process group,
every process of its uid, orphans reaped by a subreaper). Used by `sandbox.py`; see its docstring."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time

from prime_jax.rewards.sandbox_paths import others_can_traverse

logger = logging.getLogger(__name__)

UID_RANGES = ((1_600_000_000, 4096), (45_000, 4096))  # where a sandbox uid is looked for (mapped, no account)
_uid_lock = threading.Lock()
_uid_state: dict = {}


def _uid_mapped(uid: int, span: int) -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            for line in f:
                inside, _outside, count = (int(x) for x in line.split())
                if inside <= uid and uid + span <= inside + count:
                    return True
    except (OSError, ValueError):
        return False
    return False


def allocate_uid() -> int | None:
    """A uid no other live grading process uses (held via an abstract unix socket name)."""
    import pwd  # POSIX only; the sandbox alone needs it

    with _uid_lock:
        if _uid_state.get("pid") == os.getpid():
            return _uid_state["uid"]
        for base, span in UID_RANGES:
            if not _uid_mapped(base, span):
                continue
            for uid in range(base, base + span):
                try:
                    pwd.getpwuid(uid)
                    continue  # a real account: never run as (or sweep) it
                except KeyError:
                    pass
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.bind(b"\0prime-jax-sandbox-uid-%d" % uid)
                except OSError:
                    s.close()
                    continue
                _uid_state.update(pid=os.getpid(), uid=uid, sock=s)
                return uid
        return None


def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _kill_binary() -> str | None:
    for path in ("/bin/kill", "/usr/bin/kill"):
        if os.access(path, os.X_OK) and others_can_traverse(path) is None:
            return path
    return None


_reap_orphans = False


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (PR_SET_CHILD_SUBREAPER), so
    sandbox leftovers killed by a uid sweep are reaped here, not left as zombies for an init
    that may never reap them (they would count against the sandbox uid's RLIMIT_NPROC).

    Only for processes whose every child is ours to reap: the grading workers call it."""
    global _reap_orphans
    try:
        import ctypes  # optional: prctl where libc has it

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
            return False
    except (OSError, AttributeError):
        return False
    _reap_orphans = True
    return True


def _reap_children(max_wait: float = 2.0) -> None:
    deadline = time.monotonic() + max_wait
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.01)


def sweep_uid(uid: int) -> None:
    """SIGKILL every process of ``uid``: ``kill(-1, SIGKILL)`` issued as that uid signals
    exactly that uid's processes (except the sender).

    Forks a helper when this process is single-threaded (a grading worker); otherwise (a caller
    with native threads, where forking is unsafe) runs ``kill -9 -1`` as that uid."""
    if _single_threaded():
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                for _ in range(3):
                    os.kill(-1, signal.SIGKILL)
            except BaseException:  # noqa: BLE001 - ProcessLookupError: nothing left
                pass
            os._exit(0)
        os.waitpid(pid, 0)
        if _reap_orphans:
            _reap_children()
        return
    kill = _kill_binary()
    if kill is None:
        logger.warning("cannot sweep sandbox uid %d from a threaded process without a kill binary", uid)
        return
    for _ in range(2):
        try:
            subprocess.run([kill, "-9", "-1"], user=uid, group=uid, extra_groups=[], env={}, cwd="/",
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError) as e:
            logger.warning("could not sweep sandbox uid %d: %r", uid, e)
            return


def kill_group(proc: subprocess.Popen, uid, pidns: bool) -> None:
    """Kill the program and everything it started; reap the launcher."""
    if pidns and proc.poll() is None:
        # the launcher (grader's uid) SIGKILLs its child, the namespace's init, and reaps it; the
        # kernel kills and reaps the rest of the namespace: no zombie is left anywhere
        try:
            proc.terminate()
            proc.wait(timeout=3.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if uid is not None and not pidns:
        sweep_uid(uid)  # anything that left the process group
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def count_user_processes(uid: int) -> int:
    n = 0
    try:
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if os.stat(f"/proc/{name}").st_uid == uid:
                        n += 1
                except OSError:
                    pass
    except OSError:
        return 256
    return n
