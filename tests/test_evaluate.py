"""Tests of the benchmark evaluation (prime_jax.eval and the prime_jax.evaluate CLI)."""
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from config_files import load_config
from prime_jax.data import build_tiny_tokenizer, load_benchmark, render_prompts
from prime_jax.eval import checkpoints
from prime_jax.eval import lib as eval_lib
from prime_jax.eval import results as eval_results
from prime_jax.eval.prm_scorer import PRMScorer
from prime_jax.eval.run import evaluate
from prime_jax.models import Qwen2Config, Qwen2ForCausalLM, response_logprobs, save_pretrained
from prime_jax.parallel import make_mesh
from prime_jax.train.builder import model_config

ROOT = Path(__file__).resolve().parent.parent
QWEN_TOKENIZER = ROOT / "tests" / "fixtures" / "qwen3_tokenizer"


# ------------------------------------------------------------------------------ helpers
def _tiny_arch(vocab_size: int, **kw) -> Qwen2Config:
    return Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                       max_position_embeddings=4096, **kw)


def _save_tiny_model(folder: Path, tokenizer_dir: Path | None, vocab_size: int, seed: int = 0) -> Path:
    save_pretrained(Qwen2ForCausalLM(_tiny_arch(vocab_size), rngs=nnx.Rngs(seed)), folder)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
                (folder / f.name).write_bytes(f.read_bytes())
    return folder


