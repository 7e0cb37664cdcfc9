"""What a user hits, round two (issue 31), through the real entry points: `--help` and the config's
field listing, Ctrl-C (the real SIGINT, sent to the process group as a terminal sends it) during
training, SFT and evaluate, and an evaluation of the user's own problem file."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_trainer import SHORT, _env, overrides

ROOT = Path(__file__).resolve().parents[1]
LOG_LINE = re.compile(r"[IWE]\d{4} ")  # an absl log record


def _run(tool: str, *args: str, tmp_path: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"prime_jax.{tool}", *args], cwd=ROOT, env=_env(tmp_path / "xla"),
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------ item 5: --help, the fields
@pytest.mark.parametrize("tool", ["main", "evaluate", "plan"])
def test_help_exits_0_and_shows_config_and_how_to_list_and_set_fields(tool, tmp_path):
    proc = _run(tool, "--help", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = proc.stdout.splitlines()[0]
    assert first.startswith(("PRIME training CLI", "Benchmark evaluation CLI", "Memory plan")), first
    for needle in ("--config=FILE[:ARG]", "--config.SECTION.FIELD=VALUE", "--list_fields",
                   "sections: model, tokenizer, data, rollout, algo"):
        assert needle in proc.stdout, (needle, proc.stdout[-3000:])
    if tool == "main":
        assert "--workdir=VALUE" in proc.stdout and "Default: configs/tiny.py." in proc.stdout


def test_help_and_field_listing_read_through_head_end_quietly():
    """`--help | head` / `--list_fields | head`: the reader closes the pipe early; no BrokenPipeError
    traceback, exit 0 (every CLI prints them with cli.print_text)."""
    code = "from prime_jax.cli import print_text; print_text('a line of help\\n' * 100000)"
    proc = subprocess.run(["bash", "-c", f'set -o pipefail; {sys.executable} -c "{code}" | head -1'], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "a line of help\n", ""), proc.stderr


def test_list_fields_shows_every_documented_field_by_section_with_its_default(tmp_path):
    from prime_jax.config import field_names
    from prime_jax.config_fields import field_docs

    proc = _run("main", "--list_fields", "--config.rollout.n=8", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Config fields of configs/tiny.py, set with --config.<field>=<value>"), lines[0]
    assert "[rollout]  sampling: training rollouts and the held-out evaluation" in lines
    n = next(line for line in lines if "--config.rollout.n=" in line)
    assert n.split() == ["--config.rollout.n=8", *"samples per prompt (>= 2 for leave-one-out baselines) (default 4)"
                         .split()], n
    shown = {m.group(1) for m in re.finditer(r"--config\.([\w.]+)=", proc.stdout)}
    assert shown == set(field_names())
    docs = field_docs()
    assert all(docs[name] for name in field_names()), [name for name in field_names() if not docs[name]]


@pytest.mark.parametrize("args, line", [
    (["--config.total_step=3"], "unknown config field 'total_step' (did you mean 'total_steps'?); "
                                "--list_fields lists every field"),
    (["--config.model.hidden_sise=8"], "unknown config field 'model.hidden_sise' (did you mean 'model.hidden_size'?)"),
])
def test_misspelt_field_is_one_plain_line(args, line, tmp_path):
    proc = _run("main", f"--workdir={tmp_path / 'w'}", *args, tmp_path=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith(f"prime_jax.main: error: {line}"), proc.stderr
    assert "\\" not in proc.stderr and '"' not in proc.stderr  # no repr-of-repr quoting


@pytest.mark.parametrize("args, needle", [
    (["--config=configs/qwen7b.py:v5p32"], "unknown mesh preset 'v5p32'; known: ['16xh100', '8xh100', 'v4-64'"),
    (["--config=configs/qwen7b.py:v5p-32", "--config.rollout.nn=4"], "unknown config field 'rollout.nn' (did you "
                                                                    "mean 'rollout.n'?)"),
    ([], "--config is required"),
])
def test_plan_mistakes_are_one_line(args, needle, tmp_path):
    proc = _run("plan", *args, tmp_path=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("prime_jax.plan: error: ") and needle in lines[0], lines


# ------------------------------------------------------------------------------ item 1: Ctrl-C
def _start(tool: str, workdir: Path, cache: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """`python -m prime_jax.<tool>` in a process group of its own (a terminal's foreground job)."""
    err = workdir.parent / f"{workdir.name}.{tool}.{time.monotonic_ns()}.err"
    workdir.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", f"prime_jax.{tool}", "--config=configs/tiny.py",
                             f"--workdir={workdir}", *args], cwd=ROOT, env=_env(cache), stdout=subprocess.PIPE,
                            stderr=open(err, "w"), text=True, start_new_session=True)
    return proc, err


