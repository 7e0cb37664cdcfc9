"""The configuration schema of a PRIME run: every field, its default and its one-line documentation
(the comment beside it, which `prime_jax/config_fields.py` reads from this file's source), and the
names the checks in `checks.py` accept. See the package's docstring for the rules.
"""

from __future__ import annotations

import ml_collections

from prime_jax.data.sets import SYNTHETIC

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
MODEL_TYPES = ("qwen2", "llama")  # the decoders prime_jax.models runs (models.config.ARCHITECTURES)
DTYPES = ("float32", "bfloat16", "float16")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean")
PRM_UPDATE_MODES = ("after", "before", "reverse", "none")  # see prime_jax/train/prm_phase.py
# algo.process_source: the names of the sources of q registered in prime_jax/train/process_rewards.py
# (tests/test_trainer.py checks the two agree). Grouped by what a source needs:
PROCESS_SOURCES = ("prm", "prm_logprob", "oracle", "oracle_wrong_rows", "ref_logprob")
PRM_TRAINING_SOURCES = ("prm", "prm_logprob")  # a trained implicit PRM (what benchmarks/prm_probe.py probes)
ORACLE_SOURCES = ("oracle", "oracle_wrong_rows")  # the synthetic task's demonstrations
SFT_LOGPROB_SOURCES = ("ref_logprob", "prm_logprob")  # the frozen SFT model's log-probs (algo.prm_ref "freeze")
RANDOM_MODEL = "random"
TINY_TOKENIZER = "tiny"


