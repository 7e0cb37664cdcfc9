"""Run an untrusted Python program on one stdin, capture its stdout, isolated from the host.

Every run gets a fresh work directory (cwd, HOME and TMPDIR), an environment with nothing from
the grader's (fixed PATH, HOME, TMPDIR, LANG and *_NUM_THREADS=1 only), its own session/process group, resource limits
(RLIMIT_CPU, RLIMIT_AS, RLIMIT_NPROC, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE) and a wall-clock
limit after which everything the program started is killed (its PID namespace, or its process
group and every process of the sandbox uid).
Depending on what the kernel and container permit (probed once per process, see
:func:`capabilities`), it also gets:

* an unprivileged uid/gid of its own when the grader runs as root (one uid per grading process,
  never shared by concurrent sandboxes, so RLIMIT_NPROC contains fork bombs and a
  ``kill(-1, SIGKILL)`` under that uid sweeps up anything that escaped the process group);
* a new network namespace (no interfaces but a down loopback);
* a new PID namespace whose init is the program: when it dies the kernel kills and reaps all
  it left behind (no zombies count against the sandbox uid's RLIMIT_NPROC);
* a new mount namespace: fresh tmpfs over world-writable directories (/tmp, /var/tmp, /dev/shm,
  /run/lock) and over directories that hide the Python installation from other users (e.g. a
  0700 /root holding pyenv), with the work directory and the Python installation bound back in;
* Landlock: writes only beneath the work directory (and /dev/null), reads only from system and
  Python directories (not the repository or the data), no TCP bind/connect, no signals or
  abstract unix sockets outside the sandbox, no ptrace (so no /proc/<parent>/environ);
* seccomp: socket() only for AF_UNIX, no io_uring, only the native syscall ABI.

Set-up happens in ``_sandbox_launcher.py`` (a separate interpreter that applies all of this and
then execs the program), so no Python code runs between fork and exec here and it is safe to
call from a threaded process (the one fork, to sweep a uid, happens only when single-threaded).
Every capability (bounding set included) is dropped, whether or not the uid could be changed.  Features that are not available are recorded in
``capabilities().missing`` and logged once; nothing here imports jax or model code.

The uid and the killing of what a run leaves live in ``sandbox_procs.py``, the file-system helpers
(the Python installation, who can enter a directory) in ``sandbox_paths.py``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from prime_jax.rewards.sandbox_paths import others_can_traverse, prune_nested, python_paths, under
from prime_jax.rewards.sandbox_procs import allocate_uid, count_user_processes, kill_group, sweep_uid

logger = logging.getLogger(__name__)

_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_launcher.py")
_WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock", "/var/crash")
_SYSTEM_READ_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc",
                      "/dev", "/proc", "/sys")
_PROGRAM_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclasses.dataclass(frozen=True)
class SandboxCapabilities:
    """What isolation this process's sandbox actually applies (after probing and a smoke run)."""

    setuid: bool  # runs as a dedicated unprivileged uid
    uid: int | None
    netns: bool  # private network namespace
    pidns: bool  # private PID namespace (the kernel kills and reaps all leftovers)
    mntns: bool  # private mount namespace with tmpfs over world-writable dirs
    landlock_abi: int  # 0 = Landlock not used
    restrict_reads: bool  # Landlock also limits reads to system/Python dirs
    seccomp: bool  # socket() restricted to AF_UNIX by seccomp
    missing: tuple[str, ...] = ()  # human-readable notes on what is not available and why
    usable: bool = True  # False: even the minimal sandbox failed its smoke run

    @property
    def network_isolated(self) -> bool:
        return self.netns or self.seccomp or self.landlock_abi >= 4

    @property
    def filesystem_isolated(self) -> bool:
        """Writes outside the work dir are prevented (Landlock, or a non-root uid + tmpfs covers)."""
        return self.landlock_abi > 0 or (self.setuid and self.mntns)

    def describe(self) -> str:
        parts = [
            f"uid={'%d (dedicated)' % self.uid if self.setuid else 'same as grader'}",
            f"netns={self.netns}", f"pidns={self.pidns}", f"mntns={self.mntns}",
            f"landlock_abi={self.landlock_abi}", f"restrict_reads={self.restrict_reads}",
            f"seccomp={self.seccomp}",
        ]
        if self.missing:
            parts.append("missing: " + "; ".join(self.missing))
        return ", ".join(parts)


@dataclasses.dataclass
class RunResult:
    status: str  # "ok" (exited 0), "runtime_error", "timeout", "output_limit", "sandbox_error"
    returncode: int | None
    stdout: bytes
    elapsed: float
    detail: str = ""
    stderr_tail: str = ""  # last bytes of the program's stderr when it did not exit 0