def _wait_until(proc: subprocess.Popen, done, err: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if done():
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"not reached (exit {proc.poll()}):\n{err.read_text()[-3000:]}")


def _ctrl_c(proc: subprocess.Popen, times: int = 1, gap: float = 0.02) -> tuple[int, str]:
    """Ctrl-C as a terminal sends it: SIGINT to the whole foreground process group."""
    for k in range(times):
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(gap)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def _trained_to(workdir: Path, step: int):
    def reached() -> bool:
        path = workdir / "metrics.jsonl"
        return path.exists() and any(f'"step": {step}, "' in line and "train/reward" in line
                                     for line in path.read_text().splitlines())
    return reached


def _user_lines(err: Path) -> list[str]:
    """What the user reads on stderr besides log records."""
    return [line for line in err.read_text().splitlines() if line.strip() and not LOG_LINE.match(line)]


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_the_same_command_resumes(tmp_path):
    """Once: the run stops after the step in progress with a checkpoint, exit 130; the same command
    resumes from it. Twice in a row: it stops at once, in one line naming the last checkpoint."""
    workdir, cache = tmp_path / "run", tmp_path / "xla"
    args = overrides(dict(SHORT, total_steps=40, eval_every=0, checkpoint_every=0, **{"sft.steps": 0}))
    proc, err = _start("main", workdir, cache, *args)
    _wait_until(proc, _trained_to(workdir, 1), err)
    code, out = _ctrl_c(proc)
    assert code == 130, err.read_text()[-3000:]
    step = int(re.fullmatch(r"interrupted \(Ctrl-C\): stopped after step (\d+) with a checkpoint in "
                            rf"{re.escape(str(workdir))}; rerun the same command to resume", out.strip()).group(1))
    assert "Traceback" not in err.read_text() and _user_lines(err) == [], err.read_text()[-3000:]
    assert "Ctrl-C: stopping after the step in progress, with a checkpoint" in err.read_text()
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [step]

    proc, err = _start("main", workdir, cache, *args)  # the same command
    _wait_until(proc, _trained_to(workdir, step + 1), err)
    code, out = _ctrl_c(proc, times=2)
    log = err.read_text()
    assert code == 130 and f"resumed from the checkpoint of step {step}" in log and "Traceback" not in log, log[-3000:]
    if "Ctrl-C: writing the checkpoint" in log:
        # the first Ctrl-C met a step boundary at once (a loaded box): the second landed while that checkpoint was
        # written, which by design it lets finish (a third would abort), so the run stops as after one Ctrl-C
        assert re.fullmatch(r"interrupted \(Ctrl-C\): stopped after step \d+ with a checkpoint in "
                            rf"{re.escape(str(workdir))}; rerun the same command to resume", out.strip()), out
    else:
        assert out == "", out
        assert _user_lines(err) == [
            "prime_jax.main: interrupted (Ctrl-C): stopped without saving the step in progress; the last checkpoint "
            f"is step {step} in {workdir / 'checkpoints'}: rerun the same command to resume from it"], log[-3000:]
    rows = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows[:step + 1] == list(range(step + 1)) and len(set(rows)) == len(rows), rows  # not restarted at 0


