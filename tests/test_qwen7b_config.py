"""configs/qwen7b.py: the reference hyper-parameters, the real Qwen2.5-Math-7B shapes, the presets."""

from pathlib import Path

import jax
import pytest
from flax import nnx

from config_files import config_module
from prime_jax.config import ConfigError, base_config, validate
from prime_jax.parallel import MESH_PRESETS, mesh_preset, mesh_sizes_from_config

ROOT = Path(__file__).resolve().parent.parent


def load_qwen7b():
    return config_module("qwen7b")


@pytest.fixture(autouse=True)
def _online(monkeypatch):
    # validate() checks hub ids against the local cache only when offline; the shapes need no weights.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


# Qwen/Qwen2.5-Math-7B config.json (PRIME-RL/Eurus-2-7B-SFT has the same architecture).
REAL = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, head_size=128, rope_theta=10000.0,
            rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False)


def test_model_shapes_are_qwen25_math_7b():
    from prime_jax.train.builder import model_config

    config = load_qwen7b().get_config()
    mc = model_config(config.model, download=False)
    for field, value in REAL.items():
        assert getattr(mc, field) == value, field
    assert mc.dtype == "bfloat16" and mc.param_dtype == "float32" and mc.remat == "full"
    assert 7.6e9 < mc.num_params() < 7.7e9  # 7,615,616,512

    model = nnx.eval_shape(lambda: type_model()(mc, rngs=nnx.Rngs(0)))
    L, D, F, V, N, K, H = 28, 3584, 18944, 152064, 28, 4, 128
    assert model.embed_tokens.get_value().shape == (V, D)
    assert model.lm_head.get_value().shape == (D, V)
    assert model.layers.q_kernel.get_value().shape == (L, D, N, H)
    assert model.layers.k_kernel.get_value().shape == (L, D, K, H)
    assert model.layers.v_kernel.get_value().shape == (L, D, K, H)
    assert model.layers.o_kernel.get_value().shape == (L, N, H, D)
    assert model.layers.gate_kernel.get_value().shape == (L, D, F)
    assert model.layers.down_kernel.get_value().shape == (L, F, D)
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert total == mc.num_params()


def type_model():
    from prime_jax.models import Qwen2ForCausalLM

    return Qwen2ForCausalLM


def test_reference_hyperparameters():
    c = load_qwen7b().get_config()
    assert c.model.path in ("PRIME-RL/Eurus-2-7B-SFT", "Qwen/Qwen2.5-Math-7B")
    assert c.tokenizer.path == ""  # policy, PRM and reference all from model.path
    assert c.data.train == "PRIME-RL/Eurus-2-RL-Data"
    assert c.rollout.n == 4 and c.rollout.temperature == 1.0
    assert c.batch.prompts_per_step == 256 and c.batch.mini_batch == 256 and c.batch.prm_mini_batch == 256
    assert c.data.max_prompt_tokens == 1024 and c.rollout.max_new_tokens == 3072
    assert c.policy_optim.lr == 5e-7 and c.policy_optim.weight_decay == 0.01 and c.policy_optim.clip_norm == 1.0
    assert (c.policy_optim.b1, c.policy_optim.b2) == (0.9, 0.999)
    assert c.prm_optim.lr == 1e-6 and c.prm_optim.weight_decay == 0.0 and c.prm_optim.clip_norm == 10.0
    assert c.algo.clip_eps == 0.2 and c.algo.beta == 0.05
    assert (c.algo.filter, c.algo.filter_low, c.algo.filter_high) == (True, 0.2, 0.8)
    assert c.algo.estimator == "prime_rloo" and c.algo.prm_update == "after" and c.algo.prm_loss == "ce"
    assert c.model.dtype == "bfloat16" and c.model.param_dtype == "float32" and c.model.remat == "full"


def test_every_departure_is_off_and_set_in_the_file():
    """The 7B recipe is the reference's: every prime-jax departure off, PRM / PPO updates per step as the
    reference's (1024 responses in mini-batches of 256: 4 each, one pass), each value set in configs/qwen7b.py
    itself, so a change of base_config()'s defaults cannot alter the 7B run."""
    c = load_qwen7b().get_config()
    pinned = {
        "algo.process_source": "prm", "algo.process_norm_floor": 0.0, "algo.process_ramp": "none",
        "algo.prm_warmup_steps": 0, "algo.prm_update": "after", "algo.prm_loss": "ce", "algo.prm_ref": "freeze",
        "algo.beta": 0.05, "algo.process_coef": 1.0, "algo.outcome_coef": 1.0, "algo.estimator": "prime_rloo",
        "algo.agg": "seq-mean-token-mean", "algo.recompute_old_logprobs": True, "algo.filter": True,
        "policy_optim.warmup_steps": 0, "prm_optim.warmup_steps": 0, "prm_optim.lr": 1e-6, "policy_optim.lr": 5e-7,
        "rollout.oversample": 1.5, "rollout.max_refill": 3,
    }
    from prime_jax.config import flatten

    values = flatten(c)
    assert {k: values[k] for k in pinned} == pinned
    rows = c.batch.prompts_per_step * c.rollout.n
    assert rows == 1024 and rows // c.batch.prm_mini_batch == 4 and rows // c.batch.mini_batch == 4
    # set in the file, not inherited: the file's get_config must not read these from base_config's values
    source = (ROOT / "configs" / "qwen7b.py").read_text()
    for key in pinned:
        section, field = key.split(".")
        short = {"algo": "a", "rollout": "r"}.get(section)
        assert f"{short}.{field} = " in source or f"c.{key} = " in source, key


def test_all_fields_are_the_schema():
    c = load_qwen7b().get_config()
    from prime_jax.config import flatten

    assert set(flatten(c)) == set(flatten(base_config()))


@pytest.mark.parametrize("preset", sorted(MESH_PRESETS))
def test_presets_validate_on_their_device_count(preset):
    q = load_qwen7b()
    c = q.get_config(preset)
    p = mesh_preset(preset)
    validate(c, num_devices=p["devices"])
    assert c.mesh.preset == p["name"]
    data, fsdp, tensor = mesh_sizes_from_config(c, p["devices"])
    assert data * fsdp * tensor == p["devices"]
    # every micro-batch splits evenly over the data-parallel devices, in whole prompt groups
    dp = data * fsdp
    for field in ("mini_batch", "prm_mini_batch"):
        rows = c.batch[field] // c.batch.micro_batches
        assert rows % dp == 0 and rows % c.rollout.n == 0, (field, rows, dp)
    assert c.batch.score_batch % dp == 0 and c.batch.score_batch % c.rollout.n == 0  # one scoring pass
    with pytest.raises(ConfigError, match="mesh"):
        validate(c, num_devices=p["devices"] * 2)


def test_default_mesh_fills_devices_and_preset_names():
    q = load_qwen7b()
    c = q.get_config()
    validate(c, num_devices=8)
    assert mesh_sizes_from_config(c, 8) == (1, 8, 1)
    assert mesh_preset("8xH100")["devices"] == 8
    assert mesh_preset("v5p-32")["devices"] == 16  # v5p-32 counts TensorCores: 16 chips
    with pytest.raises(ValueError, match="unknown mesh preset"):
        q.get_config("v3-8")
