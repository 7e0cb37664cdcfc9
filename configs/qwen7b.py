"""Eurus-2-7B-PRIME: the paper's reference run (PRIME_SPEC.md "Reference hyperparameters").

Policy, implicit PRM and frozen reference all start from the SFT model
`PRIME-RL/Eurus-2-7B-SFT` (Qwen2.5-Math-7B-Base after SFT; `Qwen/Qwen2.5-Math-7B` has the same
architecture). Data: `PRIME-RL/Eurus-2-RL-Data`.

Pick the hardware with the config-file argument (one word after the colon):

    python -m prime_jax.main --config=configs/qwen7b.py:v5p-32   # or v4-64, v5e-64, 8xh100, 16xh100
    python -m prime_jax.plan --config=configs/qwen7b.py:v4-64 --devices=32

Without an argument the mesh is full FSDP over whatever devices there are (`mesh.fsdp = -1`).
A preset sets `mesh.preset` (hence the mesh) and the micro-batching that `python -m prime_jax.plan` showed to fit
(see docs/scale_out.md); any field can still be overridden after it (`--config.mesh.fsdp=8`).

The model shape fields are the real Qwen2.5-Math-7B `config.json` values, so the memory plan works
without downloading weights; when training, the checkpoint's own config.json is what is loaded.
"""

from __future__ import annotations

from prime_jax.config import base_config
from prime_jax.parallel.mesh import MESH_PRESETS, mesh_preset

# Qwen/Qwen2.5-Math-7B config.json (same for PRIME-RL/Eurus-2-7B-SFT).
QWEN25_MATH_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    head_dim=0,  # hidden_size // num_heads = 128
    rope_theta=10000.0,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)

# Per-preset settings on top of the preset's mesh (parallel.MESH_PRESETS). micro_batches splits
# each 256-response mini-batch for gradient accumulation: 256 / micro_batches rows per
# micro-batch, i.e. (256 / micro_batches) / (data * fsdp) rows per device; the loop scores
# score_batch rows per forward pass (score_batch / (data * fsdp) rows per device). Chosen with
# `python -m prime_jax.plan --config=configs/qwen7b.py:PRESET`; the tables are in docs/scale_out.md.
PRESET_OVERRIDES = {
    # 16 chips, 95 GiB: 4 rows/device per micro-batch and per scoring call
    "v5p-32": {"batch.micro_batches": 4, "batch.score_batch": 64},
    # 32 chips, 32 GiB: 1 row/device; oversample 1.0 (as 8xh100 below): the prefill of 512 prompts
    # peaks at 29.4 GiB, over the 90 % line
    "v4-64": {"batch.micro_batches": 8, "batch.score_batch": 32, "rollout.oversample": 1.0},
    # 64 chips, 16 GiB: 1 row/device, oversample 1.0 (tight: see docs/scale_out.md)
    "v5e-64": {"batch.micro_batches": 4, "batch.score_batch": 64, "rollout.oversample": 1.0},
    # 8 GPUs, 80 GB: 2 rows/device; oversample 1.0 samples 256 prompts (1024 rows) per generate call
    # instead of 384 -> bucket 512 (2048 rows), halving the KV cache; groups the accuracy filter drops
    # are refilled by further attempts (rollout.max_refill)
    "8xh100": {"batch.micro_batches": 16, "batch.score_batch": 16, "rollout.oversample": 1.0},
    # 2 nodes x 8 GPUs: 1 row/device
    "16xh100": {"batch.micro_batches": 16, "batch.score_batch": 16},
}


