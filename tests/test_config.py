"""Config schema, validation messages, and the CLI's one-line errors."""

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from config_files import load_config
from prime_jax.config import schema
from prime_jax.config import ConfigError, base_config, validate

ROOT = Path(__file__).resolve().parents[1]


def tiny(name="tiny"):
    return load_config(name)


def error_of(config, num_devices=1) -> str:
    with pytest.raises(ConfigError) as e:
        validate(config, num_devices=num_devices)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_tiny_and_base_configs_validate():
    validate(tiny(), num_devices=1)
    chains = tiny("tiny_chains")
    validate(chains, num_devices=1)
    assert chains.data.synthetic.task == "chains" and chains.model.hidden_size == tiny().model.hidden_size
    validate(tiny(), num_devices=8)  # mesh.data = -1 fills the devices
    c = base_config()
    c.tokenizer.path = "tiny"
    validate(c, num_devices=1)


def test_schema_top_level_fields_and_every_field_commented():
    c = base_config()
    for field in ("total_steps", "eval_every", "checkpoint_every", "seed"):
        assert field in c
    for section in ("model", "tokenizer", "data", "rollout", "algo", "policy_optim", "prm_optim", "batch", "mesh",
                    "sft", "checkpoint", "logging"):
        assert section in c
    source = inspect.getsource(schema)  # base_config and its section functions
    assignments = [line for line in source.splitlines()
                   if re.match(r"\s+(c|o)\.[\w.]+ = ", line) and "ConfigDict()" not in line]
    assert len(assignments) > 80
    undocumented = [line.strip() for line in assignments if "#" not in line]
    assert not undocumented, undocumented


@pytest.mark.parametrize("change, field, words", [
    (lambda c: setattr(c.batch, "mini_batch", 6), "batch.mini_batch", "not divisible by rollout.n"),
    (lambda c: setattr(c.batch, "prm_mini_batch", 24), "batch.prm_mini_batch", "does not divide"),
    (lambda c: setattr(c.rollout, "n", 1), "rollout.n", ">= 2"),
    (lambda c: setattr(c.model, "path", "/nonexistent/model"), "model.path", "does not exist"),
    (lambda c: setattr(c.algo, "estimator", "ppo_gae"), "algo.estimator", "must be one of"),
    (lambda c: setattr(c.algo, "filter_high", 0.1), "algo.filter_high", "filter_low"),
    (lambda c: setattr(c.algo, "prm_update", "double"), "algo.prm_update", "must be one of"),
    (lambda c: setattr(c.algo, "prm_loss", "bce"), "algo.prm_loss", "must be one of"),
    (lambda c: setattr(c.algo, "prm_ref", "sft"), "algo.prm_ref", "must be one of"),
    (lambda c: setattr(c.mesh, "data", 3), "mesh", "does not match the 1 devices"),
    (lambda c: setattr(c.model, "dtype", "float8"), "model.dtype", "must be one of"),
    (lambda c: setattr(c.rollout, "temperature", 0.0), "rollout.temperature", "> 0"),
    (lambda c: setattr(c.policy_optim, "b2", 1.0), "policy_optim.b2", "[0, 1)"),
    (lambda c: setattr(c.model, "num_kv_heads", 3), "model.num_heads", "multiple of model.num_kv_heads"),
    (lambda c: setattr(c.data, "train", "/no/such/file.parquet"), "data.train", "does not exist"),
    (lambda c: setattr(c, "seed", -1), "seed", ">= 0"),
    (lambda c: setattr(c.rollout, "decode_slots", -8), "rollout.decode_slots", ">= 0"),
    (lambda c: setattr(c.data.synthetic, "task", "sudoku"), "data.synthetic.task", "must be one of"),
    (lambda c: setattr(c.algo, "process_norm_floor", -1.0), "algo.process_norm_floor", ">= 0"),
    (lambda c: setattr(c.algo, "process_ramp", "linear"), "algo.process_ramp", "must be one of"),
    (lambda c: setattr(c.algo, "process_ramp_high", 0.4), "algo.process_ramp_high", "process_ramp_low <"),
    (lambda c: setattr(c.algo, "process_ramp_decay", 1.0), "algo.process_ramp_decay", "[0, 1)"),
    (lambda c: setattr(c.algo, "prm_warmup_steps", -1), "algo.prm_warmup_steps", ">= 0"),
    (lambda c: setattr(c.algo, "prm_warmup_steps", c.total_steps), "algo.prm_warmup_steps", "below total_steps"),
    (lambda c: (setattr(c.algo, "prm_warmup_steps", 5), setattr(c.algo, "estimator", "outcome_rloo")),
     "algo.prm_warmup_steps", "trains no PRM"),
    (lambda c: setattr(c.sft, "flawed_steps", 1.5), "sft.flawed_steps", "[0, 1]"),
    (lambda c: setattr(c.sft, "flaw_prob", -0.1), "sft.flaw_prob", "[0, 1]"),
    (lambda c: setattr(c.sft, "flaw_direction", "down"), "sft.flaw_direction", "'up'"),
    (lambda c: setattr(c.sft, "flawed_steps", 0.3), "sft.flawed_steps", "task 'arith'"),
    # settings that would silently do nothing (issue 29): a frozen PRM equal to its frozen reference gives q = 0 ...
    (lambda c: (setattr(c.algo, "prm_update", "none"), setattr(c.algo, "prm_ref", "freeze")),
     "algo.prm_update", "q = log π_φ - log π_ref is 0 (outcome-only under another name"),
    (lambda c: (setattr(c.algo, "prm_update", "none"), setattr(c.algo, "prm_ref", "freeze"),
                setattr(c.algo, "process_source", "prm_logprob")), "algo.prm_update", "'ref_logprob' under another name"),
    # ... the ramp's gate reads a trained PRM's ranking, which other process sources never log ...
    (lambda c: (setattr(c.algo, "process_ramp", "ranking"), setattr(c.algo, "process_source", "oracle")),
     "algo.process_ramp", "its weight would stay 0"),
    # ... and veRL's dpo losses read the group scores of reverse's first scoring pass
    (lambda c: setattr(c.algo, "prm_loss", "dpo"), "algo.prm_update", "which only 'reverse' runs"),
    (lambda c: (setattr(c.algo, "prm_loss", "bon_rm"), setattr(c.algo, "prm_update", "after")),
     "algo.prm_update", "which only 'reverse' runs"),
])
def test_bad_values_name_the_field(change, field, words):
    c = tiny()
    change(c)
    message = error_of(c)
    assert message.startswith(field + ":"), message
    assert words in message, message


