"""The configuration schema of a PRIME run, and its validation.

Every config file (``configs/*.py``) starts from :func:`base_config` and changes fields; it must
not add new ones (a typo would otherwise be silently ignored). :func:`validate` checks every
field before anything heavy starts and raises :class:`ConfigError` whose message names the field,
e.g. ``batch.mini_batch: 6 is not divisible by rollout.n (4)``; ``prime_jax.main`` prints it as
one line and exits with status 2.

Sizes are counted in *responses* (rows) unless the name says prompts; a prompt's ``n`` responses
are never split across mini- or micro-batches, so every response count must be a multiple of
``rollout.n``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
import ml_collections

from prime_jax.data import FORMATS, HELDOUT, DataError, check_source_name, instruction_error
from prime_jax.data.sets import SYNTHETIC
from prime_jax.data.synthetic import DIFFICULTY
from prime_jax.data.synthetic_tasks import SYNTHETIC_TASKS, task_kwargs

# The checks below that need jax, orbax or the model code (algo, parallel, models.packaged,
# train.checkpoint) import it inside the check: every config file and `--help` read this module,
# which must not load them.

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
    _sampling_and_algorithm_sections(c)
    _system_sections(c)
    return c


def _model_and_data_sections(c: ml_collections.ConfigDict) -> None:
    """model, tokenizer, data (with the synthetic task)."""
    # The policy (and PRM, and frozen reference): all three start from the same weights.
    c.model = ml_collections.ConfigDict()
    c.model.path = RANDOM_MODEL  # HF folder or hub id (config.json + safetensors), a .gguf file, a packaged model ("smollm2-135m-instruct"), or "random" (shape below)
    c.model.dtype = "bfloat16"  # compute dtype of activations/matmuls: float32 | bfloat16 | float16
    c.model.param_dtype = "float32"  # master weights and optimizer state dtype
    c.model.remat = "none"  # per-layer rematerialisation: none | full | dots | dots_no_batch
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


def _sampling_and_algorithm_sections(c: ml_collections.ConfigDict) -> None:
    """rollout, algo, the two optimizers, batch."""
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
    """mesh, distributed, sft, checkpoint, reward, logging, debug."""
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


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _flatten(cfg, prefix=""):
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _looks_like_local_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.count("/") != 1 or Path(s).exists()


def _check_model_dir(field: str, path: str, what: str) -> None:
    """A local folder must exist (holding config.json for models), a .gguf file too; a hub id must
    be reachable; a packaged model's short name is fetched when first loaded."""
    from prime_jax.models.packaged import is_model_file_or_name, is_packaged  # see the note at the top

    if is_packaged(path):
        return
    if is_model_file_or_name(path):  # a .gguf file: converted (once) when loaded
        if not Path(path).expanduser().is_file():
            raise ConfigError(field, f"GGUF file {path!r} does not exist")
        return
    if _looks_like_local_path(path):
        p = Path(path).expanduser()
        if not p.is_dir():
            raise ConfigError(field, f"{what} path {path!r} does not exist")
        if what == "model" and not (p / "config.json").exists():
            raise ConfigError(field, f"model path {path!r} has no config.json")
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        try:
            from huggingface_hub import try_to_load_from_cache  # see the note at the top

            hit = try_to_load_from_cache(path, "config.json" if what == "model" else "tokenizer_config.json")
        except Exception:
            hit = None
        if not isinstance(hit, str):
            raise ConfigError(field, f"{what} {path!r} is not a local folder and not in the offline Hugging Face cache")


def validate(config, *, num_devices: int | None = None) -> None:
    """Checks every field of ``config``; raises ConfigError naming the first bad one.

    num_devices: the device count the mesh must match (default: ``jax.device_count()``).
    """
    _check_schema(config)
    for section in (_check_run, _check_model, _check_tokenizer, _check_data, _check_rollout, _check_algo,
                    _check_optimizers, _check_batch):
        section(config)
    _check_mesh(config, num_devices)
    _check_sft(config)
    _check_outputs(config)


