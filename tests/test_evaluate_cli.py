"""The evaluation CLI as a user meets it (issue 14): unique benchmark names for same-named files,
an unwritable output folder refused before any loading, a benchmark whose every prompt was
dropped reported as such, and per-sample records kept (and resumed) when a run is interrupted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_errors import unwritable_folder
from test_evaluate import _config, _ground_truth_generate, _save_tiny_model, one_device_mesh, tiny_model_dir  # noqa: F401

from prime_jax.data import build_tiny_tokenizer, eval_source_names
from prime_jax.eval import lib as eval_lib
from prime_jax.eval.run import evaluate

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _write_rows(path: Path, problems: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"problem": q, "answer": a}) + "\n" for q, a in problems))


def test_same_named_files_get_unique_names_and_all_dropped_is_not_a_score(tmp_path):
    """a/test.jsonl and b/test.jsonl were both written to test.jsonl (the last one won); x.jsonl
    given without a folder was named x.jsonl.jsonl. A benchmark whose prompts are all too long
    printed pass@1 0.0%."""
    build_tiny_tokenizer(tmp_path / "tok")
    model = _save_tiny_model(tmp_path / "model", tmp_path / "tok", 102)
    _write_rows(tmp_path / "a" / "test.jsonl", [("1+1?", "2"), ("2+2?", "4")])
    _write_rows(tmp_path / "b" / "test.jsonl", [("3+3?", "6")])
    _write_rows(tmp_path / "x.jsonl", [("A long problem statement that cannot fit the prompt limit " * 2, "1")] * 3)
    cmd = [sys.executable, "-m", "prime_jax.evaluate", f"--config={ROOT / 'configs' / 'tiny.py'}",
           f"--workdir={tmp_path / 'wd'}", f"--checkpoint={model}", "--benchmarks=a/test.jsonl,b/test.jsonl,x.jsonl",
           "--max_new_tokens=4", "--config.data.max_prompt_tokens=100", "--config.reward.workers=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "wd" / "eval" / "model_greedy"
    assert sorted(p.name for p in out.iterdir()) == ["a-test.jsonl", "b-test.jsonl", "evaluation.json", "scores.json",
                                                     "scores.md", "x.jsonl"]
    scores = json.loads((out / "scores.json").read_text())["benchmarks"]
    assert {k: v["num_problems"] for k, v in scores.items()} == {"a-test": 2, "b-test": 1, "x": 3}
    assert "x: all 3 problems dropped (prompts longer than data.max_prompt_tokens=100); no score" in proc.stdout
    assert "x: pass@1" not in proc.stdout and "a-test: pass@1" in proc.stdout
    assert "| x | 3 (3 dropped) | all dropped |" in (out / "scores.md").read_text()

    # Training's data.eval names its sources the same way.
    assert list(eval_source_names(["a/test.jsonl", "b/test.jsonl", "x.jsonl", "math-500", "synthetic"])) == [
        "a-test", "b-test", "x", "math500", "synthetic"]
    with pytest.raises(ValueError, match="listed twice"):
        eval_source_names(["math500", "math500"])


def test_unwritable_output_folder_is_refused_before_loading_anything(tmp_path):
    workdir = unwritable_folder(tmp_path)
    cmd = [sys.executable, "-m", "prime_jax.evaluate", f"--config={ROOT / 'configs' / 'tiny.py'}",
           f"--workdir={workdir}", f"--checkpoint={tmp_path / 'no_such_model'}", "--benchmarks=math500"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "evaluation output folder" in lines[0] and "not writable" in lines[0], lines
    assert "no_such_model" not in lines[0]  # checked before the checkpoint is even looked at


class _Interrupt(Exception):
    pass


def test_interrupted_evaluation_keeps_its_records_and_resumes(tmp_path, monkeypatch, tiny_model_dir,  # noqa: F811
                                                              one_device_mesh):  # noqa: F811
    """batch_size 2, 6 problems: chunk 1 fails; the rerun generates only chunks 1 and 2 and ends
    with what an uninterrupted evaluation gives."""
    fake = _ground_truth_generate(["math500"], {})
    calls = []

    def generate(sampler, model, tokenizer, prompt_ids, settings, *, stop_token_ids, key):
        calls.append(len(prompt_ids))
        if fail_on_call and len(calls) == fail_on_call:
            raise _Interrupt
        return fake(sampler, model, tokenizer, prompt_ids, settings, stop_token_ids=stop_token_ids, key=key)

    monkeypatch.setattr(eval_lib, "generate_responses", generate)
    kwargs = dict(checkpoint=str(tiny_model_dir), benchmarks="math500", limit=6, batch_size=2,
                  tokenizer_path=str(tiny_model_dir.parent / "tok"), mesh=one_device_mesh)
    fail_on_call = 2
    with pytest.raises(_Interrupt):
        evaluate(_config(), tmp_path / "run", **kwargs)
    progress = tmp_path / "run" / "eval" / "model_greedy" / "progress" / "math500.jsonl"
    lines = progress.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["chunk"] == 0  # header + the finished chunk, on disk
    assert [r["problem_id"] for recs in json.loads(lines[1])["records"] for r in recs]

    calls.clear()
    fail_on_call = 0
    resumed = evaluate(_config(), tmp_path / "run", **kwargs)
    assert calls == [2, 2]  # chunks 1 and 2 only
    assert not progress.parent.exists()
    calls.clear()
    fresh = evaluate(_config(), tmp_path / "fresh", **kwargs)
    assert calls == [2, 2, 2]
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("time_")}  # noqa: E731
    assert strip(resumed["benchmarks"]["math500"]) == strip(fresh["benchmarks"]["math500"])
    assert resumed["benchmarks"]["math500"]["pass@1"] == 1.0
    assert ((tmp_path / "run" / "eval" / "model_greedy" / "math500.jsonl").read_text()
            == (tmp_path / "fresh" / "eval" / "model_greedy" / "math500.jsonl").read_text())

    # Other settings do not reuse the records: they go to a folder of their own, which starts afresh,
    # and the earlier results stay.
    fail_on_call = 1
    calls.clear()
    with pytest.raises(_Interrupt):
        evaluate(_config(), tmp_path / "run", **dict(kwargs, max_new_tokens=5))
    other = tmp_path / "run" / "eval" / "model_greedy-2" / "progress" / "math500.jsonl"
    assert len(other.read_text().splitlines()) == 1
    assert json.loads((tmp_path / "run" / "eval" / "model_greedy" / "scores.json").read_text())["benchmarks"]
