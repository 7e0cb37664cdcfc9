"""The PRIME trainer end to end on a very small config: resume after kill -9, the NaN guard,
metrics/eval rows, the HTML report and the Hugging Face export."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from config_files import load_config
from prime_jax.train.metrics import WALL_CLOCK_PREFIXES, read_metrics, truncate_metrics

ROOT = Path(__file__).resolve().parents[1]

# A very small run of the tiny config: 1-layer model, 4 prompts x 4 samples per step, short responses.
# The accuracy filter is off so every step trains (a barely fine-tuned model is rarely right).
SHORT = {
    "total_steps": 6, "eval_every": 3, "checkpoint_every": 2,
    "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 1, "model.num_heads": 2,
    "model.num_kv_heads": 1,
    "sft.steps": 8, "sft.batch": 8, "sft.num_examples": 64, "sft.warmup_steps": 2,
    "data.synthetic.num_train": 200, "data.synthetic.num_eval": 8,
    "batch.prompts_per_step": 4, "batch.mini_batch": 8, "batch.prm_mini_batch": 16, "batch.score_batch": 16,
    "rollout.max_new_tokens": 16, "rollout.eval_max_new_tokens": 16,
    "algo.filter": False, "reward.workers": 1, "logging.progress_bar": False, "checkpoint.keep": 2,
    # A barely fine-tuned model gets every answer wrong: the `ce` PRM loss still moves the PRM then (the
    # demo's `dpo` needs a right and a wrong answer in a group), so process rewards and the policy train.
    "algo.prm_loss": "ce",
}


def overrides(values: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in values.items()]


def deterministic(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(WALL_CLOCK_PREFIXES)}


def xla_cache_env(cache_dir: Path) -> dict:
    """The environment that gives a subprocess run a persistent compilation cache holding every
    program: the session's (conftest's `PRIME_TESTS_XLA_CACHE`), or else `cache_dir`."""
    return dict(JAX_COMPILATION_CACHE_DIR=str(os.environ.get("PRIME_TESTS_XLA_CACHE", cache_dir)),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


def _env(cache_dir: Path) -> dict:
    """A subprocess run's environment: one CPU device and `xla_cache_env(cache_dir)`."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                **xla_cache_env(cache_dir))


def _command(workdir: Path, values: dict = SHORT) -> list[str]:
    return [sys.executable, "-m", "prime_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
            *overrides(values)]


# The kill -9 run with algo.process_ramp on: its moving average of the PRM's fresh ranking is read by every step, so a
# resume must restore it. A longer, faster SFT gets some answers right (about 3-9% of the samples) and 8 groups per
# step make it likely that every step has a group mixing right and wrong answers, so the average moves from the
# first step on; the gate is the average itself (low 0, high 1).
RAMP = {**SHORT, "sft.steps": 150, "sft.lr": 1e-2, "batch.prompts_per_step": 8, "algo.process_ramp": "ranking",
        "algo.process_ramp_low": 0.0, "algo.process_ramp_high": 1.0}


def tiny_config(values: dict):
    """configs/tiny.py with `values` ({"section.field": value}) set, validated."""
    from prime_jax.config import validate

    config = load_config("tiny", values)
    validate(config)
    return config