@pytest.mark.slow
def test_ctrl_c_during_sft_and_evaluate_is_one_line_and_evaluate_resumes(tmp_path):
    workdir, cache = tmp_path / "run", tmp_path / "xla"
    proc, err = _start("main", workdir, cache, *overrides(dict(SHORT, **{"sft.steps": 5000})))
    _wait_until(proc, lambda: "SFT: " in err.read_text(), err)
    code, out = _ctrl_c(proc)
    assert code == 130 and "Traceback" not in err.read_text(), err.read_text()[-3000:]
    lines = _user_lines(err)  # the SFT stage stops after the step in progress and saves its state
    assert len(lines) == 1 and re.fullmatch(
        r"prime_jax\.main: interrupted \(Ctrl-C\): the SFT stage stopped after step \d+ with its state in "
        + re.escape(str(workdir / "sft_checkpoints")) + r"; rerun the same command to resume", lines[0]), lines

    # evaluate: 48 problems in chunks of 4 (a random model: it writes all 16 tokens)
    args = ["--benchmarks=synthetic", "--limit=48", "--batch_size=4", "--max_new_tokens=16",
            "--config.model.hidden_size=32", "--config.model.intermediate_size=64", "--config.model.num_layers=1",
            "--config.model.num_heads=2", "--config.model.num_kv_heads=1", "--config.reward.workers=1"]
    progress = workdir / "eval" / "random_greedy" / "progress" / "synthetic.jsonl"
    proc, err = _start("evaluate", workdir, cache, *args)
    _wait_until(proc, lambda: progress.exists() and len(progress.read_text().splitlines()) >= 2, err)
    code, out = _ctrl_c(proc)
    assert code == 130 and "Traceback" not in err.read_text(), err.read_text()[-3000:]
    assert _user_lines(err) == [f"prime_jax.evaluate: interrupted (Ctrl-C): the graded chunks are kept in "
                                f"{progress.parent}: rerun the same command to resume from them"]
    done = len(progress.read_text().splitlines()) - 1
    proc = subprocess.run([sys.executable, "-m", "prime_jax.evaluate", "--config=configs/tiny.py",
                           f"--workdir={workdir}", *args], cwd=ROOT, env=_env(cache), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"synthetic: resuming, {done} chunk(s) already evaluated" in proc.stderr
    assert len((workdir / "eval" / "random_greedy" / "synthetic.jsonl").read_text().splitlines()) == 48


# ------------------------------------------------------------------------------ item 2: the user's own problems
def test_own_problem_file_says_its_instruction_and_an_unscored_run_fails(tmp_path):
    """{problem, answer} rows: evaluate says what it appends (configs/tiny.py: nothing, as its
    model was trained), and when every prompt is too long it exits 2 saying how long they are,
    instead of exit 0 with no score. (That such a file scores like the task's own prompts, and
    `data.instruction`: tests/test_run_outputs.py, on a trained run.)"""
    rows = [{"problem": f"Compute ({a}+{b})*2", "answer": str((a + b) * 2)} for a, b in [(1, 2), (3, 4), (5, 1)]]
    own = tmp_path / "my.jsonl"
    own.write_text("".join(json.dumps(r) + "\n" for r in rows))
    small = ["--config=configs/tiny.py", "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
             "--config.model.num_layers=1", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
             "--config.reward.workers=1", "--max_new_tokens=4", f"--benchmarks={own}", f"--workdir={tmp_path / 'w'}"]
    proc = _run("evaluate", *small, "--config.data.max_prompt_tokens=12", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0] == (
        "data.instruction=none: adds nothing after the problems (benchmark-format rows; veRL rows keep their own "
        "prompt); --config.data.instruction=none | eurus2 | step_by_step | 'your own sentence' changes it")
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"prime_jax\.evaluate: error: nothing was scored: every prompt \(3 problems\) is longer than "
                        r"data\.max_prompt_tokens=12 \(they are (\d+) tokens\); raise it, e\.g\. "
                        r"--config\.data\.max_prompt_tokens=\1", last), last
    assert not (tmp_path / "w" / "eval" / "random_greedy").exists()  # no empty result left behind

