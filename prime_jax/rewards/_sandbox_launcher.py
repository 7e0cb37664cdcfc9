"""Sandbox launcher: set up isolation in this (child) process, then exec the untrusted program.

Run as ``python -I -S _sandbox_launcher.py CONFIG_JSON`` by :mod:`prime_jax.rewards.sandbox`,
never imported by the package (stdlib only, no ``site``). It starts with the grader's privileges
(root when the trainer runs as root) and, in this order:

1. mount namespace (optional): make every mount private, cover world-writable directories and the
   ancestors that hide the Python installation with fresh tmpfs mounts, bind the work directory and
   the Python installation back in (Python read-only);
2. network namespace (optional): a new, empty one (only a down loopback); PID namespace
   (optional): the program becomes its init, so when it dies the kernel kills and reaps every
   process it left behind (no zombies that would count against RLIMIT_NPROC);
3. resource limits (CPU, address space, processes, file size, open files, core);
4. drops to an unprivileged uid/gid with no supplementary groups (when root);
5. no_new_privs, Landlock (writes only beneath the work directory, reads only from the system and
   Python directories, no TCP bind/connect, no signals or abstract sockets outside), seccomp
   (no socket() other than AF_UNIX, no io_uring, native syscall ABI only);
6. execve of the program with the given (nearly empty) environment; with a PID namespace the
   launcher forks first, the child execs and the launcher waits and passes on its exit status.

Any failure before the exec is written to the status fd and the launcher exits 125 without
running the program; a successful exec closes the status fd (it is close-on-exec), which the
parent sees as EOF.  ``--probe`` reports which features this kernel/container permits.
"""
import ctypes
import json
import os
import platform
import resource
import signal
import struct
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# Landlock (linux/landlock.h)
LL_CREATE_RULESET_VERSION = 1
LL_RULE_PATH_BENEATH = 1
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

_ARCH = {
    # machine: (AUDIT_ARCH, __NR_socket, __NR_io_uring_setup, has x32 ABI, landlock syscalls base)
    "x86_64": (0xC000003E, 41, 425, True),
    "aarch64": (0xC00000B7, 198, 425, False),
}
NR_LANDLOCK_CREATE_RULESET = 444
NR_LANDLOCK_ADD_RULE = 445
NR_LANDLOCK_RESTRICT_SELF = 446

_libc = ctypes.CDLL(None, use_errno=True)  # the interpreter links libc
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class SetupError(Exception):
    pass


def _check(ret, what):
    if ret < 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)} (errno {err})")
    return ret