def _finalized_checkpoints(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


@pytest.mark.slow
def test_kill9_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    cache = tmp_path / "xla_cache"
    reference_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    log_a = open(tmp_path / "a.log", "w")
    uninterrupted = subprocess.Popen(_command(reference_dir, RAMP), cwd=ROOT, env=_env(cache), stdout=log_a,
                                     stderr=subprocess.STDOUT)
    log_b = open(tmp_path / "b.log", "w")
    victim = subprocess.Popen(_command(killed_dir, RAMP), cwd=ROOT, env=_env(cache), stdout=log_b,
                              stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not _finalized_checkpoints(killed_dir) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert _finalized_checkpoints(killed_dir), (tmp_path / "b.log").read_text()[-3000:]
    time.sleep(random.uniform(0.0, 3.0))  # a random moment after the first checkpoint
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = [r["step"] for r in read_metrics(killed_dir / "metrics.jsonl")]
    resumed = subprocess.run(_command(killed_dir, RAMP), cwd=ROOT, env=_env(cache), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "a.log").read_text()[-3000:]

    expected = [deterministic(r) for r in read_metrics(reference_dir / "metrics.jsonl")]
    got = [deterministic(r) for r in read_metrics(killed_dir / "metrics.jsonl")]
    steps = [r["step"] for r in expected]
    assert steps == [0, 1, 2, 3, 3, 4, 5, 6, 6], steps  # eval rows at 0, 3 and the last step
    assert [r["step"] for r in got] == steps, (killed_at, [r["step"] for r in got])
    for a, b in zip(expected, got):
        assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert any(r.get("policy/loss") for r in expected)  # the policy did train
    # the ramp's average had moved (from 0.5) by the first checkpoint, so a resume that restarted it would differ
    assert any(r.get("prm/ranking_ema", 0.5) != 0.5 for r in expected if r["step"] <= 2), expected[:3]
    assert _finalized_checkpoints(killed_dir) == [4, 6]  # keep-last-2
    assert (killed_dir / "hf_export" / "config.json").exists()


@pytest.mark.slow
def test_nan_guard_metrics_html_and_hf_export(tmp_path):
    """In-process on the 8 fake CPU devices of conftest (mesh data=8)."""
    import jax
    import torch
    import transformers

    from prime_jax.parallel import mesh_from_config
    from prime_jax.train.loop import Trainer

    values = dict(SHORT, total_steps=3, eval_every=0, checkpoint_every=0)
    values["debug.inject_nan_step"] = 2
    values["rollout.overlap_scoring"] = False
    values["algo.process_ramp"] = "ranking"  # the ramp's and the floor's hooks in the step (off in the demo)
    values["algo.process_norm_floor"] = 0.5
    config = tiny_config(values)
    mesh = mesh_from_config(config)
    assert mesh.shape["data"] == jax.device_count() == 8
    trainer = Trainer.create(config, tmp_path, mesh)
    trainer.run()

    rows = read_metrics(tmp_path / "metrics.jsonl")
    train = {r["step"]: r for r in rows if "train/reward" in r}
    evals = {r["step"]: r for r in rows if "eval/accuracy" in r}
    assert sorted(train) == [1, 2, 3] and sorted(evals) == [0, 3]
    assert all(0.0 <= r["eval/accuracy"] <= 1.0 for r in evals.values())
    mini_batches = config.batch.prompts_per_step * config.rollout.n // config.batch.mini_batch
    assert train[1]["nan_skipped"] == 0 and np.isfinite(train[1]["policy/loss"])
    assert train[2]["policy/nan_skipped"] == mini_batches  # every PPO update of the poisoned batch skipped
    assert train[2]["nan_skipped_total"] == mini_batches
    assert train[3]["policy/nan_skipped"] == 0 and np.isfinite(train[3]["policy/loss"])  # training went on
    assert train[3]["nan_skipped_total"] == mini_batches
    for key in ("verifier/accuracy_before_filter", "verifier/accuracy_after_filter", "filter/kept_group_frac",
                "prm/loss", "prm/dpo_accuracy", "returns/process_mean", "returns/outcome_mean", "advantages/mean",
                "advantages/std", "policy/loss", "policy/clip_frac", "policy/approx_kl", "policy/grad_norm",
                "prm/grad_norm", "response/length_mean", "perf/rollouts_per_s", "perf/tokens_per_s", "time/wall"):
        assert key in train[3], key
    assert all(0.0 <= train[s]["prm/process_scale"] <= 1.0 for s in (1, 3))
    page = (tmp_path / "rollouts" / "step_0.html").read_text()
    assert "q=" in page and "outcome" in page
    assert (tmp_path / "rollouts" / "step_3.html").exists()
    assert (tmp_path / "tb").is_dir()

    # The exported checkpoint loads in transformers and gives the policy's logits.
    export = tmp_path / "hf_export"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(export), torch_dtype=torch.float32)
    hf.eval()
    ids = np.array([[1, 60, 40, 41, 42, 5, 2, 1, 70, 71]], np.int32)
    with torch.no_grad():
        expected = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    got = np.asarray(jax.device_get(trainer.policy_model(ids)))
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)
    assert (export / "tokenizer.json").exists()