def _set(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    section = config
    for p in parents:
        section = section[p]
    section[leaf] = value


def apply_preset(config, preset: str):
    """Sets the mesh and micro-batching of a hardware preset (see PRESET_OVERRIDES)."""
    p = mesh_preset(preset)
    config.mesh.preset = p["name"]
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = p["data"], p["fsdp"], p["tensor"]
    for dotted, value in PRESET_OVERRIDES[p["name"]].items():
        _set(config, dotted, value)
    config.name = f"qwen7b-prime-{p['name']}"
    return config


def get_config(preset: str | None = None):
    c = base_config()
    c.name = "qwen7b-prime"
    c.seed = 0
    c.total_steps = 592  # the released Eurus-2-7B-PRIME; the paper's comparisons use 240
    c.eval_every = 16
    c.checkpoint_every = 16

    m = c.model
    m.path = "PRIME-RL/Eurus-2-7B-SFT"  # or "Qwen/Qwen2.5-Math-7B" (same shapes, base model)
    m.dtype = "bfloat16"  # bf16 compute
    m.param_dtype = "float32"  # fp32 master weights and Adam moments (policy and PRM)
    m.remat = "full"  # recompute each decoder layer in the backward pass
    m.logprob_chunk = 128
    for key, value in QWEN25_MATH_7B.items():
        m[key] = value

    c.tokenizer.path = ""  # the model's own tokenizer (Qwen2.5 ChatML template)

    c.data.train = "PRIME-RL/Eurus-2-RL-Data"
    c.data.train_split = "train"
    c.data.eval = "aime24,amc23,math500,minerva_math,olympiadbench"
    c.data.max_prompt_tokens = 1024
    c.data.system_prompt = "keep"  # the rows carry Eurus-2's system prompt

    r = c.rollout
    r.n = 4
    r.temperature = 1.0
    r.top_p = 1.0
    r.top_k = 0
    r.max_new_tokens = 3072
    r.eval_temperature = 0.0
    r.eval_max_new_tokens = 3072
    # The released code samples until 256 groups survive the filter; here an attempt samples 1.5x the prompts
    # and at most 3 more attempts refill, so a step whose 4 attempts fall short trains on fewer groups
    # (docs/algorithm.md, "Where prime-jax departs from the reference code").
    r.oversample = 1.5
    r.max_refill = 3

    a = c.algo
    a.estimator = "prime_rloo"
    a.beta = 0.05
    a.clip_eps = 0.2
    a.process_coef = 1.0  # the reference's 5 and 5 are equivalent after whitening
    a.outcome_coef = 1.0
    a.filter = True
    a.filter_low = 0.2
    a.filter_high = 0.8
    a.prm_update = "after"  # the released run (run_prime_main.sh: update=after)
    a.prm_loss = "ce"
    # run_prime_main.sh names its run "...-policy-self-ref" but sets no ref_type, so its yaml's "freeze" applied
    a.prm_ref = "freeze"
    a.agg = "seq-mean-token-mean"
    a.recompute_old_logprobs = True  # the reference recomputes the rollout policy's log-probs before the update
    # Every departure from the reference is off, set here rather than inherited from base_config (a change of the
    # base defaults must not alter the 7B run; tests/test_qwen7b_config.py pins them):
    a.process_source = "prm"  # the implicit PRM (PRIME)
    a.process_norm_floor = 0.0  # the spec's normalisation
    a.process_ramp = "none"  # process rewards at full weight from the first step
    a.prm_warmup_steps = 0  # the policy trains from step 1

    c.policy_optim.lr = 5e-7
    c.policy_optim.weight_decay = 0.01
    c.policy_optim.clip_norm = 1.0
    c.policy_optim.b1, c.policy_optim.b2 = 0.9, 0.999
    c.policy_optim.warmup_steps = 0
    c.prm_optim.lr = 1e-6
    c.prm_optim.weight_decay = 0.0
    c.prm_optim.clip_norm = 10.0
    c.prm_optim.b1, c.prm_optim.b2 = 0.9, 0.999
    c.prm_optim.warmup_steps = 0

    b = c.batch
    b.prompts_per_step = 256  # 1024 responses after filtering
    b.mini_batch = 256  # 4 PPO updates per iteration, 1 epoch
    b.prm_mini_batch = 256  # 4 PRM updates, one pass
    b.micro_batches = 8
    b.score_batch = 256

    c.mesh.preset = ""  # set by the config-file argument (below); alone it changes only the mesh
    c.mesh.data = 1
    c.mesh.fsdp = -1  # ZeRO-3: every weight and moment split over all devices
    c.mesh.tensor = 1

    c.sft.steps = 0  # already SFT'd

    if preset:
        apply_preset(c, preset)
    return c


PRESETS = tuple(sorted(MESH_PRESETS))
