"""The trainer's own entry point on a 'pod' of CPU processes (jax.distributed on 127.0.0.1).

`python -m prime_jax.main` runs as 2 processes x 2 fake devices and as 1 process x 4 devices on a
very small tiny config, and must: finish with exit 0 on both processes, write metrics once, match
the 1-process run step for step, resume on the same and on the other topology, stop cleanly on a
SIGTERM to one host (checkpoint, exit 0 everywhere, exact resume), exit non-zero within a bounded
time when one host dies (kill -9), serve `evaluate` and `--export_hf` with 2 processes, and take the
same stop decision when rollouts are streamed (decode slots).

Every run starts from the same SFT weights (the uninterrupted 1-process run's `reference/`): SFT
itself all-reduces gradients in a topology-dependent order, so two topologies' SFT results differ
in the last bits, and at step 1 the PRM equals the reference, so q is pure round-off that the
batch normalisation lifts to O(1). From shared start weights, step 1 agrees to 1e-5; later steps
agree to round-off of the cross-process all-reduce (checked at 1e-3 relative).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from prime_jax.train.metrics import read_metrics, truncate_metrics
from test_trainer import SHORT, xla_cache_env

ROOT = Path(__file__).resolve().parents[1]

# test_trainer's very small run, 4 steps: 4 prompts x 4 samples = 16 rows per step (divisible by the 4
# devices of both topologies).
SMALL = {**SHORT, "total_steps": 4}
TOPOLOGIES = {"2x2": (2, 2), "1x4": (1, 4)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], topology: str, log_prefix: Path, cache: Path, heartbeat: int = 60) -> list:
    """Starts `python -m prime_jax.<args>` as the processes of `topology`; returns [(Popen, log path)]."""
    processes, devices = TOPOLOGIES[topology]
    port = _free_port()
    procs = []
    for pid in range(processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   PRIME_HEARTBEAT_TIMEOUT=str(heartbeat), **xla_cache_env(cache))
        for k in ("PRIME_COORDINATOR_ADDRESS", "PRIME_NUM_PROCESSES", "PRIME_PROCESS_ID", "PRIME_DISTRIBUTED"):
            env.pop(k, None)
        if processes > 1:
            env.update(PRIME_DISTRIBUTED="auto", PRIME_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       PRIME_NUM_PROCESSES=str(processes), PRIME_PROCESS_ID=str(pid))
        log = Path(f"{log_prefix}.{topology}.p{pid}.log")
        with open(log, "w") as out:
            procs.append((subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=out,
                                           stderr=subprocess.STDOUT), log))
    return procs


def _finish(procs: list, timeout: float = 600) -> list[int]:
    """Exit codes of every process (all killed if the deadline passes)."""
    deadline = time.time() + timeout
    try:
        return [proc.wait(timeout=max(1.0, deadline - time.time())) for proc, _ in procs]
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()


def _tails(procs: list) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-2500:]}" for _, log in procs)


def _train(workdir: Path, topology: str, cache: Path, **changes) -> list:
    values = {**SMALL, **changes}
    args = ["prime_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in values.items()]]
    return _launch(args, topology, workdir, cache)


def _run_ok(procs: list, timeout: float = 600) -> None:
    codes = _finish(procs, timeout)
    assert codes == [0] * len(procs), f"exit codes {codes}\n{_tails(procs)}"


def _train_rows(workdir: Path) -> dict[int, dict]:
    rows = [r for r in read_metrics(workdir / "metrics.jsonl") if "train/reward" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r for r in rows}


# Means of zero-centred values (RLOO returns, whitened advantages) cancel to about 1e-2 of their 0.1-1
# summands, so their rounding is absolute, on the summands' scale: they get an absolute tolerance of
# rtol x 0.1 (relative to the near-zero mean, a 2e-5 difference after a topology change read as 0.2%).
CENTRED_MEANS = ("returns/", "advantages/mean")


def _assert_close(expected: dict, got: dict, rtol: float, atol: float = 1e-5) -> None:
    bad = {}
    for key, value in expected.items():
        if key.startswith(("time/", "perf/")) or not isinstance(value, (int, float)):
            continue
        key_atol = max(atol, rtol * 0.1) if key.startswith(CENTRED_MEANS) else atol
        if not np.isclose(got.get(key, np.nan), value, rtol=rtol, atol=key_atol):
            bad[key] = (value, got.get(key))
    assert not bad, f"step {expected['step']}: {bad}"


def _start_from(source: Path, workdir: Path, keep_step: int | None = None) -> None:
    """A new workdir with `source`'s SFT weights (and, with keep_step, its checkpoint of that step)."""
    workdir.mkdir(parents=True)
    shutil.copytree(source / "reference", workdir / "reference")
    if keep_step is not None:
        shutil.copytree(source / "checkpoints" / str(keep_step), workdir / "checkpoints" / str(keep_step))
        shutil.copy(source / "metrics.jsonl", workdir / "metrics.jsonl")
        truncate_metrics(workdir / "metrics.jsonl", keep_step)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache) -> Path:
    """1 process x 4 devices, steps 1..4 without a stop: the run every other run must equal."""
    workdir = tmp_path_factory.mktemp("runs") / "one_process"
    _run_ok(_train(workdir, "1x4", cache))
    return workdir


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_on_the_other_topology(uninterrupted, cache, tmp_path):
    expected = _train_rows(uninterrupted)
    workdir = tmp_path / "two_processes"
    _start_from(uninterrupted, workdir)
    _run_ok(_train(workdir, "2x2", cache, total_steps=2))
    rows = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 2]  # eval 0, steps 1-2, eval 2: written once, by process 0
    got = _train_rows(workdir)
    _assert_close(expected[1], got[1], rtol=1e-5)
    _assert_close(expected[2], got[2], rtol=1e-3)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    assert (workdir / "hf_export" / "model.safetensors").exists()
    assert (workdir / "rollouts" / "step_0.html").exists() and (workdir / "tb").is_dir()

    # The 2-process checkpoint continues on 1 process x 4 devices, to a later step.
    _run_ok(_train(workdir, "1x4", cache))
    got = _train_rows(workdir)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        _assert_close(expected[step], got[step], rtol=1e-3)