def _check(field: str, ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(field, message)


def _positive(field: str, value) -> None:
    _check(field, value > 0, f"must be > 0, got {value!r}")


def _non_negative(field: str, value) -> None:
    _check(field, value >= 0, f"must be >= 0, got {value!r}")


def _one_of(field: str, value, choices) -> None:
    _check(field, value in choices, f"must be one of {list(choices)}, got {value!r}")


def _check_schema(config) -> None:
    """No unknown or missing field; every value of its default's type."""
    schema = _flatten(base_config())
    values = _flatten(config)
    for name in values:
        if name not in schema:
            raise ConfigError(name, "unknown field (not in prime_jax.config.base_config())")
    for name in schema:
        if name not in values:
            raise ConfigError(name, "missing field")
    for name, default in schema.items():
        value = values[name]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = _is_int(value)
        elif isinstance(default, float):
            ok = _is_num(value)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ConfigError(name, f"expected {type(default).__name__}, got {value!r}")


def _check_run(c) -> None:
    """name, seed, step counts."""
    _check("name", bool(re.fullmatch(r"[A-Za-z0-9_.+-]+", c.name)), f"must be a non-empty file-name-safe word, got {c.name!r}")
    _non_negative("seed", c.seed)
    _non_negative("total_steps", c.total_steps)
    _non_negative("eval_every", c.eval_every)
    _non_negative("checkpoint_every", c.checkpoint_every)


def _check_model(c) -> None:
    """The model section (a 'random' model's shape; a checkpoint folder exists)."""
    m = c.model
    if m.path != RANDOM_MODEL:
        _check("model.path", bool(m.path.strip()), "is empty (use a checkpoint folder, a hub id or 'random')")
        _check_model_dir("model.path", m.path, "model")
    _one_of("model.dtype", m.dtype, DTYPES)
    _one_of("model.param_dtype", m.param_dtype, DTYPES)
    _one_of("model.remat", m.remat, REMAT_POLICIES)
    _one_of("model.model_type", m.model_type, MODEL_TYPES)
    _positive("model.logprob_chunk", m.logprob_chunk)
    _non_negative("model.vocab_size", m.vocab_size)
    for f in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "max_position_embeddings"):
        _positive(f"model.{f}", m[f])
    _non_negative("model.head_dim", m.head_dim)
    _positive("model.rope_theta", m.rope_theta)
    _check("model.num_heads", m.num_heads % m.num_kv_heads == 0,
          f"{m.num_heads} is not a multiple of model.num_kv_heads ({m.num_kv_heads})")
    if m.head_dim == 0:
        _check("model.hidden_size", m.hidden_size % m.num_heads == 0,
              f"{m.hidden_size} is not divisible by model.num_heads ({m.num_heads}); set model.head_dim")
    head = m.head_dim or m.hidden_size // m.num_heads
    _check("model.head_dim", head % 2 == 0, f"head size {head} must be even (rotary embedding)")


def _check_source(field: str, source: str, reserved: tuple[str, ...]) -> None:
    """A data source exists: a reserved name, an existing file, a packaged benchmark or a hub-id-shaped name."""
    if source in reserved:
        return
    if source.startswith((".", "/", "~")) or source.lower().endswith((".parquet", ".jsonl", ".json")):
        _check(field, Path(source).expanduser().exists(), f"data file {source!r} does not exist")
    try:  # a misspelt benchmark fails here, not after the hub client's retries
        check_source_name(source)
    except DataError as e:
        raise ConfigError(field, str(e)) from None


def _check_tokenizer(c) -> None:
    """tokenizer.path."""
    m = c.model
    t = c.tokenizer.path
    if t == "":
        _check("tokenizer.path", m.path != RANDOM_MODEL, "is empty but model.path is 'random': name a tokenizer or 'tiny'")
    elif t != TINY_TOKENIZER:
        _check_model_dir("tokenizer.path", t, "tokenizer")