def test_prm_warmup_steps_train_only_the_prm(tmp_path):
    """algo.prm_warmup_steps: the policy stays the start (SFT) model through the warm-up, the PRM trains."""
    import jax

    from prime_jax.parallel import mesh_from_config
    from prime_jax.train.loop import Trainer

    config = tiny_config(dict(SHORT, total_steps=2, eval_every=0, checkpoint_every=0, **{"algo.prm_warmup_steps": 1}))
    trainer = Trainer.create(config, tmp_path, mesh_from_config(config))
    start_prm = jax.device_get(trainer.prm.params)
    config.total_steps = 1  # stop after the warm-up step, then look at the weights
    trainer.run()
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), jax.device_get(trainer.policy.params),
                        jax.device_get(trainer.ref_params))
    assert all(jax.tree.leaves(same)), "the policy moved during the PRM warm-up"
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(trainer.prm.params), start_prm)
    assert any(jax.tree.leaves(moved)), "the PRM did not train during its warm-up"
    row = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/reward" in r][0]
    assert row["policy/warmup"] == 1.0 and "policy/loss" not in row and np.isfinite(row["prm/loss"])


def test_stop_after_leaves_with_a_checkpoint_and_eval_at_start_false_skips_the_step_0_eval(tmp_path):
    """A long run in chunks (main's --stop_after): steps up to k, a checkpoint there, no export; a rerun resumes."""
    from prime_jax.parallel import mesh_from_config
    from prime_jax.train.loop import Trainer

    config = tiny_config(dict(SHORT, total_steps=3, eval_every=0, checkpoint_every=0, eval_at_start=False))
    trainer = Trainer.create(config, tmp_path, mesh_from_config(config))
    assert trainer.run(stop_after=1) == {} and trainer.preempted_at == 1
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]  # no step-0 eval row
    assert _finalized_checkpoints(tmp_path) == [1] and not (tmp_path / "hf_export").exists()
    assert Trainer.create(config, tmp_path, mesh_from_config(config)).start_step == 1


def test_a_stop_right_after_a_periodic_checkpoint_does_not_save_that_step_again(tmp_path):
    """SIGTERM or --stop_after just after a checkpoint_every step: the step is already saved (orbax refuses a
    second save of a step: this once crashed a preempted SmolLM2 run with exit 1 instead of leaving cleanly)."""
    from prime_jax.parallel import mesh_from_config
    from prime_jax.train.loop import Trainer

    config = tiny_config(dict(SHORT, total_steps=3, eval_every=0, checkpoint_every=1, eval_at_start=False))
    trainer = Trainer.create(config, tmp_path, mesh_from_config(config))
    assert trainer.run(stop_after=1) == {} and trainer.preempted_at == 1
    assert _finalized_checkpoints(tmp_path) == [1]
    assert Trainer.create(config, tmp_path, mesh_from_config(config)).start_step == 1