def _tail(path: str, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read(n).decode("utf-8", "replace")
    except OSError:
        return ""


# ---------------------------------------------------------------------------- the runner
_run_lock = threading.Lock()  # one sandbox run at a time per process (they share the uid)


class Sandbox:
    """Per-process sandbox runner. Use :func:`get_sandbox` to share one per process."""

    def __init__(self, *, memory_mb: int = 1024, nproc: int = 32, fsize_mb: int = 64,
                 nofile: int = 256, restrict_reads: bool = True, use_setuid: bool = True,
                 use_netns: bool = True, use_pidns: bool = True, use_mntns: bool = True,
                 use_landlock: bool = True, use_seccomp: bool = True):
        self.memory_mb = memory_mb
        self.nproc = nproc
        self.fsize_mb = fsize_mb
        self.nofile = nofile
        self._want = dict(restrict_reads=restrict_reads, setuid=use_setuid, netns=use_netns,
                          pidns=use_pidns, mntns=use_mntns, landlock=use_landlock, seccomp=use_seccomp)
        self._python = sys.executable
        self._python_paths = python_paths()
        self._caps: SandboxCapabilities | None = None
        self._lock = threading.Lock()
        self._swept = False

    # -- capabilities ------------------------------------------------------------------
    @property
    def capabilities(self) -> SandboxCapabilities:
        with self._lock:
            if self._caps is None:
                self._caps = self._probe()
                level = logging.INFO if not self._caps.missing else logging.WARNING
                logger.log(level, "code sandbox: %s", self._caps.describe())
            return self._caps

    def _probe(self) -> SandboxCapabilities:
        return self._first_that_runs(self._probe_features())

    def _probe_features(self) -> SandboxCapabilities:
        """What the launcher finds the kernel permits, less what was turned off; `missing` says why
        each wanted layer is not there."""
        w = self._want
        root = os.geteuid() == 0
        uid = allocate_uid() if (root and w["setuid"]) else None
        missing: list[str] = []
        try:
            out = subprocess.run(
                [self._python, "-I", "-S", _LAUNCHER, "--probe",
                 json.dumps({"uid": uid, "probe_dir": tempfile.gettempdir()})],
                capture_output=True, timeout=60, env={}, check=False)
            feats = json.loads(out.stdout or b"{}")
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            feats = {}
            missing.append(f"probe failed: {e!r}")
        setuid = bool(feats.get("setuid")) and uid is not None
        netns = bool(feats.get("netns")) and w["netns"]
        pidns = bool(feats.get("pidns")) and w["pidns"]
        mntns = bool(feats.get("mntns")) and w["mntns"]
        landlock = int(feats.get("landlock_abi", 0)) if w["landlock"] else 0
        seccomp = bool(feats.get("seccomp")) and w["seccomp"]
        if not root:
            missing.append("not root: program runs as the grader's uid (no setuid)")
        elif uid is None:
            missing.append("no free unmapped uid for the sandbox" if w["setuid"] else "setuid disabled")
        elif not setuid:
            missing.append("setuid not permitted")
        if setuid and not mntns:
            blocked = [p for p in self._python_paths if others_can_traverse(p)]
            if blocked:
                setuid = False
                missing.append(f"python installation not reachable by other users ({blocked[0]}) "
                               "and no mount namespace to expose it: no setuid")
        if w["netns"] and not netns:
            missing.append("network namespace not permitted")
        if w["pidns"] and not pidns:
            missing.append("PID namespace not permitted (orphans are left to init to reap)")
        if w["mntns"] and not mntns:
            missing.append("mount namespace not permitted")
        if w["landlock"] and not landlock:
            missing.append("Landlock unavailable")
        if w["seccomp"] and not seccomp:
            missing.append("seccomp filter unavailable")
        return SandboxCapabilities(
            setuid=setuid, uid=uid if setuid else None, netns=netns, pidns=pidns, mntns=mntns,
            landlock_abi=landlock, restrict_reads=bool(landlock and w["restrict_reads"]),
            seccomp=seccomp, missing=tuple(missing))

    def _first_that_runs(self, caps: SandboxCapabilities) -> SandboxCapabilities:
        """A smoke run with `caps`; falls back step by step if a layer breaks the interpreter here
        (`usable` False when even resource limits alone fail)."""
        attempts = [caps]
        if caps.restrict_reads:
            attempts.append(dataclasses.replace(
                caps, restrict_reads=False, missing=caps.missing + ("read restriction broke the smoke run",)))
        attempts.append(dataclasses.replace(
            caps, mntns=False, landlock_abi=0, restrict_reads=False,
            setuid=caps.setuid and not any(others_can_traverse(p) for p in self._python_paths),
            missing=caps.missing + ("mount namespace/Landlock broke the smoke run",)))
        attempts.append(SandboxCapabilities(
            setuid=False, uid=None, netns=False, pidns=False, mntns=False, landlock_abi=0,
            restrict_reads=False, seccomp=False,
            missing=caps.missing + ("only resource limits: isolation layers broke the smoke run",)))
        last = ""
        for cand in attempts:
            with _run_lock:
                r = self._run_once(b"import sys; print(sys.stdin.read().strip() + '-ok')", b"smoke", 30.0, cand)
            if r.status == "ok" and r.stdout.strip() == b"smoke-ok":
                return cand
            last = f"{r.status}: {r.detail or r.stdout[-300:]!r}"
            logger.warning("sandbox smoke run failed with %s (%s)", cand.describe(), last)
        return dataclasses.replace(attempts[-1], usable=False,
                                   missing=attempts[-1].missing + (f"smoke run failed: {last}",))

    # -- running -------------------------------------------------------------------------
    def run(self, program: bytes | str, stdin: bytes | str, timeout: float) -> RunResult:
        """Run ``program`` (Python source) with ``stdin``; ``timeout`` is wall seconds.

        Runs are serialised per process (they share the process's sandbox uid, whose processes
        are all killed after each run); parallelism comes from the grading pool's processes."""
        caps = self.capabilities
        if not caps.usable:
            return RunResult("sandbox_error", None, b"", 0.0, "sandbox unusable: " + "; ".join(caps.missing))
        with _run_lock:
            return self._run_once(program, stdin, timeout, caps)

    def _config(self, caps: SandboxCapabilities, workdir: str, timeout: float, status_fd: int) -> dict:
        cpu = int(math.ceil(timeout)) + 1
        mem = self.memory_mb * 1024 * 1024
        fsize = self.fsize_mb * 1024 * 1024
        nproc = self.nproc
        if not caps.setuid:  # RLIMIT_NPROC counts every process of the (shared) real uid
            nproc = count_user_processes(os.getuid()) + self.nproc
        cover: list[str] = []
        binds: list[list] = []
        if caps.mntns:
            ww = []
            for d in _WORLD_WRITABLE:
                if os.path.isdir(d) and not os.path.islink(d):
                    ww.append(os.path.realpath(d))
            hidden = [h for h in (others_can_traverse(p) for p in self._python_paths + [workdir]) if h]
            cover = prune_nested(ww + (hidden if caps.setuid else []))
            for p in prune_nested(self._python_paths):
                if under(p, cover):
                    binds.append([p, False])
            if under(workdir, cover):
                binds.append([workdir, True])
        read_paths = list(_SYSTEM_READ_PATHS) + self._python_paths
        return {
            "uid": caps.uid if caps.setuid else None,
            "gid": caps.uid if caps.setuid else None,
            "netns": caps.netns,
            "pidns": caps.pidns,
            "mntns": caps.mntns,
            "cover": cover,
            "binds": binds,
            "workdir": workdir,
            "rlimits": {"CPU": [cpu, cpu + 1], "AS": [mem, mem], "NPROC": [nproc, nproc],
                        "FSIZE": [fsize, fsize], "NOFILE": [self.nofile, self.nofile], "CORE": [0, 0]},
            "landlock_abi": caps.landlock_abi,
            "restrict_reads": caps.restrict_reads,
            "read_paths": read_paths,
            "seccomp": caps.seccomp,
            "status_fd": status_fd,
            "argv": [self._python, "-I", "-B", "main.py"],
            "env": {"PATH": _PROGRAM_ENV_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
                    # one BLAS/OpenMP thread: thread pools sized to the host's cores would trip
                    # RLIMIT_NPROC / RLIMIT_AS on big machines
                    "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        }

    def _run_once(self, program, stdin, timeout: float, caps: SandboxCapabilities) -> RunResult:
        if isinstance(program, str):
            program = program.encode("utf-8", "surrogatepass")
        if isinstance(stdin, str):
            stdin = stdin.encode("utf-8", "surrogatepass")
        base = tempfile.mkdtemp(prefix="prime_jax_sbx_")
        uid = caps.uid if caps.setuid else None
        t0 = time.monotonic()
        try:
            os.chmod(base, 0o711)  # the sandbox uid may pass through, not list or read
            io_dir = os.path.join(base, "io")
            workdir = os.path.join(base, "work")
            os.mkdir(io_dir, 0o700)
            os.mkdir(workdir, 0o700)
            with open(os.path.join(workdir, "main.py"), "wb") as f:
                f.write(program)
            if uid is not None:
                os.chown(workdir, uid, uid)
                os.chown(os.path.join(workdir, "main.py"), uid, uid)
            in_path, out_path = os.path.join(io_dir, "stdin"), os.path.join(io_dir, "stdout")
            err_path = os.path.join(io_dir, "stderr")
            with open(in_path, "wb") as f:
                f.write(stdin)
            status_r, status_w = os.pipe()
            try:
                cfg = self._config(caps, workdir, timeout, status_w)
                with open(in_path, "rb") as fin, open(out_path, "wb") as fout, open(err_path, "wb") as ferr:
                    if uid is not None and not caps.pidns and not self._swept:
                        sweep_uid(uid)  # leftovers of an earlier process that held this uid
                        self._swept = True
                    proc = subprocess.Popen(
                        [self._python, "-I", "-S", _LAUNCHER, json.dumps(cfg)],
                        stdin=fin, stdout=fout, stderr=ferr, cwd=workdir, env={},
                        start_new_session=True, pass_fds=(status_w,), close_fds=True)
                os.close(status_w)
                status_w = -1
                result = self._supervise(proc, status_r, timeout, uid, caps.pidns, t0)
            finally:
                os.close(status_r)
                if status_w >= 0:
                    os.close(status_w)
            if result.status in ("ok", "runtime_error"):
                limit = self.fsize_mb * 1024 * 1024
                with open(out_path, "rb") as f:
                    result.stdout = f.read(limit + 1)
                if len(result.stdout) >= limit:
                    result.status, result.detail = "output_limit", "stdout reached the file size limit"
            if result.status != "ok":
                result.stderr_tail = _tail(err_path, 2000)
            return result
        except OSError as e:
            return RunResult("sandbox_error", None, b"", time.monotonic() - t0, f"{type(e).__name__}: {e}")
        finally:
            if uid is not None and not caps.pidns:
                sweep_uid(uid)
            shutil.rmtree(base, ignore_errors=True)

    def _supervise(self, proc: subprocess.Popen, status_r: int, timeout: float, uid, pidns: bool,
                   t0) -> RunResult:
        # 1) wait for the launcher to exec (status fd closes) or to report a set-up error
        msg = b""
        setup_deadline = time.monotonic() + 30.0
        while True:
            left = setup_deadline - time.monotonic()
            if left <= 0:
                kill_group(proc, uid, pidns)
                return RunResult("sandbox_error", None, b"", time.monotonic() - t0, "launcher did not start")
            r, _, _ = select.select([status_r], [], [], left)
            if r:
                chunk = os.read(status_r, 4096)
                if not chunk:
                    break
                msg += chunk
        if msg:
            proc.wait()
            return RunResult("sandbox_error", proc.returncode, b"", time.monotonic() - t0,
                             msg.decode("utf-8", "replace"))
        # 2) the program runs: wall-clock limit from the exec
        start = time.monotonic()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc, uid, pidns)
            return RunResult("timeout", None, b"", time.monotonic() - start, f"wall time > {timeout:.3g}s")
        kill_group(proc, uid, pidns)  # stragglers left in the group
        elapsed = time.monotonic() - start
        if rc == -signal.SIGXCPU or rc == -signal.SIGKILL and elapsed >= timeout:
            return RunResult("timeout", rc, b"", elapsed, "CPU time limit")
        if rc == -signal.SIGXFSZ:
            return RunResult("output_limit", rc, b"", elapsed, "file size limit")
        return RunResult("ok" if rc == 0 else "runtime_error", rc, b"", elapsed,
                         "" if rc == 0 else f"exit status {rc}")


_sandboxes: dict = {}
_sandboxes_lock = threading.Lock()


def get_sandbox(**kwargs) -> Sandbox:
    """One :class:`Sandbox` per (process, settings); probing happens on first use."""
    key = (os.getpid(), tuple(sorted(kwargs.items())))
    with _sandboxes_lock:
        sb = _sandboxes.get(key)
        if sb is None:
            sb = _sandboxes[key] = Sandbox(**kwargs)
        return sb


def capabilities(**kwargs) -> SandboxCapabilities:
    """Probe (once per process) and return what isolation the sandbox applies here."""
    return get_sandbox(**kwargs).capabilities