def _check_data(c) -> None:
    """Training and eval sources, formats, the synthetic task."""
    d = c.data
    for field, sources in (("data.train", [s.strip() for s in d.train.split(",")]),
                           ("data.eval", [s.strip() for s in d.eval.split(",")])):
        reserved = (SYNTHETIC, HELDOUT) if field == "data.eval" else (SYNTHETIC,)
        _check(field, len(set(sources)) == len(sources), f"lists a source twice in {getattr(d, field.split('.')[1])!r}")
        for s in sources:
            _check(field, bool(s), f"has an empty source in {getattr(d, field.split('.')[1])!r}")
            _check_source(field, s, reserved)
    _non_negative("data.holdout", d.holdout)
    train = [s.strip() for s in d.train.split(",")]
    _check("data.eval", HELDOUT not in [s.strip() for s in d.eval.split(",")] or (d.holdout and train != [SYNTHETIC]),
           "lists 'heldout', but data.holdout is 0 or data.train has no file source to hold problems out of")
    _check("data.instruction", instruction_error(d.instruction) is None, str(instruction_error(d.instruction)))
    _one_of("data.format", d.format, ["auto", *sorted(FORMATS)])
    _check("data.train_split", bool(d.train_split), "is empty")
    _non_negative("data.eval_max_problems", d.eval_max_problems)
    _positive("data.max_prompt_tokens", d.max_prompt_tokens)
    _one_of("data.system_prompt", d.system_prompt, ("keep", "none", "eurus2"))
    _check("data.instruction", instruction_error(d.instruction) is None, str(instruction_error(d.instruction)))
    s = d.synthetic
    _one_of("data.synthetic.task", s.task, SYNTHETIC_TASKS)
    _positive("data.synthetic.num_train", s.num_train)
    _positive("data.synthetic.num_eval", s.num_eval)
    _non_negative("data.synthetic.eval_seed", s.eval_seed)
    _one_of("data.synthetic.difficulty", s.difficulty, sorted(DIFFICULTY))
    for f in ("min_steps", "max_steps", "max_start", "max_operand", "max_factor"):
        _non_negative(f"data.synthetic.{f}", s[f])
    if s.task == "chains":
        lengths = task_kwargs(s)
        lo, hi = lengths["min_length"], lengths["max_length"]
    else:
        lo = s.min_steps or DIFFICULTY[s.difficulty]["min_steps"]
        hi = s.max_steps or DIFFICULTY[s.difficulty]["max_steps"]
    _check("data.synthetic.max_steps", lo <= hi, f"{hi} < data.synthetic.min_steps ({lo})")
    _check("data.synthetic.max_value", s.max_value >= (s.max_start or DIFFICULTY[s.difficulty]["max_start"]),
          f"{s.max_value} is below the largest start value")


def _check_rollout(c) -> None:
    """Sampling settings (and that prompt + response fit the positions)."""
    m, d = c.model, c.data
    r = c.rollout
    _check("rollout.n", r.n >= 2, f"must be >= 2 (leave-one-out baselines need two samples), got {r.n}")
    _positive("rollout.temperature", r.temperature)
    _check("rollout.top_p", 0 < r.top_p <= 1, f"must be in (0, 1], got {r.top_p}")
    _non_negative("rollout.top_k", r.top_k)
    _positive("rollout.max_new_tokens", r.max_new_tokens)
    _check("rollout.oversample", r.oversample >= 1.0, f"must be >= 1.0, got {r.oversample}")
    _non_negative("rollout.max_refill", r.max_refill)
    _check("rollout.decode_slots", isinstance(r.decode_slots, int) and r.decode_slots >= 0,
          f"must be a whole number of slots >= 0 (0: one per response), got {r.decode_slots!r}")
    _non_negative("rollout.eval_temperature", r.eval_temperature)
    _non_negative("rollout.eval_max_new_tokens", r.eval_max_new_tokens)
    _positive("rollout.eval_batch", r.eval_batch)
    _check("data.max_prompt_tokens", d.max_prompt_tokens + max(r.max_new_tokens, r.eval_max_new_tokens) <= m.max_position_embeddings
          or m.path != RANDOM_MODEL,
          f"{d.max_prompt_tokens} + rollout.max_new_tokens exceeds model.max_position_embeddings ({m.max_position_embeddings})")