def _mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else os.fsencode(s)
    _check(_libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _unshare(flags, what):
    _check(_libc.unshare(flags), f"unshare({what})")


# ------------------------------------------------------------------ mounts
def _setup_mounts(cfg):
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do here may leak to the host
    binds = []
    for path, writable in cfg["binds"]:
        binds.append((path, writable, os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)))
    for cover in cfg["cover"]:
        _mount("tmpfs", cover, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=0755")
    for path, writable, fd in binds:
        os.makedirs(path, mode=0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        if not writable:
            _mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)


# ------------------------------------------------------------------ landlock
def landlock_abi():
    try:
        r = _libc.syscall(NR_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                          ctypes.c_uint32(LL_CREATE_RULESET_VERSION))
    except Exception:
        return 0
    return int(r) if r > 0 else 0


def _landlock(cfg):
    abi = int(cfg["landlock_abi"])
    write_rights = (FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_CHAR | FS_MAKE_DIR
                    | FS_MAKE_REG | FS_MAKE_SOCK | FS_MAKE_FIFO | FS_MAKE_BLOCK | FS_MAKE_SYM)
    if abi >= 2:
        write_rights |= FS_REFER
    if abi >= 3:
        write_rights |= FS_TRUNCATE
    read_rights = FS_READ_FILE | FS_READ_DIR | FS_EXECUTE
    restrict_reads = bool(cfg["restrict_reads"])
    handled_fs = write_rights | (read_rights if restrict_reads else 0)
    handled_net = (NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 else 0
    scoped = (SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL) if abi >= 6 else 0
    if abi >= 6:
        attr = struct.pack("=QQQ", handled_fs, handled_net, scoped)
    elif abi >= 4:
        attr = struct.pack("=QQ", handled_fs, handled_net)
    else:
        attr = struct.pack("=Q", handled_fs)
    buf = ctypes.create_string_buffer(attr, len(attr))
    rfd = _check(_libc.syscall(NR_LANDLOCK_CREATE_RULESET, buf, ctypes.c_size_t(len(attr)),
                               ctypes.c_uint32(0)), "landlock_create_ruleset")

    def allow(path, rights):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return  # a path that does not exist here needs no rule
        try:
            if not os.path.isdir(path):  # only file rights apply to a file
                rights &= FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE
            rule = ctypes.create_string_buffer(struct.pack("=Qi", rights & handled_fs, fd), 12)
            _check(_libc.syscall(NR_LANDLOCK_ADD_RULE, rfd, LL_RULE_PATH_BENEATH, rule,
                                 ctypes.c_uint32(0)), f"landlock_add_rule({path})")
        finally:
            os.close(fd)

    allow(cfg["workdir"], handled_fs)
    allow("/dev/null", FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE)
    if restrict_reads:
        for path in cfg["read_paths"]:
            allow(path, read_rights)
    _check(_libc.syscall(NR_LANDLOCK_RESTRICT_SELF, rfd, ctypes.c_uint32(0)), "landlock_restrict_self")
    os.close(rfd)


# ------------------------------------------------------------------ seccomp
def _seccomp_program():
    arch = _ARCH.get(platform.machine())
    if arch is None:
        raise SetupError(f"seccomp: unsupported architecture {platform.machine()}")
    audit_arch, nr_socket, nr_io_uring_setup, x32 = arch
    LD_W_ABS, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06
    ALLOW, KILL = 0x7FFF0000, 0x80000000
    DENY = 0x00050000 | 13  # SECCOMP_RET_ERRNO | EACCES
    # label-based assembly: ("jeq"/"jge", k, true_label, false_label)
    prog = [
        ("ld", 4), ("jeq", audit_arch, "nr", "kill"),
        ("label", "nr"), ("ld", 0),
    ]
    if x32:
        prog += [("jge", 0x40000000, "deny", "n1"), ("label", "n1")]
    prog += [
        ("jeq", nr_socket, "sock", "n2"), ("label", "n2"),
        ("jeq", nr_io_uring_setup, "deny", "allow"),
        ("label", "sock"), ("ld", 16), ("jeq", 1, "allow", "deny"),  # AF_UNIX only
        ("label", "deny"), ("ret", DENY),
        ("label", "allow"), ("ret", ALLOW),
        ("label", "kill"), ("ret", KILL),
    ]
    labels, pc = {}, 0
    for ins in prog:
        if ins[0] == "label":
            labels[ins[1]] = pc
        else:
            pc += 1
    out, pc = [], 0
    for ins in prog:
        if ins[0] == "label":
            continue
        if ins[0] == "ld":
            out.append(struct.pack("=HBBI", LD_W_ABS, 0, 0, ins[1]))
        elif ins[0] == "ret":
            out.append(struct.pack("=HBBI", RET, 0, 0, ins[1]))
        else:
            jt, jf = labels[ins[2]] - pc - 1, labels[ins[3]] - pc - 1
            assert 0 <= jt < 256 and 0 <= jf < 256
            out.append(struct.pack("=HBBI", JEQ if ins[0] == "jeq" else JGE, jt, jf, ins[1]))
        pc += 1
    return b"".join(out), len(out)


def _seccomp():
    code, n = _seccomp_program()
    filt = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(n, ctypes.cast(filt, ctypes.c_void_p))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "seccomp")


# ------------------------------------------------------------------ main
def _rlimits(cfg):
    for name, (soft, hard) in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), (int(soft), int(hard)))


def _clear_bounding_set():
    """Empty the ambient and bounding capability sets: nothing exec'd later can regain one."""
    PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0:
            if ctypes.get_errno() == 22:
                break  # EINVAL: past the last capability
            raise SetupError(f"PR_CAPBSET_DROP: errno {ctypes.get_errno()}")


