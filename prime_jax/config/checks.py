"""The checks of every config field: :func:`validate` raises :class:`ConfigError` naming the first
bad field (see the package's docstring)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from prime_jax.config.schema import (AGGREGATIONS, DTYPES, MODEL_TYPES, ORACLE_SOURCES, PRM_TRAINING_SOURCES,
                                     PRM_UPDATE_MODES, PROCESS_SOURCES, RANDOM_MODEL, REMAT_POLICIES,
                                     SFT_LOGPROB_SOURCES, TINY_TOKENIZER, ConfigError, base_config, flatten)
from prime_jax.data import FORMATS, HELDOUT, DataError, check_source_name, instruction_error
from prime_jax.data.sets import SYNTHETIC
from prime_jax.data.synthetic import DIFFICULTY
from prime_jax.data.synthetic_tasks import SYNTHETIC_TASKS, task_kwargs

# The checks below that need jax, orbax or the model code (algo, parallel, models.packaged,
# train.checkpoint) import it inside the check: every config file and `--help` read this module,
# which must not load them.


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
    schema = flatten(base_config())
    values = flatten(config)
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



def check_all(config, **kwargs) -> str | None:
    """None if valid, else the one-line error message (for scripts that must not raise)."""
    try:
        validate(config, **kwargs)
    except ConfigError as e:
        return str(e)
    return None