@pytest.mark.slow
def test_streamed_rollouts_take_the_same_decisions_on_two_processes(uninterrupted, cache, tmp_path):
    """With decode slots the trainer grades groups as they finish and stops sampling once enough are
    back (the filter is off: the first 4 of 8 groups); every host must stop at the same group."""
    streamed = {"total_steps": 2, "rollout.decode_slots": 4}
    runs = {}
    for topology in ("1x4", "2x2"):
        runs[topology] = tmp_path / topology
        _start_from(uninterrupted, runs[topology])
        _run_ok(_train(runs[topology], topology, cache, **streamed))
    expected, got = _train_rows(runs["1x4"]), _train_rows(runs["2x2"])
    assert sorted(got) == [1, 2]
    for step, rtol in ((1, 1e-5), (2, 1e-3)):
        assert expected[step]["rollout/groups_cut"] == got[step]["rollout/groups_cut"] > 0
        assert expected[step]["filter/groups_trained"] == got[step]["filter/groups_trained"] == 4
        _assert_close(expected[step], got[step], rtol=rtol)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_processes(uninterrupted, cache, tmp_path):
    expected = _train_rows(uninterrupted)
    workdir = tmp_path / "reverse"
    _start_from(uninterrupted, workdir, keep_step=2)
    _run_ok(_train(workdir, "2x2", cache))
    got = _train_rows(workdir)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        _assert_close(expected[step], got[step], rtol=1e-3)


def _wait_for_step(workdir: Path, step: int, procs: list, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p, _ in procs):
        if any(r.get("step", 0) >= step and "train/reward" in r for r in read_metrics(workdir / "metrics.jsonl")):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} was not reached\n{_tails(procs)}")