def _drop_capabilities():
    """Root that could not change uid: empty the effective/permitted/inheritable sets too."""
    header = ctypes.create_string_buffer(struct.pack("=Ii", 0x20080522, 0), 8)  # v3, this thread
    data = ctypes.create_string_buffer(bytes(24), 24)
    _check(_libc.capset(header, data), "capset")


def _drop_privileges(cfg):
    uid, gid = cfg["uid"], cfg["gid"]
    if os.geteuid() == 0:
        _clear_bounding_set()
    if uid is None:
        if os.geteuid() == 0:
            _drop_capabilities()
        return
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise SetupError("setuid did not take effect")


def _exec_program(cfg):
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")
    os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])


def _confine(cfg):
    """Drop to the sandbox uid and apply no_new_privs, Landlock and seccomp (irreversible)."""
    _drop_privileges(cfg)
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    if cfg["landlock_abi"]:
        _landlock(cfg)
    if cfg["seccomp"]:
        _seccomp()


def _setup_and_exec(cfg):
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)  # closed by the exec: the parent reads EOF = "started"
    if cfg["mntns"]:
        _unshare(CLONE_NEWNS, "CLONE_NEWNS")
        _setup_mounts(cfg)
    if cfg["netns"]:
        _unshare(CLONE_NEWNET, "CLONE_NEWNET")
    if cfg.get("pidns"):
        _unshare(CLONE_NEWPID, "CLONE_NEWPID")
    os.chdir(cfg["workdir"])
    _rlimits(cfg)
    if not cfg.get("pidns"):
        _confine(cfg)
        _exec_program(cfg)
        return
    # PID namespace: the child (PID 1 there) is confined and execs the program; this process
    # keeps the grader's uid, so a kill of every sandbox-uid process spares it, and it reaps the
    # program (the kernel kills and reaps the rest of the namespace when its init dies).
    pid = os.fork()
    if pid == 0:
        try:
            _confine(cfg)
            _exec_program(cfg)
        except BaseException as e:  # noqa: BLE001
            os.write(status_fd, f"sandbox setup failed: {type(e).__name__}: {e}".encode()[:4000])
        os._exit(125)
    os.close(status_fd)
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")

    def _stop(signum, frame):  # the grader's timeout: kill the program, then reap it below
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, _stop)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    while True:
        try:
            _, st = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(st):
        sig = os.WTERMSIG(st)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(st) if os.WIFEXITED(st) else 1)


def _probe(cfg):
    """Try each feature in a throwaway child; print a JSON object of what works."""

    def trial(fn):
        pid = os.fork()
        if pid == 0:
            try:
                fn()
                os._exit(0)
            except BaseException:
                os._exit(1)
        _, st = os.waitpid(pid, 0)
        return os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0

    uid = cfg.get("uid")

    def t_setuid():
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)

    def t_mntns():
        _unshare(CLONE_NEWNS, "CLONE_NEWNS")
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        _mount("tmpfs", cfg.get("probe_dir", "/tmp"), "tmpfs", MS_NOSUID | MS_NODEV, "size=1m")

    def t_seccomp():
        import socket  # the seccomp self-test alone needs it

        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _seccomp()
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()
        try:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except PermissionError:
            return
        raise SetupError("AF_INET socket was not refused")

    res = {
        "euid": os.geteuid(),
        "setuid": uid is not None and os.geteuid() == 0 and trial(t_setuid),
        "netns": trial(lambda: _unshare(CLONE_NEWNET, "CLONE_NEWNET")),
        "pidns": trial(lambda: _unshare(CLONE_NEWPID, "CLONE_NEWPID")),
        "mntns": trial(t_mntns),
        "landlock_abi": landlock_abi(),
        "seccomp": trial(t_seccomp),
    }
    sys.stdout.write(json.dumps(res))


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "--probe":
        _probe(json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
        return
    cfg = json.loads(sys.argv[1])
    try:
        _setup_and_exec(cfg)
    except BaseException as e:  # noqa: BLE001 - report every set-up failure to the parent
        try:
            os.write(cfg["status_fd"], f"sandbox setup failed: {type(e).__name__}: {e}".encode()[:4000])
        finally:
            os._exit(125)


if __name__ == "__main__":
    main()
