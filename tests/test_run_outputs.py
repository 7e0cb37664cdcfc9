"""A short tiny run's outputs as users open them (issue 14): the Hugging Face export through
transformers' Auto* classes and plain `generate`, a damaged checkpoint, rerunning a finished run,
`--export_hf` without checkpoints, and the rollout HTML page."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_trainer import SHORT, _env, overrides

ROOT = Path(__file__).resolve().parents[1]
QWEN_TOKENIZER = ROOT / "tests" / "fixtures" / "qwen3_tokenizer"

# SFT long enough that the tiny policy answers in the demonstrations' format and ends its turn (the PRM
# loss is SHORT's `ce`, so the step-2 page shows non-zero rewards).
RUN = dict(SHORT, total_steps=2, eval_every=0, checkpoint_every=1, **{
    "sft.steps": 150, "sft.num_examples": 512, "sft.batch": 32, "sft.warmup_steps": 10,
    "rollout.eval_max_new_tokens": 24, "data.synthetic.num_eval": 8, "checkpoint.keep": 2,
    "logging.html_per_page": 3})


def _main(workdir: Path, cache: Path, *args: str, values: dict = RUN) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "prime_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
           *overrides(values), *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    proc = _main(root / "run", root / "xla_cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final eval/accuracy" in proc.stdout
    return root / "run"


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(run_dir, workdir)
    return workdir


def _truncate_checkpoint(workdir: Path, step: int) -> None:
    """Truncates the array data files of a checkpoint (whichever arrays a reader needs are damaged)."""
    data = list((workdir / "checkpoints" / str(step) / "state").rglob("d/*"))
    assert data
    for f in data:
        os.truncate(f, min(100, f.stat().st_size // 2))


# ------------------------------------------------------------------------------ items 2 and 3: the export
@pytest.mark.slow
def test_export_loads_with_auto_classes_and_plain_generate_answers_like_our_eval(run_dir, tmp_path):
    import torch
    import transformers

    export = run_dir / "hf_export"
    mode = 0o666 & ~_umask()
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in export.iterdir()} == {
        f.name: oct(mode) for f in export.iterdir()}  # model.safetensors like the rest (was 0600)
    config = json.loads((export / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (2, 0)  # <|im_end|>, <|endoftext|>
    generation = json.loads((export / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0] and generation["do_sample"] is False
    assert generation["max_new_tokens"] == 24

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(export))
    assert type(tokenizer).__name__ != "Qwen2Tokenizer"  # model_type qwen2 no longer picks it
    text = "Compute (4+7)*2 \\boxed{22}"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # spaces kept
    remote = transformers.AutoTokenizer.from_pretrained(str(export), trust_remote_code=True)
    assert remote(text)["input_ids"] == tokenizer(text)["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(export))

    # Our own greedy evaluation of the exported policy on the held-out prompts.
    cmd = [sys.executable, "-m", "prime_jax.evaluate", "--config=configs/tiny.py", f"--workdir={tmp_path}",
           f"--checkpoint={export}", "--benchmarks=synthetic", "--limit=8", "--config.reward.workers=1",
           "--config.rollout.eval_max_new_tokens=24"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path / "xla_cache"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "eval" / "hf_export_greedy" / "synthetic.jsonl").read_text()
               .splitlines()]
    assert len(records) == 8 and sum(r["finished"] for r in records) >= 6, records
    for rec in records:
        enc = tokenizer(rec["prompt"], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc)  # plain: everything from generation_config.json
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        assert tokenizer.decode(new, skip_special_tokens=True) == rec["response"], (new, rec)
        if rec["finished"]:  # stopped at the end-of-turn token, as our sampler did
            assert new[-1] == 2 and 2 not in new[:-1] and len(new) == rec["num_tokens"], (new, rec)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_qwen_shaped_export_writes_the_sources_token_ids(tmp_path):
    """A 7B-style source (Qwen2.5-Math-7B's config.json ids and generation_config.json): the
    config keeps its ids, and `generate` stops at <|im_end|> as well as the base <|endoftext|>."""
    import transformers
    from flax import nnx

    from prime_jax.models import Qwen2Config, Qwen2ForCausalLM, from_pretrained, save_pretrained
    from prime_jax.models.tokenizer import load_tokenizer
    from prime_jax.train.checkpoint import export_hf

    qwen7b = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064,
              "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
              "num_key_value_heads": 4, "rope_theta": 10000.0, "max_position_embeddings": 4096,
              "bos_token_id": 151643, "eos_token_id": 151643, "tie_word_embeddings": False}
    hf = Qwen2Config.from_hf_dict(qwen7b).to_hf_dict()
    assert (hf["bos_token_id"], hf["eos_token_id"]) == (151643, 151643) and "pad_token_id" not in hf

    if not (QWEN_TOKENIZER / "tokenizer.json").exists():
        pytest.skip("no Qwen tokenizer fixture")
    tokenizer = load_tokenizer(QWEN_TOKENIZER)
    source = tmp_path / "source"
    small = Qwen2Config.from_hf_dict(dict(qwen7b, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tokenizer)))
    save_pretrained(Qwen2ForCausalLM(small, rngs=nnx.Rngs(0)), source)
    (source / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "do_sample": False, "eos_token_id": 151643, "max_new_tokens": 2048}))
    export = export_hf(from_pretrained(source), tokenizer, tmp_path / "export", source=str(source))
    config = json.loads((export / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (151643, 151643)
    gen = transformers.GenerationConfig.from_pretrained(str(export))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert gen.eos_token_id == [151643, im_end] and gen.max_new_tokens == 2048 and gen.do_sample is False
    assert gen.pad_token_id is not None


# ------------------------------------------------------------------------------ item 5: damaged checkpoints
@pytest.mark.slow
def test_damaged_latest_checkpoint_resumes_from_the_previous_one(run_dir, tmp_path):
    workdir = _copy_run(run_dir, tmp_path)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
    _truncate_checkpoint(workdir, 2)
    # Evaluating it names the damaged checkpoint in one line (no orbax/asyncio noise).
    cmd = [sys.executable, "-m", "prime_jax.evaluate", "--config=configs/tiny.py", f"--workdir={workdir}",
           "--benchmarks=synthetic", "--limit=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path / "xla_cache"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert f"checkpoint {workdir}/checkpoints/2 is damaged (" in proc.stderr, proc.stderr

    proc = _main(workdir, tmp_path / "xla_cache", values=dict(RUN, total_steps=3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    damaged = [line for line in proc.stderr.splitlines() if " is damaged (" in line]
    assert len(damaged) == 1, proc.stderr[-3000:]
    assert "checkpoint of step 2" in damaged[0] and "resuming from step 1" in damaged[0], damaged
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    assert len(proc.stderr.splitlines()) < 15, proc.stderr[-3000:]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "3", "damaged_step_2"]
    steps = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 3], steps  # rows after step 1 redone, once


@pytest.mark.slow
def test_every_checkpoint_damaged_is_refused_in_one_line(run_dir, tmp_path):
    workdir = _copy_run(run_dir, tmp_path)
    for step in (1, 2):
        _truncate_checkpoint(workdir, step)
    proc = _main(workdir, tmp_path / "xla_cache", values=dict(RUN, total_steps=3))
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("prime_jax.main: error: every checkpoint in") and "(steps 2, 1;" in last, last
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) < 6, proc.stderr[-3000:]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]  # nothing moved


# ------------------------------------------------------------------------------ item 10
@pytest.mark.slow
def test_rerunning_a_finished_run_prints_its_result(run_dir, tmp_path):
    workdir = _copy_run(run_dir, tmp_path)
    before = (workdir / "metrics.jsonl").read_text()
    proc = _main(workdir, tmp_path / "xla_cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run already finished (total_steps 2)" in proc.stdout
    last = [json.loads(x) for x in before.splitlines() if "eval/accuracy" in x][-1]
    assert f"final eval/accuracy {last['eval/accuracy']:.4f} at step 2" in proc.stdout, proc.stdout
    assert (workdir / "metrics.jsonl").read_text() == before


def test_export_hf_without_checkpoints_refuses(tmp_path):
    proc = _main(tmp_path / "empty", tmp_path / "xla_cache", "--export_hf")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()
    assert len(last) == 1 and "holds no checkpoint to export" in last[0], proc.stderr
    assert not (tmp_path / "empty" / "reference").exists() and not (tmp_path / "empty" / "hf_export").exists()


# ------------------------------------------------------------------------------ item 12: the HTML page
@pytest.mark.slow
def test_rollout_pages_say_when_the_prm_equals_the_reference(run_dir):
    start = (run_dir / "rollouts" / "step_0.html").read_text()
    assert "the PRM still equals the reference" in start and "full colour at |q| = 0" not in start
    later = (run_dir / "rollouts" / "step_2.html").read_text()
    assert "Legend (q per token)" in later and "90th percentile" in later


def test_html_picks_right_and_wrong_responses_and_a_robust_scale():
    from prime_jax.train.report import colour_scale, mix_outcomes, render_html

    items = [("a", 0.0), ("b", 0.0), ("c", 0.0), ("d", 1.0), ("e", 0.0), ("f", 1.0)]
    assert mix_outcomes(items, lambda x: x[1], 4) == [("d", 1.0), ("a", 0.0), ("f", 1.0), ("b", 0.0)]
    assert mix_outcomes(items[:3], lambda x: x[1], 2) == [("a", 0.0), ("b", 0.0)]
    q = list(np.linspace(0.01, 0.1, 99)) + [50.0]  # one outlier token
    scale = colour_scale([{"q": q}])
    assert 0.08 < scale < 0.11  # the outlier does not wash out the other 99 tokens
    assert colour_scale([{"q": [0.0, 0.0]}]) == 0.0
    page = render_html([{"prompt": "p", "tokens": ["x"] * 100, "q": q, "outcome": 1.0}], title="t")
    assert "Legend" in page and page.count("class='tok'") == 105  # 100 tokens + 5 legend cells


# ------------------------------------------------------------------------------ issue 31
@pytest.mark.slow
def test_token_reward_pages_show_the_prms_ranking_and_page_through_the_responses(run_dir):
    """The step's prm/dpo_accuracy and how to read Σq head each page; the 8 held-out responses come
    3 to a page (logging.html_per_page), the pages linked to each other."""
    from html.parser import HTMLParser

    pages = sorted((run_dir / "rollouts").glob("step_2*.html"))
    assert [p.name for p in pages] == ["step_2.html", "step_2_p2.html", "step_2_p3.html"]
    ranking = next(json.loads(x)["prm/dpo_accuracy"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if '"step": 2,' in x and "prm/dpo_accuracy" in x)
    for k, page in enumerate(pages, 1):
        text = page.read_text()
        HTMLParser().feed(text)  # parses
        assert f"put the right one above the wrong one in <b>{ranking:.0%}</b>" in text
        assert "How to read it: &Sigma;q is the PRM's total reward" in text and "<code>prm/dpo_accuracy</code>" in text
        others = [name for j, name in enumerate(("step_2.html", "step_2_p2.html", "step_2_p3.html"), 1) if j != k]
        assert f"<b>{k}</b>" in text and all(f"href='{name}'" in text for name in others)
        assert text.count("<h3>#") == (3 if k < 3 else 2)
    assert "href='step_2_p2.html'>next" in pages[0].read_text() and "<h3>#7 " in pages[2].read_text()
    assert "href='step_2_p2.html'>&lsaquo; previous" in pages[2].read_text()
    start = (run_dir / "rollouts" / "step_0.html").read_text()
    assert "At step 0 the PRM has not trained yet" in start


@pytest.mark.slow
def test_resume_refuses_a_shape_change_in_one_line_and_keeps_a_history_of_other_changes(run_dir, tmp_path):
    workdir = _copy_run(run_dir, tmp_path)
    first = [json.loads(x) for x in (workdir / "config_history.jsonl").read_text().splitlines()]
    assert len(first) == 1 and first[0]["config"]["algo"]["estimator"] == "prime_rloo"

    proc = _main(workdir, tmp_path / "xla_cache", values=dict(RUN, **{"model.hidden_size": 64}))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"prime_jax.main: error: model.hidden_size is 64 but the run in {workdir} was trained with 32: its "
        "checkpoints hold weights of that shape. Rerun with --config.model.hidden_size=32 to resume, or use another "
        "--workdir for a new run"]

    # (the run is finished: the trainer starts, records its settings and has no step left to do)
    proc = _main(workdir, tmp_path / "xla_cache", values=dict(RUN, **{"algo.estimator": "outcome_rloo"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    changed = [line for line in proc.stderr.splitlines() if "changed settings" in line]
    assert len(changed) == 1 and changed[0].endswith(
        "resuming from step 2 with changed settings: algo.estimator 'prime_rloo' -> 'outcome_rloo' (every start's "
        f"settings are kept in {workdir / 'config_history.jsonl'})"), changed
    assert json.loads((workdir / "config.json").read_text())["algo"]["estimator"] == "outcome_rloo"
    history = [json.loads(x) for x in (workdir / "config_history.jsonl").read_text().splitlines()]
    assert history[0] == first[0] and len(history) == 2
    assert history[1]["start_step"] == 2 and history[1]["changes"] == {"algo.estimator": ["prime_rloo", "outcome_rloo"]}


@pytest.mark.slow
def test_evaluations_keep_each_settings_results_and_a_users_problem_file_scores_like_the_task(run_dir, tmp_path):
    """Greedy and sampled evaluations go to folders named after what they evaluated and how, the
    index lists both, the console prints the whole table; the README's own-file example (three
    held-out problems as {problem, answer} rows) gets the same prompts, answers and scores as the
    task's own prompts."""
    import shlex

    workdir = _copy_run(run_dir, tmp_path)
    readme = (ROOT / "README.md").read_text()
    command = readme[readme.index("printf '%s\\n'"):readme.index("> my.jsonl")].replace("\\\n", " ")
    rows = shlex.split(command)[2:]
    own = tmp_path / "my.jsonl"
    own.write_text("".join(row + "\n" for row in rows))
    assert [json.loads(row)["problem"] for row in rows] == ["Compute (6-1)*2", "Compute (5+6)-4", "Compute (8-1)*2"]

    def evaluate(*args):
        cmd = [sys.executable, "-m", "prime_jax.evaluate", "--config=configs/tiny.py", f"--workdir={workdir}",
               "--limit=6", "--config.reward.workers=1", "--config.rollout.eval_max_new_tokens=24", *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path / "xla_cache"), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    out = evaluate(f"--benchmarks=synthetic,{own}")
    assert out.splitlines()[0].startswith("data.instruction=none: adds nothing after the problems"), out
    greedy = workdir / "eval" / "step2_greedy"
    task = {r["prompt"]: r for r in map(json.loads, (greedy / "synthetic.jsonl").read_text().splitlines())}
    mine = [json.loads(x) for x in (greedy / "my.jsonl").read_text().splitlines()]
    assert len(mine) == 3
    for record in mine:  # the same prompt as the task's held-out problem, so the same answer and score
        same = task[record["prompt"]]
        assert [record[k] for k in ("response", "ground_truth", "score")] == [same[k] for k in
                                                                              ("response", "ground_truth", "score")]
    assert "| synthetic | 6 |" in out and "| my | 3 |" in out  # the whole table, both benchmarks

    out = evaluate("--benchmarks=synthetic", "--n=2", "--temperature=1.0")
    sampled = workdir / "eval" / "step2_n2_t1"
    table = out[out.index("step2_n2_t1 ("):]
    assert "| benchmark | problems | pass@1 | pass@2 | avg@2 | maj@2 | mean length |" in table, out
    assert json.loads((sampled / "scores.json").read_text())["settings"]["n"] == 2
    assert set(json.loads((greedy / "scores.json").read_text())["benchmarks"]) == {"synthetic", "my"}  # kept
    index = (workdir / "eval" / "scores.md").read_text()
    for row in ("| [step2_greedy](step2_greedy/scores.md) |", "| [step2_n2_t1](step2_n2_t1/scores.md) |"):
        assert row in index, index
