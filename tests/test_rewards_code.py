"""Code verifier and its sandbox: scoring, and one test per containment property.

Each attack is phrased so that its *success* would make the program pass its test case, so a
score of 0 (plus a direct check of the side effect) proves it was contained."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from prime_jax.rewards import RewardPool, grade_response
from prime_jax.rewards.code import CodeGrader, extract_code, grade, grade_batch, grade_detailed, parse_tests
from prime_jax.rewards.sandbox import capabilities, get_sandbox
from prime_jax.rewards.sandbox_procs import UID_RANGES

REPO = Path(__file__).resolve().parents[1]

ADD_TESTS = json.dumps({
    "inputs": ["1 2\n", "3 4\n", "10 -5\n", "0 0\n", "7 8\n"],
    "outputs": ["3\n", "7\n", "5\n", "0\n", "15\n"],
})


def respond(code: str) -> str:
    return f"[ASSESS] easy.\n[OUTPUT]\n```python\n{code}\n```\n"


def one_test(expected: str, stdin: str = "") -> str:
    return json.dumps({"inputs": [stdin], "outputs": [expected]})


@pytest.fixture(scope="module")
def caps():
    c = capabilities()
    print(f"\nsandbox: {c.describe()}")
    assert c.usable, c.missing
    return c


# ----------------------------------------------------------------------------- scoring
def test_extract_code_takes_last_python_block():
    text = "```python\nprint(1)\n```\ntext\n```py\nprint(2)\n```\n```python\nprint(3)"  # last unterminated
    assert extract_code(text).strip() == "print(2)"
    assert extract_code("no code") is None
    assert extract_code("```\nprint(1)\n```") is None  # not marked python


def test_correct_program_scores_one(caps):
    assert grade(respond("a, b = map(int, input().split())\nprint(a + b)"), ADD_TESTS, timeout=5) == 1.0


def test_trailing_whitespace_is_ignored(caps):
    prog = "a, b = map(int, input().split())\nprint(str(a + b) + '   ')\nprint()\nprint()"
    assert grade(respond(prog), ADD_TESTS, timeout=5) == 1.0


def test_wrong_program_scores_zero(caps):
    res = grade_detailed(respond("a, b = map(int, input().split())\nprint(a - b - 1)"), ADD_TESTS, timeout=5)
    assert res.score == 0.0 and res.statuses == ["wrong_answer"] * 5


def test_partial_credit_three_of_five(caps):
    prog = "a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)"
    res = grade_detailed(respond(prog), ADD_TESTS, timeout=5)
    assert res.passed == 3 and res.total == 5 and res.score == pytest.approx(0.6)


def test_only_first_ten_tests_count(caps):
    tests = json.dumps({"inputs": [f"{i}\n" for i in range(12)], "outputs": [f"{i}\n" for i in range(12)]})
    prog = "x = int(input())\nprint(x if x != 3 else -1)"
    res = grade_detailed(respond(prog), tests, timeout=5)
    assert res.total == 10 and res.passed == 9 and res.score == pytest.approx(0.9)


def test_runtime_error_fails(caps):
    # right output, but a non-zero exit status: fails
    res = grade_detailed(respond("print(3)\nraise SystemExit(3)"), one_test("3\n"), timeout=5)
    assert res.score == 0.0 and res.statuses == ["runtime_error"]


@pytest.mark.parametrize("bad", [
    "not json", "[1, 2]", json.dumps({"inputs": ["1"]}), json.dumps({"inputs": ["1"], "outputs": []}),
    json.dumps({"inputs": [], "outputs": []}), json.dumps({"inputs": [{"a": 1}], "outputs": ["1"]}),
    json.dumps({"fn_name": "f", "inputs": [[1]], "outputs": [[1]]}), "",
])
def test_malformed_tests_score_zero_with_reason(bad, caplog):
    with caplog.at_level(logging.WARNING, logger="prime_jax.rewards.code"):
        res = grade_detailed(respond("print(1)"), bad, timeout=5)
    assert res.score == 0.0 and res.reason.startswith("malformed tests:")
    assert any("malformed tests" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError):
        parse_tests(bad)


def test_no_code_block_scores_zero():
    res = grade_detailed("I would loop over the input and add.", ADD_TESTS)
    assert res.score == 0.0 and "no ```python block" in res.reason


def test_grade_response_dispatches_code(caps):
    assert grade_response(respond("print(sum(map(int, input().split())))"), ADD_TESTS, "code") == 1.0


# ----------------------------------------------------------------------------- containment
def _sandbox_uid_processes(include_zombies: bool = True, uid_only: int | None = None) -> list[str]:
    """Live processes (and zombies) of the sandbox uids (or of ``uid_only``)."""
    out = []
    for name in os.listdir("/proc"):
        try:
            uid = os.stat(f"/proc/{name}").st_uid if name.isdigit() else -1
            if uid == uid_only if uid_only is not None else any(
                    base <= uid < base + span for base, span in UID_RANGES):
                state = open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()[0]
                if include_zombies or state != "Z":
                    out.append(f"{name}:{state}")
        except OSError:
            pass
    return out


@pytest.mark.timeout(60)
def test_infinite_loop_times_out_quickly(caps):
    t0 = time.monotonic()
    res = grade_detailed(respond("while True:\n    pass"), one_test("1\n"), timeout=1.0)
    wall = time.monotonic() - t0
    assert res.score == 0.0 and res.statuses == ["timeout"]
    assert wall < 1.0 + 5.0


@pytest.mark.timeout(60)
def test_fork_bomb_is_contained(caps):
    prog = ("import os\nprint('forking', flush=True)\nwhile True:\n"
            "    try:\n        os.fork()\n    except OSError:\n        pass")
    t0 = time.monotonic()
    res = grade_detailed(respond(prog), one_test("forking\n"), timeout=1.5)
    wall = time.monotonic() - t0
    assert res.score == 0.0 and res.statuses == ["timeout"]
    assert wall < 1.5 + 8.0
    # the host keeps running: we can still start processes, and nothing of the sandbox is left
    assert subprocess.run(["true"], timeout=10).returncode == 0
    # not even zombies with a PID namespace; otherwise orphans' zombies are init's to reap
    if caps.setuid:
        assert _sandbox_uid_processes(include_zombies=caps.pidns, uid_only=caps.uid) == []


@pytest.mark.timeout(120)
def test_fork_bomb_without_pid_namespace_is_swept_in_worker(caps):
    """The fallback when CLONE_NEWPID is not permitted: RLIMIT_NPROC + a kill of every process
    of the sandbox uid, reaped by the grading worker (a child subreaper), no zombies left."""
    if not caps.setuid:
        pytest.skip(f"no dedicated sandbox uid here: {caps.describe()}")
    prog = ("import os\nprint('forking', flush=True)\nwhile True:\n"
            "    try:\n        os.fork()\n    except OSError:\n        pass")
    before = set(_sandbox_uid_processes())  # (other grading sessions may share this machine)
    with CodeGrader(num_workers=1, timeout=1.5, sandbox_options={"use_pidns": False}) as grader:
        res = grader.grade_batch([respond(prog), respond("print(input())")],
                                 [one_test("forking\n"), one_test("x\n", "x\n")])
        assert list(res) == [0.0, 1.0] and res.infos[0]["statuses"] == ["timeout"]
        assert res.errors == res.timeouts == 0  # the sandbox still works after the bomb
        assert set(_sandbox_uid_processes()) - before == set()


@pytest.mark.timeout(60)
def test_memory_bomb_is_contained(caps):
    prog = "x = []\nwhile True:\n    x.append(bytearray(64 * 1024 * 1024))\nprint('allocated')"
    t0 = time.monotonic()
    res = grade_detailed(respond(prog), one_test("allocated\n"), timeout=5.0, memory_mb=512)
    assert res.score == 0.0 and res.statuses == ["runtime_error"]  # MemoryError under RLIMIT_AS
    assert time.monotonic() - t0 < 5.0 + 5.0


@pytest.mark.timeout(60)
def test_write_outside_workdir_is_denied(caps):
    if not caps.filesystem_isolated:
        pytest.skip(f"no filesystem isolation here: {caps.describe()}")
    targets = [Path("/tmp") / f"prime_escape_{uuid.uuid4().hex}",
               REPO / f"prime_escape_{uuid.uuid4().hex}",
               Path("/var/tmp") / f"prime_escape_{uuid.uuid4().hex}",
               Path("/dev/shm") / f"prime_escape_{uuid.uuid4().hex}"]
    prog = ("import sys\nok = 0\n"
            f"for p in {[str(t) for t in targets]!r}:\n"
            "    try:\n        open(p, 'w').write('pwned')\n        ok += 1\n"
            "    except OSError as e:\n        print('denied', p, e, file=sys.stderr)\n"
            "open('inside.txt', 'w').write('fine')\n"  # its own work dir is writable
            "print('wrote', ok)")
    try:
        r = get_sandbox().run(prog, "", 5.0)
        assert r.status == "ok", r
        assert r.stdout.decode().strip() == "wrote 0"
        assert grade(respond(prog), one_test(f"wrote {len(targets)}\n"), timeout=5) == 0.0
        for t in targets:
            assert not t.exists(), t
    finally:
        for t in targets:
            if t.exists():
                t.unlink()


@pytest.mark.timeout(60)
def test_network_connection_to_local_port_fails(caps):
    if not caps.network_isolated:
        pytest.skip(f"no network isolation here: {caps.describe()}")
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    prog = ("import socket\n"
            "try:\n"
            f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "    s.sendall(b'hello')\n    print('connected')\n"
            "except OSError as e:\n    print('refused', type(e).__name__)\n"
            "try:\n"
            "    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"    u.sendto(b'x', ('127.0.0.1', {port}))\n    print('udp sent')\n"
            "except OSError as e:\n    print('udp refused', type(e).__name__)\n")
    try:
        r = get_sandbox().run(prog, "", 5.0)
        assert r.status == "ok", r
        out = r.stdout.decode()
        assert "refused" in out and "connected" not in out and "udp sent" not in out, out
        assert grade(respond(prog), one_test("connected\nudp sent\n"), timeout=5) == 0.0
        with pytest.raises(BlockingIOError):
            srv.accept()  # nobody ever connected
    finally:
        srv.close()


@pytest.mark.timeout(60)
def test_parent_environment_is_not_readable(caps, monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("PRIME_TEST_SECRET", secret)
    prog = (
        "import os, glob\n"
        "found = [k + '=' + v for k, v in os.environ.items() if 'PRIME' in k or 's3cr3t' in v]\n"
        "for path in ['/proc/%d/environ' % os.getppid(), '/proc/1/environ'] + glob.glob('/proc/[0-9]*/environ'):\n"
        "    try:\n"
        "        data = open(path, 'rb').read()\n"
        "    except OSError:\n"
        "        continue\n"
        "    if b's3cr3t' in data:\n"
        "        found.append(path)\n"
        "print('env', sorted(os.environ))\n"
        "print('found', found)\n")
    # the grader's own process (and any process started from it now) has the secret
    assert secret in subprocess.run(["env"], capture_output=True, text=True).stdout
    r = get_sandbox().run(prog, "", 5.0)
    assert r.status == "ok", r
    out = r.stdout.decode()
    assert secret not in out and "found []" in out, out
    assert ("env ['HOME', 'LANG', 'MKL_NUM_THREADS', 'OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', "
            "'PATH', 'TMPDIR']") in out, out
    assert grade(respond("import os\nprint(os.environ.get('PRIME_TEST_SECRET'))"),
                 one_test(secret + "\n"), timeout=5) == 0.0


def test_runs_unprivileged_in_fresh_workdir(caps):
    prog = "import os\nprint(os.getuid(), os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR'], os.listdir('.'))"
    r1 = get_sandbox().run(prog, "", 5.0)
    r2 = get_sandbox().run(prog, "", 5.0)
    assert r1.status == r2.status == "ok"
    uid, same, listing = r1.stdout.decode().split(" ", 2)
    assert same == "True" and listing.strip() == "['main.py']"
    if caps.setuid:
        assert int(uid) == caps.uid != 0
    r3 = get_sandbox().run("print([l.split()[1] for l in open('/proc/self/status') if l.startswith('Cap')])", "", 5.0)
    assert r3.status == "ok" and set(eval(r3.stdout.decode())) == {"0000000000000000"}, r3.stdout
    assert r1.stdout != b"" and r2.stdout.decode().split(" ", 2)[2] == listing  # nothing carried over


# ----------------------------------------------------------------------------- pools
@pytest.mark.timeout(120)
def test_code_pool_batch(caps):
    good = respond("a, b = map(int, input().split())\nprint(a + b)")
    loop = respond("while True:\n    pass")
    with CodeGrader(num_workers=2, timeout=1.0, max_tests=2) as grader:
        t0 = time.monotonic()
        res = grader.grade_batch([good, loop, "no code", good], [ADD_TESTS, ADD_TESTS, ADD_TESTS, "{bad"])
        wall = time.monotonic() - t0
    assert list(res) == [1.0, 0.0, 0.0, 0.0]
    assert res.statuses == ["ok"] * 4 and res.timeouts == res.errors == 0
    assert res.infos[1]["statuses"] == ["timeout", "timeout"]
    assert "malformed" in res.infos[3]["reason"]
    assert wall < 60


@pytest.mark.timeout(120)
def test_reward_pool_mixed_batch(caps):
    items = [
        ("\\boxed{4}", "4", "math"),
        (respond("print(sum(map(int, input().split())))"), ADD_TESTS, "code"),
        ("\\boxed{5}", "4", "math"),
        (respond("print(0)"), ADD_TESTS, "code"),
    ]
    with RewardPool(num_workers=2, math_timeout=5.0, code_timeout=5.0, code_max_tests=4) as pool:
        res = pool.grade(items)
        assert list(res) == [1.0, 1.0, 0.0, 0.25]  # print(0) passes only the "0 0" case
        assert res.timeouts == 0 and res.errors == 0
        assert pool.stats.graded == 4


def test_module_grade_batch():
    res = grade_batch([respond("print(input())")], [one_test("hi\n", "hi\n")], timeout=5.0, num_workers=1)
    assert list(res) == [1.0] and res.errors == 0


# ----------------------------------------------------------------------------- layers one by one
_LAYERS = {
    # each configuration leaves exactly one layer responsible for each property
    "seccomp+landlock only": dict(use_netns=False, use_mntns=False, use_pidns=False),
    "netns+mntns only": dict(use_landlock=False, use_seccomp=False),
    "landlock only": dict(use_netns=False, use_mntns=False, use_seccomp=False, use_pidns=False),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(_LAYERS))
def test_each_isolation_layer_holds_alone(name, caps):
    sb = get_sandbox(**_LAYERS[name])
    c = sb.capabilities
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    target = Path("/tmp") / f"prime_escape_{uuid.uuid4().hex}"
    prog = ("import socket\nres = []\n"
            f"try:\n    open({str(target)!r}, 'w').write('x')\n    res.append('wrote')\n"
            "except OSError:\n    res.append('nowrite')\n"
            f"try:\n    socket.create_connection(('127.0.0.1', {srv.getsockname()[1]}), timeout=2)\n"
            "    res.append('connected')\nexcept OSError:\n    res.append('noconnect')\n"
            "caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'CapBnd'))]\n"
            "res.append('nocaps' if all(int(x, 16) == 0 for x in caps) else 'caps:' + ','.join(caps))\n"
            "print(*res)")
    try:
        r = sb.run(prog, "", 10.0)
        assert r.status == "ok", r
        out = r.stdout.decode().split()
        print(f"\n{name}: {c.describe()} -> {out}")
        assert out[2] == "nocaps"  # never root with capabilities, whatever the layers
        if c.filesystem_isolated:
            assert out[0] == "nowrite" and not target.exists()
        if c.network_isolated:
            assert out[1] == "noconnect"
            with pytest.raises(BlockingIOError):
                srv.accept()
    finally:
        srv.close()
        if target.exists():
            target.unlink()
