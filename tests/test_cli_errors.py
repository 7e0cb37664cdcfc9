"""What a user meets at the command line (issue 14): every mistake ends with one line and exit
status 2, quickly; no training loop spins on prompts that cannot fit; bad SFT rows are counted and
skipped; the start-up prints no TPU/PyTorch noise on CPU."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_trainer import SHORT, _env, overrides

ROOT = Path(__file__).resolve().parents[1]


def _main(tmp_path: Path, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "prime_jax.main", "--config=configs/tiny.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env or _env(tmp_path / "xla_cache"), capture_output=True, text=True,
                          timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The run failed with exit 2 and one error line (its last) holding `needles`; the only other
    lines allowed are log records (e.g. the reader's count of skipped rows), no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert all(re.match(r"[IWE]\d{4} ", line) for line in lines[:-1]) and len(lines) <= 3, proc.stderr[-3000:]
    lines = lines[-1:]
    assert lines[0].startswith("prime_jax.main: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("args, needles", [
    (["--config.nosuch=1"], ["unknown config field 'nosuch'"]),
    (["--config.rollout.n=abc"], ["--config.rollout.n=abc"]),
    (["--config=configs/nope.py"], ["configs/nope.py", "No such file"]),
    (["--config.data.format=bogus"], ["data.format", "bogus"]),
])
def test_flag_and_config_mistakes_print_one_line(tmp_path, args, needles):
    cmd = [sys.executable, "-m", "prime_jax.main", f"--workdir={tmp_path / 'w'}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path / "xla_cache"), capture_output=True, text=True, timeout=120)
    _one_error_line(proc, *needles)


def test_misspelt_benchmark_fails_fast_without_hub_retries(tmp_path):
    t0 = time.perf_counter()
    proc = _main(tmp_path, f"--workdir={tmp_path / 'w'}", "--config.data.eval=synthetic,math50")
    line = _one_error_line(proc, "data.eval", "'math50'", "did you mean 'math500'")
    assert time.perf_counter() - t0 < 20, line  # was ~25 s of hub retries before the error
    # The evaluation CLI too.
    cmd = [sys.executable, "-m", "prime_jax.evaluate", "--config=configs/tiny.py", f"--workdir={tmp_path / 'e'}",
           "--benchmarks=aime2024"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path / "xla_cache"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("prime_jax.evaluate: error: ")
    assert "unknown data source 'aime2024'" in proc.stderr and "aime24" in proc.stderr


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder that cannot be created or written: under a 0555 folder, or (root writes through
    modes) on the read-only /proc file system."""
    if os.geteuid() == 0:
        return Path("/proc") / f"prime_jax_{tmp_path.name}"
    (tmp_path / "ro").mkdir(mode=0o555)
    return tmp_path / "ro" / "w"


def test_unwritable_workdir_fails_before_any_work(tmp_path):
    workdir = unwritable_folder(tmp_path)
    proc = _main(tmp_path, f"--workdir={workdir}")
    _one_error_line(proc, "workdir", str(workdir), "not writable")