def _check_algo(c) -> None:
    """PRIME's algorithm settings."""
    a = c.algo
    from prime_jax.algo import (ADVANTAGE_ESTIMATORS, GROUP_SCORE_LOSS_TYPES, PRM_LOSS_TYPES,  # jax-only; cheap
                                uses_process_rewards)

    _one_of("algo.estimator", a.estimator, sorted(ADVANTAGE_ESTIMATORS))
    _positive("algo.beta", a.beta)
    _check("algo.clip_eps", 0 < a.clip_eps < 1, f"must be in (0, 1), got {a.clip_eps}")
    _non_negative("algo.process_coef", a.process_coef)
    _non_negative("algo.outcome_coef", a.outcome_coef)
    _check("algo.filter_low", 0 <= a.filter_low <= 1, f"must be in [0, 1], got {a.filter_low}")
    _check("algo.filter_high", a.filter_low <= a.filter_high <= 1,
          f"must be in [algo.filter_low, 1] = [{a.filter_low}, 1], got {a.filter_high}")
    _one_of("algo.agg", a.agg, AGGREGATIONS)
    _one_of("algo.prm_update", a.prm_update, PRM_UPDATE_MODES)
    _one_of("algo.prm_loss", a.prm_loss, PRM_LOSS_TYPES)
    _one_of("algo.prm_ref", a.prm_ref, ("freeze", "policy"))
    _one_of("algo.process_source", a.process_source, PROCESS_SOURCES)
    _check("algo.process_source", a.process_source == "prm" or uses_process_rewards(a.estimator),
           f"{a.process_source!r} gives process rewards, which only a prime_* estimator uses, got algo.estimator "
           f"{a.estimator!r}")
    _check("algo.process_source", a.process_source not in ORACLE_SOURCES or c.data.train.strip() == SYNTHETIC,
           "oracle process rewards need the synthetic task's demonstrations (data.train 'synthetic'), got data.train "
           f"{c.data.train!r}")
    _check("algo.process_source", a.process_source not in SFT_LOGPROB_SOURCES or a.prm_ref == "freeze",
           f"{a.process_source} adds the frozen start (SFT) model's log-probs, so algo.prm_ref must be 'freeze', got "
           f"{a.prm_ref!r}")
    _check("algo.process_source", a.process_source in PRM_TRAINING_SOURCES or a.prm_warmup_steps == 0,
           f"{a.process_source!r} trains no PRM, so algo.prm_warmup_steps must be 0, got {a.prm_warmup_steps}")
    _non_negative("algo.prm_warmup_steps", a.prm_warmup_steps)
    _check("algo.prm_warmup_steps",
           a.prm_warmup_steps == 0 or (uses_process_rewards(a.estimator) and a.prm_update != "none"),
           f"{a.prm_warmup_steps} warm-up steps train only the PRM, but algo.estimator={a.estimator!r} / "
           f"algo.prm_update={a.prm_update!r} trains no PRM: set it to 0")
    _check("algo.prm_warmup_steps", a.prm_warmup_steps == 0 or a.prm_warmup_steps < c.total_steps,
           f"must be below total_steps ({c.total_steps}) so that the policy trains at all, got {a.prm_warmup_steps}")
    trains_prm = uses_process_rewards(a.estimator) and a.process_source in PRM_TRAINING_SOURCES
    _check("algo.prm_update", not (trains_prm and a.prm_update == "none" and a.prm_ref == "freeze"),
           "'none' with algo.prm_ref 'freeze' leaves the PRM equal to its reference, so q = log π_φ - log π_ref is 0 "
           + ("and the policy gets the SFT log-probs alone (algo.process_source 'ref_logprob' under another name)"
              if a.process_source == "prm_logprob" else "(outcome-only under another name: algo.estimator=outcome_rloo)")
           + "; train the PRM (after | before | reverse) or set algo.prm_ref 'policy'")
    _check("algo.prm_update", not (trains_prm and a.prm_loss in GROUP_SCORE_LOSS_TYPES and a.prm_update != "reverse"),
           f"algo.prm_loss {a.prm_loss!r} reads group scores from a scoring pass before the PRM's updates, which only "
           f"'reverse' runs (as in veRL's recipe/prime), got {a.prm_update!r}")
    _non_negative("algo.process_norm_floor", a.process_norm_floor)
    _one_of("algo.process_ramp", a.process_ramp, ("none", "ranking"))
    _check("algo.process_ramp", a.process_ramp == "none" or a.process_source in PRM_TRAINING_SOURCES,
           f"'ranking' weighs process rewards by the trained PRM's ranking (prm/dpo_accuracy), which algo.process_source "
           f"{a.process_source!r} has none of: its weight would stay 0; set algo.process_ramp 'none'")
    _check("algo.process_ramp_high", 0 <= a.process_ramp_low < a.process_ramp_high <= 1,
          f"need 0 <= algo.process_ramp_low < algo.process_ramp_high <= 1, got {a.process_ramp_low}, {a.process_ramp_high}")
    _check("algo.process_ramp_decay", 0 <= a.process_ramp_decay < 1, f"must be in [0, 1), got {a.process_ramp_decay}")