def _config(**changes):
    # The 7B models' prompts (Eurus-2's instruction after each benchmark problem), which the fake model
    # below renders too; configs/tiny.py itself appends no instruction.
    return load_config("tiny", {"reward.workers": 1, "data.max_prompt_tokens": 2048, "rollout.eval_batch": 8,
                                "data.instruction": "eurus2", **changes})


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny Qwen2 sized for the tiny character tokenizer (vocab 102), which lies in
    ../tok: saved next to the model's config.json, AutoTokenizer would load it as a Qwen2Tokenizer
    (model_type qwen2), whose byte-level decoder drops its spaces."""
    root = tmp_path_factory.mktemp("tiny_model")
    build_tiny_tokenizer(root / "tok")
    return _save_tiny_model(root / "model", None, 102)


@pytest.fixture(scope="module")
def one_device_mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


# ------------------------------------------------------------------------------ metric maths
def _brute_pass_at_k(correct: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    for n in range(1, 7):
        for c in range(n + 1):
            correct = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                assert eval_results.pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(correct, k), abs=1e-12)
    assert eval_results.pass_at_k(4, 2, 1) == 0.5
    assert eval_results.pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    assert eval_results.pass_at_k(200, 0, 100) == 0.0
    assert eval_results.k_values(1) == [1] and eval_results.k_values(8) == [1, 2, 4, 8] and eval_results.k_values(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError):
        eval_results.pass_at_k(4, 5, 1)


def test_problem_metrics_majority_and_best_of_n():
    # Four samples: "\frac12" and "\dfrac{1}{2}" are the same answer after normalisation (2 votes),
    # "3" one vote, one sample without an answer. Ground truth 1/2: samples 0 and 2 are right.
    answers = ["\\frac12", "3", "\\dfrac{1}{2}", None]
    keys = [eval_results.answer_key(a) for a in answers]
    assert keys[0] == keys[2] and keys[0] != keys[1] and keys[3] is None
    scores = [1.0, 0.0, 1.0, 0.0]
    m = eval_results.problem_metrics(scores, keys, prm_rewards=[0.1, 2.0, -1.0, 0.5])
    assert m["pass@1"] == pytest.approx(0.5)
    assert m["pass@2"] == pytest.approx(1 - 1 / 6)
    assert m["pass@4"] == 1.0
    assert m["avg@4"] == 0.5
    assert m["maj@2"] == 1.0  # tie 1-1 between "1/2" and "3": the first seen wins
    assert m["maj@4"] == 1.0  # "1/2" has 2 votes
    assert m["best@4"] == 0.0  # the PRM prefers sample 1 (wrong)
    assert "prm_vote@4" not in m  # no P(correct) given
    # weighted vote: "1/2" (0.4 + 0.3) beats "3" (0.6); with "3" at 0.8 the wrong answer wins
    assert eval_results.problem_metrics(scores, keys, prm_weights=[0.4, 0.6, 0.3, 0.9])["prm_vote@4"] == 1.0
    assert eval_results.problem_metrics(scores, keys, prm_weights=[0.4, 0.8, 0.3, 0.9])["prm_vote@4"] == 0.0
    assert eval_results.prm_p_correct(0.0, 0.05) == 0.5
    assert eval_results.prm_p_correct(2.0, 0.5) == pytest.approx(1 / (1 + np.exp(-1.0)))
    assert eval_results.prm_p_correct(-1e4, 1.0) == 0.0 and eval_results.prm_p_correct(1e4, 1.0) == 1.0  # no overflow

    # The majority answer is wrong although one sample is right.
    keys = [eval_results.answer_key(a) for a in ["7", "5", "7", "7"]]
    m = eval_results.problem_metrics([0.0, 1.0, 0.0, 0.0], keys)
    assert m["maj@4"] == 0.0 and m["maj@2"] == 0.0 and m["pass@4"] == 1.0 and m["pass@1"] == 0.25
    # Nobody answered: maj scores 0; greedy n=1 has only pass@1 and avg@1.
    assert eval_results.problem_metrics([0.0, 0.0], [None, None])["maj@2"] == 0.0
    assert set(eval_results.problem_metrics([1.0])) == {"pass@1", "avg@1"}
    # Fractional (code) scores: pass@k counts only full marks; avg is the mean score.
    m = eval_results.problem_metrics([0.5, 1.0])
    assert m["pass@1"] == 0.5 and m["avg@2"] == 0.75

    # Aggregation: the mean over problems, dropped problems counting 0.
    agg = eval_results.aggregate([{"pass@1": 1.0, "maj@2": 1.0}, {"pass@1": 0.5, "maj@2": 0.0}], num_dropped=2)
    assert agg == {"pass@1": 0.375, "maj@2": 0.25}


def test_weighted_vote_weighs_each_answer_by_the_summed_weights_of_its_samples():
    keys = ["7", "5", "7", None, "5"]
    # all weights 1: the majority vote (a 2-2 tie between "7" and "5": the first seen wins)
    assert eval_results.weighted_vote_index(keys, [1, 1, 1, 1, 1]) == eval_results.majority_index(keys) == 0
    # "5": 0.9 + 0.8 > "7": 0.2 + 0.3; the unanswered sample's weight counts for nothing
    assert eval_results.weighted_vote_index(keys, [0.2, 0.9, 0.3, 5.0, 0.8]) == 1
    # one confident sample outweighs two doubtful copies, and the reverse
    assert eval_results.weighted_vote_index(["a", "a", "b"], [0.3, 0.3, 0.9]) == 2
    assert eval_results.weighted_vote_index(["a", "a", "b"], [0.5, 0.5, 0.9]) == 0
    assert eval_results.weighted_vote_index([None, None], [1.0, 1.0]) is None
    with pytest.raises(ValueError, match="2 keys but 1 weights"):
        eval_results.weighted_vote_index(["a", "b"], [1.0])


# ------------------------------------------------------------------------------ the pipeline with a fake model
def _ground_truth_generate(benchmarks, tokenizer_holder, n_wrong: int = 0):
    """A stand-in for eval_lib.generate_responses that answers every prompt with its ground truth
    (\\boxed{...}), followed by `n_wrong` wrong samples."""
    def fake(sampler, model, tokenizer, prompt_ids, settings, *, stop_token_ids, key):
        if "map" not in tokenizer_holder:
            table = {}
            for name in benchmarks:
                ids, kept, _ = render_prompts(load_benchmark(name)[0], tokenizer, None)  # eurus2, as _config
                table.update({tuple(i): p.ground_truth for i, p in zip(ids, kept)})
            tokenizer_holder["map"] = table
        texts = []
        for ids in prompt_ids:
            gt = tokenizer_holder["map"][tuple(ids)]
            samples = [f"So the final answer is \\boxed{{{gt}}}."]
            samples += ["The answer is \\boxed{123456789}."] * n_wrong
            texts += samples[: settings.n] + samples[-1:] * (settings.n - len(samples))
        response_ids = [tokenizer.encode(t, add_special_tokens=False) + [stop_token_ids[0]] for t in texts]
        return eval_results.Generation(texts=texts, response_ids=response_ids, finished=[True] * len(texts))
    return fake


def test_ground_truth_responses_score_one(tmp_path, monkeypatch, tiny_model_dir, one_device_mesh):
    benchmarks = ["math500", "gsm8k", "aime24"]
    holder = {}
    monkeypatch.setattr(eval_lib, "generate_responses", _ground_truth_generate(benchmarks, holder))
    scores = evaluate(_config(), tmp_path, checkpoint=str(tiny_model_dir), benchmarks=",".join(benchmarks),
                         limit=3, tokenizer_path=str(tiny_model_dir.parent / "tok"), mesh=one_device_mesh)
    for name in benchmarks:
        m = scores["benchmarks"][name]
        assert m["pass@1"] == 1.0, (name, m)
        assert m["num_problems"] == 3 and m["num_dropped"] == 0 and m["no_answer_frac"] == 0.0
        records = [json.loads(line) for line in (Path(scores["output"]) / f"{name}.jsonl").read_text().splitlines()]
        assert len(records) == 3
        for rec, problem in zip(records, load_benchmark(name)[0][:3]):
            assert rec["problem_id"] == problem.id and rec["score"] == 1.0 and rec["correct"]
            assert rec["extracted_answer"] == problem.ground_truth
            assert rec["prompt"].startswith("<|im_start|>user\n") and rec["prompt"].endswith("assistant\n")
            assert f"\\boxed{{{problem.ground_truth}}}" in rec["response"]
    assert Path(scores["output"]) == tmp_path / "eval" / "model_greedy"  # named after the checkpoint and settings
    saved = json.loads((Path(scores["output"]) / "scores.json").read_text())
    assert saved["benchmarks"]["gsm8k"]["pass@1"] == 1.0 and saved["settings"]["n"] == 1
    assert saved["average"]["pass@1"] == 1.0
    md = (Path(scores["output"]) / "scores.md").read_text()
    assert "| math500 | 3 | 100.0 |" in md and "MATH-500" in md and "66.2" in md and "AIME24" in md


def test_majority_and_prm_best_of_n(tmp_path, monkeypatch, tiny_model_dir, one_device_mesh):
    """n=3: one right sample, two identical wrong ones -> pass@1 1/3, pass@3 1, maj@2 1 (tie, first
    seen), maj@3 0; best-of-3 by a (random) PRM picks one of them and is reported consistently."""
    prm_dir = _save_tiny_model(tmp_path / "prm", None, 102, seed=1)
    holder = {}
    monkeypatch.setattr(eval_lib, "generate_responses", _ground_truth_generate(["gsm8k"], holder, n_wrong=2))
    scores = evaluate(_config(), tmp_path, checkpoint=str(tiny_model_dir), benchmarks="gsm8k", limit=2, n=3,
                         temperature=1.0, prm=str(prm_dir), reference=str(tiny_model_dir), tag="n3",
                         tokenizer_path=str(tiny_model_dir.parent / "tok"),
                         mesh=one_device_mesh)
    m = scores["benchmarks"]["gsm8k"]
    assert m["pass@1"] == pytest.approx(1 / 3) and m["pass@2"] == pytest.approx(2 / 3) and m["pass@3"] == 1.0
    assert m["avg@3"] == pytest.approx(1 / 3) and m["maj@2"] == 1.0 and m["maj@3"] == 0.0
    records = [json.loads(line) for line in (tmp_path / "eval" / "n3" / "gsm8k.jsonl").read_text().splitlines()]
    assert len(records) == 6
    best_scores, vote_scores = [], []
    for i in range(2):
        group = records[3 * i: 3 * i + 3]
        assert [r["sample"] for r in group] == [0, 1, 2]
        assert [r["majority"] for r in group] == [False, True, True]
        assert sum(r["prm_best"] for r in group) == 1
        rewards = [r["prm_reward"] for r in group]
        assert all(math.isfinite(x) for x in rewards) and rewards[1] == pytest.approx(rewards[2], abs=1e-5)
        best_scores.append(next(r["score"] for r in group if r["prm_best"]))
        # P(correct) = sigmoid(beta sum q) with the config's beta; the vote sums it per answer
        weights = [r["prm_p_correct"] for r in group]
        assert weights == pytest.approx([eval_results.prm_p_correct(x, _config().algo.beta) for x in rewards])
        wrong_votes = weights[1] + weights[2]
        vote_scores.append(1.0 if weights[0] > wrong_votes else 0.0)
    assert m["best@3"] == pytest.approx(np.mean(best_scores))
    assert m["prm_vote@3"] == pytest.approx(np.mean(vote_scores))
    md = (tmp_path / "eval" / "n3" / "scores.md").read_text()
    assert "best@3" in md and "prm_vote@3" in md


def test_prm_scorer_matches_unpadded_logprobs(one_device_mesh):
    prm = Qwen2ForCausalLM(_tiny_arch(50), rngs=nnx.Rngs(1))
    ref = Qwen2ForCausalLM(_tiny_arch(50), rngs=nnx.Rngs(2))
    prompts = [[3, 4, 5], [7] * 20, [9, 10]]
    responses = [[11, 12], [13, 14, 15, 16, 17], [18]]
    scorer = PRMScorer(prm, ref, mesh=one_device_mesh, temperature=0.7, batch_size=2)
    got = scorer(prompts, responses)  # sorted by length, 2 rows per call, power-of-two padding

    # Direct: all rows in one batch, padded only to the longest prompt / response.
    P, R = max(map(len, prompts)), max(map(len, responses))
    batch = [np.zeros((3, P), np.int32), np.zeros((3, P), np.int32), np.zeros((3, R), np.int32),
             np.zeros((3, R), np.int32)]
    for i, (p, r) in enumerate(zip(prompts, responses)):
        batch[0][i, P - len(p):], batch[1][i, P - len(p):] = p, 1
        batch[2][i, :len(r)], batch[3][i, :len(r)] = r, 1

    @nnx.jit
    def direct(prm, ref, *b):
        q = response_logprobs(prm, *b, temperature=0.7) - response_logprobs(ref, *b, temperature=0.7)
        return (q * b[3]).sum(-1)

    np.testing.assert_allclose(got, np.asarray(direct(prm, ref, *batch)), atol=1e-4)
    alone = PRMScorer(prm, None, mesh=one_device_mesh, batch_size=2)(prompts, responses)  # Σ log π_prm
    want = nnx.jit(lambda m, *b: (response_logprobs(m, *b) * b[3]).sum(-1))(prm, *batch)
    np.testing.assert_allclose(alone, np.asarray(want), atol=1e-4)


# ------------------------------------------------------------------------------ checkpoints of a training run
def test_run_checkpoint_policy_prm_and_sampled_eval(tmp_path, one_device_mesh):
    """A training workdir's latest orbax checkpoint: policy and PRM params restored (no optimizer
    state), the run's tokenizer and reference found; then a sampled (n=2) eval with best-of-2."""
    from prime_jax.train.checkpoint import RunCheckpointer
    from prime_jax.train.state import create_train_state, make_optimizer, split_params

    config = _config(**{"model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 1,
                        "model.num_heads": 2, "model.num_kv_heads": 1})
    run = tmp_path / "run"
    run.mkdir()
    tok = build_tiny_tokenizer(run / "tokenizer")
    (run / "config.json").write_text(config.to_json_best_effort(indent=2))
    arch = model_config(dict(config.model.to_dict()), len(tok))
    opt = make_optimizer(1e-3)
    states = {}
    for which, seed in (("policy", 5), ("prm", 6)):
        _, params = split_params(Qwen2ForCausalLM(arch, rngs=nnx.Rngs(seed)))
        states[which] = create_train_state(params, opt, one_device_mesh)
    ckpt = RunCheckpointer(run / "checkpoints", keep=2, async_save=False)
    ckpt.save(3, {**states, "key": jax.random.PRNGKey(0)}, {"step": 3})
    ckpt.close()

    spec = checkpoints.resolve_checkpoint(str(run))
    assert (spec.kind, spec.step, spec.run_dir) == ("run", 3, run)
    assert checkpoints.resolve_checkpoint(str(run / "checkpoints" / "3")).step == 3
    assert checkpoints.resolve_tokenizer_path(config, spec, tmp_path / "out") == str(run / "tokenizer")
    for which in ("policy", "prm"):
        model = checkpoints.load_model(spec, config, one_device_mesh, vocab_size=len(tok), which=which)
        _, restored = nnx.split(model, nnx.Param)
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(states[which].params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError):
        checkpoints.resolve_checkpoint(str(tmp_path / "nowhere"))

    # WORKDIR/reference (the SFT weights RL started from) is a checkpoint of its own kind.
    from prime_jax.train.checkpoint import save_params
    _, sft_params = split_params(Qwen2ForCausalLM(arch, rngs=nnx.Rngs(7)))
    save_params(run / "reference", sft_params)
    sft = checkpoints.resolve_checkpoint(str(run / "reference"))
    assert (sft.kind, sft.run_dir) == ("sft", run) and "SFT" in sft.describe()
    assert checkpoints.resolve_tokenizer_path(config, sft, tmp_path / "out") == str(run / "tokenizer")
    _, restored = nnx.split(checkpoints.load_model(sft, config, one_device_mesh, vocab_size=len(tok)), nnx.Param)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(sft_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    sft_scores = evaluate(config, tmp_path / "out", checkpoint=str(run / "reference"), benchmarks="synthetic",
                          limit=2, max_new_tokens=4, mesh=one_device_mesh)
    assert sft_scores["info"]["checkpoint"].endswith("(the run's SFT weights: its frozen reference)")
    assert (tmp_path / "out" / "eval" / "sft_greedy" / "synthetic.jsonl").exists()

    # No --checkpoint: the workdir is the run, so its latest policy is evaluated. The PRM's β for
    # prm_vote@n is the run's own (config.json), not the evaluation config's.
    eval_config = config.copy_and_resolve_references()
    eval_config.algo.beta = config.algo.beta / 4
    scores = evaluate(eval_config, run, benchmarks="synthetic", limit=3, n=2, temperature=1.0, max_new_tokens=8,
                         prm=str(run), mesh=one_device_mesh)
    assert scores["info"]["checkpoint"].endswith("checkpoints/3 (orbax run checkpoint)")
    assert scores["info"]["prm_beta"] == config.algo.beta
    m = scores["benchmarks"]["synthetic"]
    assert {"pass@1", "pass@2", "avg@2", "maj@2", "best@2", "prm_vote@2"} <= set(m) and m["num_problems"] == 3
    assert 0.0 <= m["pass@1"] <= m["pass@2"] <= 1.0 and m["response_length"] <= 8
    lines = (run / "eval" / "step3_n2_t1_prm" / "synthetic.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all("prm_reward" in json.loads(x) for x in lines)


# ------------------------------------------------------------------------------ the CLI, end to end
def test_cli_end_to_end(tmp_path):
    """`python -m prime_jax.evaluate` on a tiny random Qwen2 (the real Qwen tokenizer when the
    fixture is there), --limit=2 on math500 and gsm8k, 16 new tokens: it writes every file."""
    if (QWEN_TOKENIZER / "tokenizer.json").exists():
        from prime_jax.models.tokenizer import load_tokenizer

        vocab = len(load_tokenizer(QWEN_TOKENIZER))
        model_dir = _save_tiny_model(tmp_path / "model", QWEN_TOKENIZER, vocab)
    else:
        tok = build_tiny_tokenizer(tmp_path / "tok")
        model_dir = _save_tiny_model(tmp_path / "model", tmp_path / "tok", len(tok))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "prime_jax.evaluate", f"--config={ROOT / 'configs' / 'tiny.py'}",
           f"--workdir={tmp_path / 'wd'}", f"--checkpoint={model_dir}", "--benchmarks=math500,gsm8k", "--limit=2",
           "--max_new_tokens=16", "--config.data.max_prompt_tokens=1024", "--config.reward.workers=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "wd" / "eval" / "model_greedy"
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "gsm8k.jsonl", "math500.jsonl", "scores.json",
                                                     "scores.md"]
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["benchmarks"]) == {"math500", "gsm8k"}
    for name in ("math500", "gsm8k"):
        m = scores["benchmarks"][name]
        assert m["num_problems"] == 2 and m["num_dropped"] == 0 and 0.0 <= m["pass@1"] <= 1.0
        assert 0 < m["response_length"] <= 16
        records = [json.loads(x) for x in (out / f"{name}.jsonl").read_text().splitlines()]
        assert len(records) == 2
        assert {"prompt", "response", "extracted_answer", "score", "ground_truth"} <= set(records[0])
        assert records[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert "| gsm8k | 2 |" in (out / "scores.md").read_text()
    assert "math500: pass@1" in proc.stdout


@pytest.mark.parametrize("prm_ref, expected", [("freeze", "frozen reference"), ("policy", "policy at step 7")])
def test_prm_reference_is_what_the_run_trained_its_prm_against(tmp_path, monkeypatch, prm_ref, expected):
    """--prm=RUN scores q against the run's frozen reference, or (algo.prm_ref "policy") the
    checkpoint's own policy."""
    (tmp_path / "config.json").write_text(json.dumps({"algo": {"prm_ref": prm_ref}}))
    spec = checkpoints.CheckpointSpec("run", path=str(tmp_path / "checkpoints"), step=7, run_dir=tmp_path)
    monkeypatch.setattr(checkpoints, "run_reference", lambda run_dir, config, mesh, vocab: "frozen reference")
    monkeypatch.setattr(checkpoints, "load_model", lambda s, config, mesh, vocab_size, which="policy": f"{which} at step {s.step}")
    assert checkpoints.load_reference(checkpoints.CheckpointSpec("config"), spec, None, None, vocab_size=10) == expected