def test_training_file_with_no_usable_rows_or_unknown_layout(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": ""}\nnot json\n')
    proc = _main(tmp_path, f"--workdir={tmp_path / 'w'}", f"--config.data.train={bad}")
    assert proc.returncode == 2 and "prime_jax.main: error: data.train: no usable problems" in proc.stderr
    assert "bad_json=1" in proc.stderr and "Traceback" not in proc.stderr

    # A layout no reader knows: the message lists the layouts and names the setting that picks one
    # (item 9); the setting then reads the file.
    odd = tmp_path / "odd.jsonl"
    odd.write_text("".join(json.dumps({"q": f"{i}+1", "a": str(i + 1)}) + "\n" for i in range(4)))
    proc = _main(tmp_path, f"--workdir={tmp_path / 'w2'}", f"--config.data.train={odd}")
    line = _one_error_line(proc, "cannot detect the data format", "['a', 'q']", "--config.data.format=")
    for layout in ("verl (prompt", "math (problem, answer", "gsm8k (question"):
        assert layout in line


def test_data_format_setting_reads_a_misdetected_file(tmp_path):
    """Rows whose `answer` is empty and whose answer sits in `solution`: detection reads them as
    {problem, answer} rows and skips them all; data.format=minerva reads the boxed solution."""
    from prime_jax.config import validate
    from prime_jax.data import read_problems, source_format
    from prime_jax.data import load_train_problems
    from test_evaluate import _config

    rows = [{"problem": f"What is {i}+1?", "answer": "", "solution": f"It is \\boxed{{{i + 1}}}."} for i in range(3)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_problems(path)[0] == []
    config = _config(**{"data.train": str(path), "data.format": "minerva", "data.max_prompt_tokens": 40})
    validate(config)
    assert [p.ground_truth for p in load_train_problems(config, set())] == ["1", "2", "3"]
    assert source_format("minerva", "math500") is None  # packaged benchmarks keep their own format


def test_no_training_prompt_fits_fails_fast_with_the_numbers(tmp_path):
    """MATH train prompts with Eurus-2's instruction are all longer than the tiny config's 40-token
    limit (without an instruction, tiny's default, 25 of 7498 fit): one line, at once (it used to
    loop at step 0 forever), with how many prompts were examined and their lengths."""
    t0 = time.perf_counter()
    proc = _main(tmp_path, f"--workdir={tmp_path / 'w'}", "--config.data.train=math_train",
                 "--config.data.instruction=eurus2", timeout=240)
    line = _one_error_line(proc, "no training prompt fits data.max_prompt_tokens=40", "all 7498 prompts examined",
                           "lengths 86 to 4379 tokens")
    assert time.perf_counter() - t0 < 120, line
    assert not (tmp_path / "w" / "reference").exists()  # failed before the SFT warm start


def test_prompt_source_checks_the_whole_pool_once_an_epoch_is_dropped(tmp_path):
    """A pool whose sample fits at start but whose prompts later stop fitting (the limit lowered
    after the start check) raises once an epoch's worth of prompts in a row was dropped."""
    from prime_jax.data import DataError, build_tiny_tokenizer, make_problems
    from prime_jax.train.rollouts import PromptSource

    tokenizer = build_tiny_tokenizer()
    problems = make_problems(40, 0, stream=0)
    source = PromptSource(problems, tokenizer, max_prompt_tokens=200, seed=0)
    assert len(source.take(8)) == 8
    source.max_prompt_tokens = 5
    with pytest.raises(DataError, match=r"no training prompt fits data.max_prompt_tokens=5: all 40 prompts"):
        for _ in range(20):
            source.take(8)


def test_bad_sft_rows_are_counted_and_skipped(tmp_path):
    """sft.data with a bad JSON line, a row without messages and one without an assistant reply:
    those are skipped (and reported with their line numbers), the good rows train."""
    from prime_jax.data import DataError, make_problems, read_sft_pairs, sft_messages

    good = [{"messages": sft_messages(p)} for p in make_problems(6, 0, stream=2, difficulty="easy", min_steps=2)]
    lines = [json.dumps(good[0]), "{not json", json.dumps({"text": "x"}),
             json.dumps({"messages": [{"role": "user", "content": "hi"}]}), *map(json.dumps, good[1:])]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(lines) + "\n")
    pairs, stats = read_sft_pairs(path, limit=100)
    assert len(pairs) == 6 and stats.kept == 6
    assert dict(stats.skipped) == {"bad_json": 1, "no_messages": 1, "no_assistant_reply": 1}
    assert stats.first_seen["bad_json"] == "line 2"
    (tmp_path / "none.jsonl").write_text("{bad\n")
    with pytest.raises(DataError, match="no usable demonstration"):
        read_sft_pairs(tmp_path / "none.jsonl", 10)

    # The CLI trains on the good rows: SFT runs, and the skipped rows are reported.
    values = dict(SHORT, total_steps=0, **{"sft.data": str(path), "sft.steps": 2, "sft.batch": 2,
                                            "data.synthetic.num_eval": 2})
    proc = _main(tmp_path, f"--workdir={tmp_path / 'w'}", *overrides(values))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bad_json=1 (first at line 2)" in proc.stderr
    assert (tmp_path / "w" / "sft_metrics.jsonl").read_text().count("sft_step") == 1


def test_startup_prints_no_tpu_or_pytorch_noise(tmp_path):
    """On a CPU box without torch (hidden here through a sitecustomize), a run prints neither jax's
    libtpu probe nor transformers' "PyTorch was not found" advice."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib.util\n_find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a, **k: None if name.split('.')[0] == 'torch' else _find(name, *a, **k)\n")
    env = {k: v for k, v in _env(tmp_path / "xla_cache").items() if k != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = str(site)
    probe = subprocess.run([sys.executable, "-c", "import transformers.utils as u; print(u.is_torch_available())"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "False", probe.stderr[-2000:]  # torch is hidden indeed
    # With an eval set whose prompts are all too long (item 11): said once, and no 0.0 "score" for it.
    values = dict(SHORT, total_steps=0, **{"sft.steps": 0, "data.synthetic.num_eval": 2,
                                            "data.eval": "synthetic,aime24"})
    proc = _main(tmp_path, f"--workdir={tmp_path / 'w'}", *overrides(values), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "libtpu" not in proc.stderr and "Unable to initialize backend" not in proc.stderr, proc.stderr
    assert "PyTorch was not found" not in proc.stderr, proc.stderr
    assert "eval set aime24: all 30 problems dropped" in proc.stderr
    row = json.loads((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()[0])
    assert "eval/synthetic/accuracy" in row and "eval/aime24/accuracy" not in row