def _check_optimizers(c) -> None:
    """policy_optim and prm_optim."""
    for o in ("policy_optim", "prm_optim"):
        opt = c[o]
        _non_negative(f"{o}.lr", opt.lr)
        _non_negative(f"{o}.weight_decay", opt.weight_decay)
        _non_negative(f"{o}.clip_norm", opt.clip_norm)
        _check(f"{o}.b1", 0 <= opt.b1 < 1, f"must be in [0, 1), got {opt.b1}")
        _check(f"{o}.b2", 0 <= opt.b2 < 1, f"must be in [0, 1), got {opt.b2}")
        _positive(f"{o}.eps", opt.eps)
        _non_negative(f"{o}.warmup_steps", opt.warmup_steps)


def _check_batch(c) -> None:
    """Batch sizes: whole groups of rollout.n, dividing the step's rows."""
    r = c.rollout
    b = c.batch
    _positive("batch.prompts_per_step", b.prompts_per_step)
    _positive("batch.micro_batches", b.micro_batches)
    rows = b.prompts_per_step * r.n
    for f in ("mini_batch", "prm_mini_batch", "score_batch"):
        size = b[f]
        _positive(f"batch.{f}", size)
        _check(f"batch.{f}", size % r.n == 0, f"{size} is not divisible by rollout.n ({r.n}): a prompt's samples must stay together")
        if f != "score_batch":
            _check(f"batch.{f}", rows % size == 0,
                  f"{size} does not divide the batch of batch.prompts_per_step * rollout.n = {rows} responses")
            _check(f"batch.{f}", size % b.micro_batches == 0 and (size // b.micro_batches) % r.n == 0,
                  f"{size} responses cannot be cut into batch.micro_batches = {b.micro_batches} micro-batches of whole groups of {r.n}")


def _check_mesh(c, num_devices: int | None) -> None:
    """The mesh against the devices (rows split evenly over the data axes) and the distributed section."""
    b = c.batch
    if c.mesh.preset:
        from prime_jax.parallel import MESH_PRESETS  # see the note at the top

        key = c.mesh.preset.strip().lower().replace("\u00d7", "x")
        _one_of("mesh.preset", key, sorted(MESH_PRESETS))
        preset = MESH_PRESETS[key]
        sizes = {"data": preset["data"], "fsdp": preset["fsdp"], "tensor": preset["tensor"]}
    else:
        sizes = {"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor}
    for axis, size in sizes.items():
        _check(f"mesh.{axis}", size == -1 or size >= 1, f"must be a positive size or -1, got {size}")
    _check("mesh", sum(v == -1 for v in sizes.values()) <= 1, f"at most one axis may be -1, got {sizes}")
    if num_devices is None:
        import jax  # see the note at the top

        num_devices = jax.device_count()
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        _check("mesh", num_devices % fixed == 0,
              f"the fixed axes {sizes} (product {fixed}) do not divide the {num_devices} devices")
    else:
        _check("mesh", fixed == num_devices,
              f"data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} = {fixed} "
              f"does not match the {num_devices} devices")
    resolved = dict(sizes)
    for axis, size in sizes.items():
        if size == -1:
            resolved[axis] = num_devices // fixed
    data_parallel = resolved["data"] * resolved["fsdp"]  # rows of every batch are split this many ways
    for f in ("mini_batch", "prm_mini_batch"):
        per_micro = b[f] // b.micro_batches
        _check(f"batch.{f}", per_micro % data_parallel == 0,
              f"{b[f]} / batch.micro_batches = {per_micro} rows per micro-batch is not divisible by the "
              f"data-parallel size mesh.data*mesh.fsdp = {data_parallel}")
    _check("batch.score_batch", b.score_batch % data_parallel == 0,
          f"{b.score_batch} is not divisible by the data-parallel size mesh.data*mesh.fsdp = {data_parallel}")
    _one_of("distributed.mode", c.distributed.mode, ("auto", "on", "off"))
    _check("distributed.local_device_ids", bool(re.fullmatch(r"(\d+(,\d+)*)?", c.distributed.local_device_ids.replace(" ", ""))),
          f"must be a comma list of device ids, got {c.distributed.local_device_ids!r}")
    _non_negative("distributed.num_processes", c.distributed.num_processes)
    _check("distributed.process_id", c.distributed.process_id >= -1, f"must be >= -1, got {c.distributed.process_id}")
    _positive("distributed.initialization_timeout", c.distributed.initialization_timeout)
    _non_negative("distributed.heartbeat_timeout", c.distributed.heartbeat_timeout)


def _check_sft(c) -> None:
    """The SFT stage and the debug section."""
    _non_negative("sft.steps", c.sft.steps)
    _positive("sft.lr", c.sft.lr)
    _non_negative("sft.weight_decay", c.sft.weight_decay)
    _positive("sft.batch", c.sft.batch)
    _non_negative("sft.warmup_steps", c.sft.warmup_steps)
    _non_negative("sft.clip_norm", c.sft.clip_norm)
    _non_negative("sft.checkpoint_every", c.sft.checkpoint_every)
    _positive("sft.num_examples", c.sft.num_examples)
    sources = [s.strip() for s in c.sft.data.split(",")]
    _check("sft.data", all(sources) and len(set(sources)) == len(sources),
           f"has an empty or repeated source in {c.sft.data!r}")
    if c.sft.steps and not c.sft.reference_dir:
        for s in sources:
            _check_source("sft.data", s, (SYNTHETIC,))
    if c.sft.reference_dir:
        from prime_jax.train.checkpoint import params_saved  # orbax: imported only when a folder is named

        _check("sft.reference_dir", params_saved(Path(c.sft.reference_dir).expanduser()),
               f"{c.sft.reference_dir!r} holds no saved reference (an earlier run's WORKDIR/reference, e.g. from "
               "--sft_only)")
    _check("sft.flawed_steps", 0 <= c.sft.flawed_steps <= 1, f"must be in [0, 1], got {c.sft.flawed_steps}")
    _check("sft.flaw_prob", 0 <= c.sft.flaw_prob <= 1, f"must be in [0, 1], got {c.sft.flaw_prob}")
    _one_of("sft.flaw_direction", c.sft.flaw_direction, ("either", "up"))
    _non_negative("sft.flaw_seed", c.sft.flaw_seed)
    if c.sft.flawed_steps:
        _check("sft.flawed_steps", c.sft.data.strip() == SYNTHETIC and c.data.synthetic.task == "chains",
               "needs the synthetic chains demonstrations (sft.data 'synthetic', data.synthetic.task 'chains'), "
               f"got sft.data {c.sft.data!r}, task {c.data.synthetic.task!r}")
    _non_negative("debug.inject_nan_step", c.debug.inject_nan_step)


def _check_outputs(c) -> None:
    """checkpoint, reward and logging."""
    _positive("checkpoint.keep", c.checkpoint.keep)
    _positive("reward.workers", c.reward.workers)
    _positive("reward.timeout_s", c.reward.timeout_s)
    _check("logging.wandb_project", bool(c.logging.wandb_project) or not c.logging.wandb, "is empty")
    _non_negative("logging.html_samples", c.logging.html_samples)
    _non_negative("logging.html_per_page", c.logging.html_per_page)



def field_names() -> list[str]:
    """Every field of the schema, dotted (e.g. ``algo.beta``)."""
    return sorted(_flatten(base_config()))


def check_all(config, **kwargs) -> str | None:
    """None if valid, else the one-line error message (for scripts that must not raise)."""
    try:
        validate(config, **kwargs)
    except ConfigError as e:
        return str(e)
    return None