@pytest.mark.parametrize("values", [
    {"algo.prm_update": "none"},  # tiny.py's reference is the rollout policy: q = log π_SFT - log π_old, not 0
    {"algo.prm_update": "none", "algo.prm_ref": "freeze", "algo.estimator": "outcome_rloo"},  # no PRM at all
    {"algo.prm_loss": "dpo", "algo.prm_update": "reverse"}, {"algo.prm_loss": "bon_acc", "algo.prm_update": "reverse"},
    {"algo.prm_loss": "dpo", "algo.estimator": "outcome_rloo"},  # no PRM trained: its loss is not read
    {"algo.process_ramp": "ranking"},
    {"algo.process_ramp": "ranking", "algo.process_source": "prm_logprob", "algo.prm_ref": "freeze"},
])
def test_neighbours_of_the_refused_settings_validate(values):
    validate(load_config("tiny", values), num_devices=1)


def test_wrong_type_and_unknown_field():
    import ml_collections

    d = tiny().to_dict()
    d["total_steps"] = 1.5  # a config file could build such a dict; overrides are type-checked by ml_collections
    assert error_of(ml_collections.ConfigDict(d)).startswith("total_steps: expected int")
    c = tiny()
    c.unlock()
    c.algo.betta = 0.1
    assert error_of(c).startswith("algo.betta: unknown field")


def test_data_parallel_divisibility():
    c = tiny()  # mini_batch 32 responses
    c.batch.prm_mini_batch = 64  # (the PRM's mini-batch obeys the same rule; this test is about the policy's)
    c.batch.micro_batches = 4  # 8 rows per micro-batch
    validate(c, num_devices=8)
    c.batch.micro_batches = 8  # 4 rows per micro-batch, 8 devices
    message = error_of(c, num_devices=8)
    assert message.startswith("batch.mini_batch:") and "data-parallel" in message


def _cli(*args, timeout=240):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, "-m", "prime_jax.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("override, field", [
    ("--config.model.path=/nonexistent/qwen", "model.path"),
    ("--config.batch.mini_batch=30", "batch.mini_batch"),
    ("--config.mesh.data=4", "mesh"),
])
def test_cli_bad_config_is_one_line_error(tmp_path, override, field):
    result = _cli("--config=configs/tiny.py", f"--workdir={tmp_path}", override)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line
             and not line.startswith(("W", "I")) or "error" in line]
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1, result.stderr
    assert f"config {field}:" in errors[0], errors[0]
    assert not any(tmp_path.iterdir())  # nothing was started
