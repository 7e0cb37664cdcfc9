"""PRIME on a 2-core CPU: a tiny Qwen2 on synthetic multi-step arithmetic (the default config).

    python -m prime_jax.main --config=configs/tiny.py

A random-init Qwen2-architecture model with the tiny character tokenizer is first warm-started
by SFT on step-by-step demonstrations (so it starts partially correct, like Eurus-2-SFT), then
trained with PRIME; policy, PRM and reference all start from the SFT weights. Held-out accuracy
is greedy pass@1 on a fixed seeded set of problems. The outcome-only baseline is
`--config.algo.estimator=outcome_rloo` (benchmarks/ablation.py runs both).

Following PRIME_SPEC's pitfall, the PRM's learning rate is 10x the policy's: with equal rates the
barely trained PRM's rewards (rescaled to O(1) by the normalisation) are noise at full strength.
"""

from prime_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "tiny"
    c.seed = 0
    c.total_steps = 120
    c.eval_every = 20
    c.checkpoint_every = 20

    c.model.path = "random"
    c.model.dtype = "float32"  # bf16 matmuls are slow on CPUs
    c.model.param_dtype = "float32"
    c.model.hidden_size = 128
    c.model.intermediate_size = 384
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.max_position_embeddings = 256
    c.model.tie_word_embeddings = True

    c.tokenizer.path = "tiny"  # built into WORKDIR/tokenizer

    c.data.train = "synthetic"
    c.data.eval = "synthetic"
    c.data.max_prompt_tokens = 64
    c.data.synthetic.num_train = 20000
    c.data.synthetic.num_eval = 200
    c.data.synthetic.difficulty = "medium"

    c.rollout.n = 4
    c.rollout.temperature = 1.0
    c.rollout.max_new_tokens = 64
    c.rollout.oversample = 1.5
    c.rollout.max_refill = 2
    c.rollout.eval_batch = 256

    c.algo.estimator = "prime_rloo"

    c.policy_optim.lr = 1e-4
    c.policy_optim.weight_decay = 0.0
    c.prm_optim.lr = 1e-3  # 10x the policy's (see the module docstring)

    c.batch.prompts_per_step = 16
    c.batch.mini_batch = 32
    c.batch.prm_mini_batch = 64
    c.batch.score_batch = 96

    c.sft.steps = 400
    c.sft.lr = 2e-3
    c.sft.batch = 64
    c.sft.warmup_steps = 40
    c.sft.num_examples = 8192

    c.checkpoint.keep = 2
    c.reward.workers = 2
    c.reward.timeout_s = 5.0
    c.logging.html_samples = 6
    return c