class ConfigError(ValueError):
    """A bad config value; ``str(error)`` is one line that starts with the field's name."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def base_config() -> ml_collections.ConfigDict:
    """The full schema with the reference (Eurus-2-7B-PRIME) hyper-parameters as defaults."""
    c = ml_collections.ConfigDict()
    c.name = "base"  # run name; the default workdir is ./runs/<name>
    c.seed = 0  # every random choice (init, data order, sampling, shuffles) derives from it
    c.total_steps = 240  # PRIME iterations (0: only SFT + the step-0 eval)
    c.eval_every = 16  # held-out eval after every k-th step (also at step 0 and the last); 0: start/end only
    c.checkpoint_every = 16  # checkpoint after every k-th step (also the last); 0: only the last
    c.eval_at_start = True  # the step-0 eval of the start policy; false: skip it (e.g. the SFT run already measured it)
    _model_and_data_sections(c)
    _rollout_section(c)
    _algorithm_section(c)
    _optimizer_and_batch_sections(c)
    _system_sections(c)
    _run_sections(c)
    return c


def _model_and_data_sections(c: ml_collections.ConfigDict) -> None:
    """model, tokenizer, data (with the synthetic task)."""
    # The policy (and PRM, and frozen reference): all three start from the same weights.
    c.model = ml_collections.ConfigDict()
    c.model.path = RANDOM_MODEL  # HF folder or hub id (config.json + safetensors), a .gguf file, a packaged model ("smollm2-135m-instruct"), or "random" (shape below)
    c.model.dtype = "bfloat16"  # compute dtype of activations/matmuls: float32 | bfloat16 | float16
    c.model.param_dtype = "float32"  # master weights and optimizer state dtype
    c.model.remat = "none"  # per-layer rematerialisation: none | full | dots | dots_no_batch
    c.model.fused_mlp = False  # gate and up projections as one product ([D, 2, F]): a faster backward on CPU (moves training numbers by float rounding)
    c.model.logprob_chunk = 128  # sequence chunk for log-probs (bounds the [B, chunk, V] logits)
    # Shape of a "random" model (ignored when loading a checkpoint).
    c.model.model_type = "qwen2"  # architecture: qwen2 (q/k/v biases) | llama (none); a checkpoint's own config.json decides
    c.model.vocab_size = 0  # 0: the tokenizer's size (len(tokenizer))
    c.model.hidden_size = 64  # hidden size D
    c.model.intermediate_size = 256  # MLP width F
    c.model.num_layers = 2  # decoder layers L
    c.model.num_heads = 4  # query heads N
    c.model.num_kv_heads = 2  # key/value heads K (N must be a multiple)
    c.model.head_dim = 0  # 0: hidden_size // num_heads
    c.model.rope_theta = 10000.0  # RoPE base
    c.model.max_position_embeddings = 4096  # written to config.json on export
    c.model.tie_word_embeddings = True  # share the embedding and the output projection

    c.tokenizer = ml_collections.ConfigDict()  # which tokenizer (and chat template) the run uses
    c.tokenizer.path = ""  # "" = model.path; "tiny" = build the tiny ChatML tokenizer in WORKDIR/tokenizer; or a folder / hub id / .gguf file / packaged model

    c.data = ml_collections.ConfigDict()  # training and held-out problems, and how prompts are built
    # Training prompts: "synthetic", a file/folder (veRL schema or a benchmark's own), a packaged benchmark (e.g.
    # gsm8k_train) or a HF dataset; a comma list is one pool, its sources one after another.
    c.data.train = "PRIME-RL/Eurus-2-RL-Data"  # source or comma list of sources (see above)
    c.data.train_split = "train"  # split of a HF dataset / file stem in a folder
    # The last k problems of every non-synthetic data.train source are held out: never trained or SFT'd on,
    # evaluated as the eval source "heldout" when data.eval lists it (0: none held out).
    c.data.holdout = 0  # problems held out of each data.train file source (see above)
    c.data.eval = "aime24,amc23,math500,minerva_math,olympiadbench"  # comma list of eval sources ("synthetic", "heldout" or as data.train); named as prime_jax/data/sources.py says
    c.data.format = "auto"  # row layout of data.train / data.eval files: auto (detect from the fields) or a prime_jax.data.FORMATS name
    c.data.eval_max_problems = 0  # per eval source: 0 = all, k = the first k
    c.data.max_prompt_tokens = 1024  # prompts longer than this are dropped (and counted)
    c.data.system_prompt = "keep"  # "keep": rows' own system message; "none": remove; "eurus2": Eurus-2's action-tag prompt
    # What follows a math problem's text in its user message (benchmark-format rows and the synthetic word task;
    # veRL rows keep theirs): "eurus2" (Eurus-2-SFT's "Present the answer in LaTex format: \boxed{Your answer}"),
    # "step_by_step" (the paper's "Please reason step by step, and put your final answer within \boxed{}."), "none",
    # or any sentence: your own instruction, after a blank line
    c.data.instruction = "eurus2"  # eurus2 | step_by_step | none | your own text (see above)
    # The synthetic multi-step arithmetic task (data.train / data.eval = "synthetic").
    c.data.synthetic = ml_collections.ConfigDict()
    # arith (prime_jax/data/synthetic.py) | chains (one-digit steps, 5 by default; data/chains.py) | word (word problems
    # in natural language with worked solutions, 1-2 operations by default, for real tokenizers; data/word_problems.py)
    c.data.synthetic.task = "arith"  # arith | chains | word (see above)
    c.data.synthetic.num_train = 20000  # size of the training pool (seeded from seed)
    c.data.synthetic.num_eval = 200  # held-out problems (a fixed set, seeded from eval_seed)
    c.data.synthetic.eval_seed = 12345  # seed of the held-out set (the same for every run seed; excluded from training)
    c.data.synthetic.difficulty = "medium"  # preset of prime_jax.data.synthetic.DIFFICULTY: easy | medium | hard
    c.data.synthetic.min_steps = 0  # fewest operations per problem (0: the preset's; chains: 5)
    c.data.synthetic.max_steps = 0  # most operations per problem (0: the preset's; chains: min_steps or 5)
    c.data.synthetic.max_start = 0  # largest start value (0: the preset's)
    c.data.synthetic.max_operand = 0  # largest +/- operand (0: the preset's)
    c.data.synthetic.max_factor = 0  # largest multiplier (0: the preset's)
    c.data.synthetic.max_value = 999  # every intermediate value and answer lies in [0, max_value]


def _rollout_section(c: ml_collections.ConfigDict) -> None:
    c.rollout = ml_collections.ConfigDict()  # sampling: training rollouts and the held-out evaluation
    c.rollout.n = 4  # samples per prompt (>= 2 for leave-one-out baselines)
    c.rollout.temperature = 1.0  # sampling temperature of training rollouts (> 0)
    c.rollout.top_p = 1.0  # nucleus sampling (1.0: off)
    c.rollout.top_k = 0  # top-k sampling (0: off)
    c.rollout.max_new_tokens = 3072  # response length limit
    c.rollout.oversample = 1.5  # prompts sampled per attempt = ceil(oversample * batch.prompts_per_step)
    c.rollout.max_refill = 3  # extra sampling attempts per step when too few groups survive the filter
    # Decode slots: how many responses decode at once; a slot whose response stopped takes the next
    # waiting one, so long-tailed lengths do not keep the batch waiting for its longest row
    # (docs/scale_out.md). Rounded up to a multiple of the data-parallel size. 0: one slot per
    # response (the whole attempt decodes as one static batch). A response's tokens do not depend on it.
    # With slots (> 0) rollouts are streamed: each prompt's group is graded as soon as its n samples
    # are done while decoding goes on, and sampling stops once batch.prompts_per_step groups survived
    # the filter; groups still decoding or waiting then are dropped and their prompts go back to the
    # buffer (sampled first next step, from scratch), so which groups a step trains on leans towards
    # short ones (measured in docs/scale_out.md, "Streaming rollouts"). 0 samples and grades whole attempts.
    c.rollout.decode_slots = 0  # responses decoding at once (see above); 0: all of an attempt's responses
    c.rollout.eval_temperature = 0.0  # 0: greedy held-out eval
    c.rollout.eval_max_new_tokens = 0  # 0: rollout.max_new_tokens
    c.rollout.eval_batch = 256  # prompts per generate call during eval
    # (with decode_slots > 0 only the kept rows are scored, after the filter: grading overlaps decoding instead)
    c.rollout.overlap_scoring = True  # score every sampled row while the graders run (overlap); False: only kept rows, after


def _algorithm_section(c: ml_collections.ConfigDict) -> None:
    c.algo = ml_collections.ConfigDict()  # PRIME's algorithm: implicit PRM, advantages, PPO, filter
    c.algo.estimator = "prime_rloo"  # advantage estimator: prime_rloo | outcome_rloo | prime_grpo | prime_reinforce
    c.algo.beta = 0.05  # implicit-PRM scale in the PRM's cross-entropy
    c.algo.clip_eps = 0.2  # PPO clip range
    c.algo.process_coef = 1.0  # weight of the process (implicit) returns
    c.algo.outcome_coef = 1.0  # weight of the verifier's outcome returns
    c.algo.filter = True  # accuracy filter on; False keeps every group
    c.algo.filter_low = 0.2  # keep prompts whose mean outcome is >= this ...
    c.algo.filter_high = 0.8  # ... and <= this (the accuracy filter's upper bound)
    # When the policy's q is taken relative to the PRM update (PRIME_SPEC "One iteration" 6): "after" (each PRM
    # mini-batch's q from its own update's forward: the released run), "before" (all PRM updates, then one scoring
    # pass: the veRL port's default), "reverse" (veRL's: one scoring pass for the dpo losses' group scores, then the
    # updates as in "after", whose q the policy gets), "none" (frozen PRM, ablation; needs algo.prm_ref "policy")
    c.algo.prm_update = "after"  # after | before | reverse | none (see above and prime_jax/train/prm_phase.py)
    # PRM loss (PRIME_SPEC "PRM loss types"): "ce" (BCE of sigmoid(beta*sum q) on the outcome: the released run),
    # "dpo" (each response against its group's other-outcome responses), "bon_acc" / "bon_rm" (best-of-n weighted dpo;
    # these three need algo.prm_update "reverse", as in veRL), "pairwise" (Bradley-Terry on each group's better/worse
    # pairs, both sides with gradient; not in the reference)
    c.algo.prm_loss = "ce"  # ce | dpo | bon_acc | bon_rm | pairwise (algo.prm_loss, prm_dpo_loss, prm_pairwise_loss)
    c.algo.prm_ref = "freeze"  # the PRM's reference: "freeze" (the start/SFT model) | "policy" (the rollout policy)
    # Where the process rewards come from: "prm" (the implicit PRM: PRIME) | "oracle" (a diagnostic, not PRIME: -1 on
    # the first token where a response departs from the synthetic task's demonstration, right answer or not, 0
    # elsewhere, the PRM left untrained: a step-level verifier, to measure what a process reward could add; prm_phase.py)
    # | "oracle_wrong_rows" (the same marks on the rows the outcome calls wrong only: exact credit where an outcome
    # label says something, the most a PRM learnt from outcome labels can place without generalising beyond them)
    # | "ref_logprob" (q = log π_ref of each token, the frozen SFT model's own confidence, which the implicit reward
    # log π_φ - log π_ref subtracts away; needs algo.prm_ref "freeze"; a diagnostic too, the PRM left untrained)
    # | "prm_logprob" (the PRM trains as PRIME's, and the policy gets its own log-probs log π_φ = q + log π_ref,
    # the implicit reward with the SFT model's confidence left in; needs algo.prm_ref "freeze"; not in the paper)
    c.algo.process_source = "prm"  # prm | prm_logprob | oracle | oracle_wrong_rows | ref_logprob
    # PRM warm-up (not in the reference; docs/algorithm.md): the first k steps train only the PRM, on the start policy's
    # rollouts, and leave the policy as it is; the warm-up steps count in total_steps. 0: off (the spec).
    c.algo.prm_warmup_steps = 0  # steps that train only the PRM before the policy starts training
    # Departures from the spec, off by default (PRIME_SPEC "Pitfalls": normalisation lifts q to O(1) whatever the PRM knows):
    c.algo.process_norm_floor = 0.0  # nats; divide q by max(largest |suffix sum|, this) (0: the spec's divisor)
    c.algo.process_ramp = "none"  # "none" | "ranking": scale a trained PRM's rewards by clip((ema - low)/(high - low), 0, 1)
    c.algo.process_ramp_low = 0.5  # ramp: no process reward up to this ema (moving average of prm/dpo_accuracy on fresh samples)
    c.algo.process_ramp_high = 0.65  # ramp: full weight from this ema on
    c.algo.process_ramp_decay = 0.9  # ramp: the ema's decay per step (starts at 0.5, chance; saved in checkpoints)
    c.algo.agg = "seq-mean-token-mean"  # policy-loss aggregation: seq-mean-token-mean | token-mean
    c.algo.recompute_old_logprobs = True  # True: old log-probs from a trainer forward pass; False: the sampler's own


def _optimizer_and_batch_sections(c: ml_collections.ConfigDict) -> None:
    """the two optimizers (policy_optim, prm_optim), batch."""

    def optim(lr, wd, clip):
        o = ml_collections.ConfigDict()
        o.lr = lr  # AdamW learning rate (constant after warm-up)
        o.weight_decay = wd  # decoupled weight decay
        o.clip_norm = clip  # global grad-norm clip (0: off)
        o.b1 = 0.9  # Adam beta1
        o.b2 = 0.999  # Adam beta2
        o.eps = 1e-8  # Adam epsilon
        o.warmup_steps = 0  # linear warm-up, in optimizer updates
        return o

    c.policy_optim = optim(5e-7, 0.01, 1.0)  # policy optimizer
    c.prm_optim = optim(1e-6, 0.0, 10.0)  # implicit PRM optimizer

    c.batch = ml_collections.ConfigDict()  # batch sizes, in responses (rows) unless the name says prompts
    c.batch.prompts_per_step = 256  # prompt groups that survive the filter and are trained on per step
    c.batch.mini_batch = 256  # responses per PPO update (multiple of rollout.n)
    c.batch.prm_mini_batch = 256  # responses per PRM update (multiple of rollout.n)
    c.batch.micro_batches = 1  # gradient-accumulation splits of each mini-batch
    c.batch.score_batch = 256  # responses per log-prob (scoring) forward pass (multiple of n and of mesh data*fsdp)


def _system_sections(c: ml_collections.ConfigDict) -> None:
    """mesh, distributed."""
    c.mesh = ml_collections.ConfigDict()  # the device mesh (data, fsdp, tensor) or a named preset
    c.mesh.data = -1  # data-parallel axis size (-1: the devices left over)
    c.mesh.fsdp = 1  # parameter-sharding axis size
    c.mesh.tensor = 1  # tensor-parallel axis size
    c.mesh.preset = ""  # a prime_jax.parallel.MESH_PRESETS name (e.g. "v5p-32"); set: overrides the three sizes

    # Multi-host start-up (jax.distributed); single-host runs leave it alone.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.mode = "auto"  # auto: start when a coordinator / several processes / a cluster is found; on | off
    c.distributed.coordinator_address = ""  # host:port of process 0 ("": env PRIME_/JAX_COORDINATOR_ADDRESS or auto-detect)
    c.distributed.num_processes = 0  # 0: from the env or auto-detect
    c.distributed.process_id = -1  # -1: from the env or auto-detect
    c.distributed.local_device_ids = ""  # comma list of this process's device ids ("": all)
    c.distributed.initialization_timeout = 300  # seconds to wait for the other processes
    # A process silent this long counts as dead: every other process then exits with status 1 and one line naming
    # it and how to resume (prime_jax/parallel/host_watch.py) instead of waiting forever in a collective.
    c.distributed.heartbeat_timeout = 0  # seconds; 0: env PRIME_HEARTBEAT_TIMEOUT, else 100


def _run_sections(c: ml_collections.ConfigDict) -> None:
    """sft, checkpoint, reward, logging, debug."""
    # Supervised warm start on demonstrations before RL (the synthetic task's step-by-step ones).
    c.sft = ml_collections.ConfigDict()
    c.sft.steps = 0  # optimizer steps (0: no SFT; start from model.path as is)
    c.sft.lr = 1e-3  # AdamW peak learning rate (linear warm-up, then cosine decay to 10%)
    c.sft.weight_decay = 0.0  # AdamW weight decay
    c.sft.batch = 32  # demonstrations per step
    c.sft.warmup_steps = 20  # linear warm-up steps
    c.sft.clip_norm = 1.0  # global grad-norm clip (0: off)
    c.sft.num_examples = 4096  # demonstrations used from each sft.data source (generated, seeded, for "synthetic"; the first k of a file)
    # Comma list of: "synthetic" (the task's step-by-step demonstrations), a JSONL of {"messages": [..., assistant]},
    # or problems with worked solutions (gsm8k_train, math_train, or a file in their format): GSM8K's rewritten to end
    # with \boxed{n}; eval problems and data.holdout's are left out.
    c.sft.data = SYNTHETIC  # demonstration sources (see above)
    # Reuse an SFT stage: the reference folder of an earlier run of the same model and SFT settings (its
    # WORKDIR/reference, e.g. from --sft_only), restored instead of trained ("": WORKDIR/reference, trained there once).
    c.sft.reference_dir = ""  # a saved reference (SFT) folder to start from (see above)
    c.sft.checkpoint_every = 0  # save the SFT state every k steps (0: only on SIGTERM); a rerun resumes from it
    # Systematic slips in the synthetic chains demonstrations (data.synthetic.task "chains"; data/chains.py): a seeded
    # fraction of the 90 one-digit step types whose demonstrated result is one off with probability flaw_prob.
    c.sft.flawed_steps = 0.0  # fraction of step types with slips (0: clean demonstrations)
    c.sft.flaw_prob = 0.6  # probability that a demonstration slips at a flawed step (above 0.5: greedy decoding slips too)
    c.sft.flaw_direction = "either"  # a slip writes r+1 or r-1 ("either"), or r+1 only ("up": two slips never cancel)
    c.sft.flaw_seed = 0  # picks the flawed step types (the same for every run seed, like the held-out set)

    c.checkpoint = ml_collections.ConfigDict()  # run checkpoints (WORKDIR/checkpoints) and the HF export
    c.checkpoint.keep = 3  # keep the last k checkpoints
    c.checkpoint.async_save = True  # write checkpoints in the background
    c.checkpoint.export_hf = True  # export the policy (HF format) to WORKDIR/hf_export at the end

    c.reward = ml_collections.ConfigDict()  # the verifiers' process pool
    c.reward.workers = 4  # grader processes
    c.reward.timeout_s = 10.0  # time budget per graded response (timeout -> 0.0)

    c.logging = ml_collections.ConfigDict()  # what a run writes besides metrics.jsonl
    c.logging.tensorboard = True  # TensorBoard events in WORKDIR/tb
    c.logging.wandb = False  # Weights & Biases (needs `wandb` installed)
    c.logging.wandb_project = "prime-jax"  # W&B project
    c.logging.html_samples = 24  # held-out responses shown per eval in WORKDIR/rollouts/step_N.html (and its pages)
    c.logging.html_per_page = 8  # of them on each page (step_N.html, step_N_p2.html, ...; 0: all on one)
    c.logging.progress_bar = True  # tqdm bar on stderr

    c.debug = ml_collections.ConfigDict()  # fault injection for tests
    c.debug.inject_nan_step = 0  # fault injection for tests: NaN old log-probs in this step's batch (0: off)


def flatten(cfg, prefix: str = "") -> dict:
    """{dotted field name: value} of a config (or of any nested dict)."""
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def field_names() -> list[str]:
    """Every field of the schema, dotted (e.g. ``algo.beta``)."""
    return sorted(flatten(base_config()))