def test_truncate_metrics_drops_later_and_partial_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval/accuracy": 0.1}, {"step": 1, "x": 1}, {"step": 2, "x": 2}, {"step": 2, "eval/accuracy": 0.2},
            {"step": 3, "x": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "x"')
    assert truncate_metrics(path, 2) == 2
    assert read_metrics(path) == rows[:4]
    assert path.read_text().endswith("\n")
    assert truncate_metrics(path, None) == 4
    assert read_metrics(path) == []


def test_every_process_source_the_config_accepts_is_registered():
    """algo.process_source is validated against config.PROCESS_SOURCES; each name has its source of q."""
    from prime_jax.config import PROCESS_SOURCES
    from prime_jax.train.process_rewards import PROCESS_SOURCES as REGISTERED

    assert set(REGISTERED) == set(PROCESS_SOURCES)


def test_process_reward_scale_follows_the_fresh_ranking():
    import ml_collections

    from prime_jax.train.prm_phase import process_reward_scale

    a = ml_collections.ConfigDict(dict(process_ramp="ranking", process_ramp_low=0.5, process_ramp_high=0.7,
                                       process_ramp_decay=0.5))
    ema, scale = process_reward_scale(a, 0.5, {"prm/dpo_accuracy": 0.3})
    assert ema == pytest.approx(0.4) and scale == 0.0  # below chance: no process rewards
    ema, scale = process_reward_scale(a, 0.6, {"prm/dpo_accuracy": 0.6})
    assert abs(ema - 0.6) < 1e-6 and abs(scale - 0.5) < 1e-6
    assert process_reward_scale(a, 0.9, {})[1] == 1.0  # no PRM metrics (outcome-only): the average stays
    a.process_ramp = "none"
    assert process_reward_scale(a, 0.5, {"prm/dpo_accuracy": 0.1}) == (0.5, 1.0)  # the spec: full weight



def test_oracle_process_rewards_train_the_policy_and_leave_the_prm(tmp_path):
    """algo.process_source "oracle": the task's step-level verdicts take the PRM's place (no PRM update),
    every wrong row is marked, and the eval logs steps_right beside the accuracy."""
    import jax

    from prime_jax.parallel import mesh_from_config
    from prime_jax.train.loop import Trainer

    config = tiny_config(dict(SHORT, total_steps=2, eval_every=2, checkpoint_every=0,
                              **{"algo.process_source": "oracle"}))
    trainer = Trainer.create(config, tmp_path, mesh_from_config(config))
    start_prm = jax.device_get(trainer.prm.params)
    trainer.run()
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), jax.device_get(trainer.prm.params), start_prm)
    assert all(jax.tree.leaves(same)), "the PRM trained under oracle process rewards"
    rows = read_metrics(tmp_path / "metrics.jsonl")
    steps = [r for r in rows if "train/reward" in r]
    for r in steps:  # a barely fine-tuned model: (almost) every row wrong, so (almost) every row marked
        assert r["prm/oracle_marked_frac"] >= 1.0 - r["verifier/accuracy_before_filter"] - 1e-6
        assert "prm/loss" not in r and np.isfinite(r["policy/loss"])
    evals = [r for r in rows if "eval/accuracy" in r]
    assert evals and all(0.0 <= r["eval/synthetic/steps_right"] <= 1.0 for r in evals)


@pytest.mark.parametrize("source", ["ref_logprob", "prm_logprob"])
def test_process_rewards_with_the_sft_log_probs(tmp_path, monkeypatch, source):
    """algo.process_source "ref_logprob": the frozen SFT model's log-probs are the process rewards (the
    PRM is not trained; the run logs their per-token mean); "prm_logprob": the PRM trains as PRIME's and
    the policy gets q + log π_ref."""
    import jax

    from prime_jax.parallel import mesh_from_config
    from prime_jax.train import process_rewards
    from prime_jax.train.loop import Trainer

    given = []  # the q of each PRM phase (prm_logprob only)
    real_phase = process_rewards.run_prm_phase

    def recording_phase(*args, **kwargs):
        out = real_phase(*args, **kwargs)
        given.append(out[1])
        return out

    monkeypatch.setattr(process_rewards, "run_prm_phase", recording_phase)
    config = tiny_config(dict(SHORT, total_steps=2, eval_every=0, checkpoint_every=0,
                              **{"algo.process_source": source, "algo.prm_ref": "freeze"}))
    trainer = Trainer.create(config, tmp_path, mesh_from_config(config))
    start_prm = jax.device_get(trainer.prm.params)
    seen = []  # per step: (the q the policy gets, the SFT log-probs of the batch)
    real_update = trainer.update_prm

    def recording_update(prm, batch, *args):  # -> (prm state, q, metrics)
        out = real_update(prm, batch, *args)
        seen.append((np.asarray(jax.device_get(out[1])),
                     np.asarray(jax.device_get(batch.ref_logprobs * batch.response_mask))))
        return out

    trainer.update_prm = recording_update
    trainer.run()
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), jax.device_get(trainer.prm.params), start_prm)
    steps = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/reward" in r]
    assert len(steps) == 2 and len(seen) == 2 and all(np.isfinite(r["policy/loss"]) for r in steps)
    if source == "ref_logprob":
        assert all(jax.tree.leaves(same)), "the PRM trained under ref_logprob process rewards"
        assert not given
        for r, (q, ref) in zip(steps, seen):
            np.testing.assert_array_equal(q, ref)
            assert r["prm/ref_logprob_per_token"] < 0 and "prm/loss" not in r
    else:
        assert not all(jax.tree.leaves(same)), "the PRM did not train"
        for r, (q, ref), prm_q in zip(steps, seen, given):
            np.testing.assert_allclose(q, prm_q + ref, rtol=1e-6, atol=1e-6)
            assert np.isfinite(r["prm/loss"])