@pytest.mark.slow
def test_sigterm_to_one_host_saves_and_resumes_exactly(uninterrupted, cache, tmp_path):
    """A spot VM's SIGTERM reaches host 1 only: both hosts stop at the same step boundary with a
    checkpoint and exit 0; the same command then finishes the run like an uninterrupted one."""
    workdir = tmp_path / "preempted"
    _start_from(uninterrupted, workdir)
    procs = _train(workdir, "2x2", cache, total_steps=12, checkpoint_every=0, eval_every=0)
    _wait_for_step(workdir, 1, procs)
    procs[1][0].send_signal(signal.SIGTERM)
    _run_ok(procs, timeout=300)
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 1 <= saved[0] < 12, saved
    assert "preempted: stopped after step" in procs[0][1].read_text()
    assert not (workdir / "hf_export").exists()  # a preempted run is not finished: nothing exported

    _run_ok(_train(workdir, "2x2", cache, total_steps=4, checkpoint_every=0, eval_every=0))
    expected, got = _train_rows(uninterrupted), _train_rows(workdir)
    assert sorted(got) == [1, 2, 3, 4]
    _assert_close(expected[1], got[1], rtol=1e-5)
    for step in (2, 3, 4):
        _assert_close(expected[step], got[step], rtol=1e-3)


@pytest.mark.slow
def test_a_dead_host_stops_the_others_in_bounded_time(uninterrupted, cache, tmp_path):
    """kill -9 of host 1: host 0 exits 1 within about the heartbeat timeout, with one line naming the
    lost process, the last checkpoint and how to resume (no Gloo traceback, no abort)."""
    workdir = tmp_path / "host_lost"
    _start_from(uninterrupted, workdir)
    values = {**SMALL, "total_steps": 200, "eval_every": 0, "checkpoint_every": 1}
    args = ["prime_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in values.items()]]
    heartbeat = 45  # a busy host's watch thread can wait tens of seconds for the GIL (lowering under load): 5 and 20 s misfired at load 5
    procs = _launch(args, "2x2", workdir, cache, heartbeat=heartbeat)
    _wait_for_step(workdir, 2, procs)
    procs[1][0].kill()  # kill -9 of host 1
    killed_at = time.time()
    code = _finish(procs[:1], timeout=4 * heartbeat + 30)[0]
    waited = time.time() - killed_at
    _finish(procs)
    log = procs[0][1].read_text()
    assert code == 1, _tails(procs)
    assert waited < 4 * heartbeat + 10, f"host 0 needed {waited:.0f} s to notice"
    for noise in ("Traceback", "Check failure", "Gloo AllGather failed", "coordination_service"):
        assert noise not in log, (noise, log[-3000:])
    errors = [line for line in log.splitlines() if line.startswith("prime_jax.main: error: ")]
    assert len(errors) == 1, log[-3000:]
    found = re.fullmatch(r"prime_jax\.main: error: process 1 of 2 \(host [^)]+\) stopped answering \(no sign of life "
                         r"for 45 s\); the last checkpoint is step (\d+) in (.+); rerun the same command on all hosts "
                         r"to resume", errors[0])
    assert found and found.group(2) == str(workdir / "checkpoints"), errors[0]
    # host 1 may die while step 2's checkpoint is being written: the line names the newest complete one
    assert int(found.group(1)) >= 1 and (workdir / "checkpoints" / found.group(1) / "state").is_dir()


@pytest.mark.slow
def test_evaluate_and_export_with_two_processes(uninterrupted, cache, tmp_path):
    from safetensors.numpy import load_file

    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    shutil.rmtree(workdir / "hf_export")
    config = [f"--config.{k}={v}" for k, v in SMALL.items()]
    _run_ok(_launch(["prime_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}", "--export_hf", *config],
                    "2x2", tmp_path / "export", cache))
    ours, single = load_file(workdir / "hf_export" / "model.safetensors"), load_file(
        uninterrupted / "hf_export" / "model.safetensors")
    assert ours.keys() == single.keys()
    for name in single:
        np.testing.assert_array_equal(ours[name], single[name], err_msg=name)

    # 2 samples a problem, reranked by the run's implicit PRM (the PRM scorer runs on both processes too).
    _run_ok(_launch(["prime_jax.evaluate", "--config=configs/tiny.py", f"--workdir={workdir}", "--tag=two",
                     "--n=2", "--temperature=1.0", f"--prm={workdir}", *config], "2x2", tmp_path / "evaluate", cache))
    assert (workdir / "eval" / "two" / "scores.json").exists()
