"""Memory plan: will a PRIME run fit on a slice? Answered before renting it, without weights.

    python -m prime_jax.plan --config=configs/qwen7b.py:v4-64 --devices=32
    python -m prime_jax.plan --config=configs/qwen7b.py --devices=64 --config.batch.micro_batches=4

On a fake N-device CPU mesh (`--xla_force_host_platform_device_count=N`, set before jax starts)
this lowers and compiles ahead of time, from abstract shapes only (`nnx.eval_shape`,
`jax.ShapeDtypeStruct`; nothing is allocated), the five programs of one PRIME iteration exactly
as training builds them:

  sample/prefill  `Sampler`'s prefill of the rollout prompt batch (KV cache out)
  sample/decode   `Sampler`'s while_loop decode over the sharded KV cache
  score           `make_train_steps(...).score`: old/PRM/reference log-probs of a score batch
  prm update      `make_train_steps(...).prm`: one PRM mini-batch (grad accumulation + AdamW)
  policy update   `make_train_steps(...).policy`: one PPO mini-batch

and prints, per device, what each phase holds at its peak: params and optimizer state of every
resident model (policy, PRM, frozen reference; exact, from their shardings), gradients, the KV
cache, and activations/temporaries (the rest of XLA's `compiled.memory_analysis()`: argument +
temp + non-aliased output bytes), against the HBM of each target (v4 32 GiB, v5e 16 GiB, v5p
95 GiB, H100 80 GiB). A phase fits a target when its peak is at most `--headroom` (90%) of the
HBM. What does not fit gets a suggestion (micro-batches, generate chunks, mesh), estimated by
scaling the activation part linearly with the rows per device; rerun the plan to confirm it.

Method and caveats (docs/scale_out.md has the details):
* The decoder layers are a `lax.scan`, so compile time does not grow with depth: the full
  28-layer 7B programs compile in 3-50 s each on one CPU core (1-2 minutes for the plan).
* XLA:CPU is not XLA:TPU/GPU. It keeps bf16 matmul temporaries in float32 and fuses
  differently, so activation numbers are an estimate (expected on the high side for TPU); the
  params/optimizer/gradient/KV-cache columns are exact. `check_fits(config, jax.devices())` on
  the real slice compiles with the real backend and the real HBM limit.
* Activations are planned as the code shards them: the model constrains each decoder layer's
  hidden states to the `batch` rule (`models/qwen2.py`), and the sampler and train steps trace
  under their mesh (`parallel.under_mesh`), exactly as in the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

GIB = float(1 << 30)
PROGRAMS = ("prefill", "decode", "score", "prm", "policy")
PHASE_TITLES = {
    "prefill": "sample/prefill",
    "decode": "sample/decode",
    "score": "score (3 models)",
    "prm": "PRM update",
    "policy": "policy update",
}
# The targets' HBM per device (GiB): TPU v4, v5e, v5p chips and an H100 80GB GPU.
TARGETS = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "h100": 80.0}
TARGET_TITLES = {"v4": "v4 32G", "v5e": "v5e 16G", "v5p": "v5p 95G", "h100": "H100 80G"}
DEFAULT_HEADROOM = 0.9
SCORE_MICRO_BATCHES = 1  # train/loop.py scores each batch.score_batch chunk in one pass


class PlanDoesNotFit(RuntimeError):
    """Raised by `check_fits`; `str(error)` is the formatted plan, `.report` the PlanReport."""

    def __init__(self, report: "PlanReport", target: str):
        self.report, self.target = report, target
        super().__init__(f"the run does not fit {target} ({report.targets[target]:.1f} GiB/device "
                         f"x {report.headroom:.0%} headroom):\n{report.format()}")


@dataclasses.dataclass
class Phase:
    """One program's per-device peak, split into components (bytes)."""

    name: str
    detail: str
    params: float
    opt_state: float
    grads: float
    kv_cache: float
    activations: float
    peak: float
    compiled: dict  # raw memory_analysis numbers (bytes) and compile seconds
    rows_per_device: float = 0.0


@dataclasses.dataclass
class PlanReport:
    title: str
    devices: int
    platform: str
    mesh: dict
    model_params: int
    resident: dict  # per-device bytes of each resident state (policy_params, ...)
    phases: list
    targets: dict  # name -> HBM GiB per device
    headroom: float
    suggestions: dict = dataclasses.field(default_factory=dict)  # target -> [str]
    notes: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    primary: str = ""  # the target of config.mesh.preset (marked *, the only one given suggestions)

    # -------------------------------------------------------------- queries
    def peak(self) -> float:
        return max(p.peak for p in self.phases)

    def fits(self, target: str) -> bool:
        budget = self.targets[target] * GIB * self.headroom
        return all(p.peak <= budget for p in self.phases)

    def failing(self, target: str) -> list:
        budget = self.targets[target] * GIB * self.headroom
        return [p for p in self.phases if p.peak > budget]

    # -------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PlanReport":
        d = dict(d)
        d["phases"] = [Phase(**p) for p in d["phases"]]
        return cls(**d)

    # -------------------------------------------------------------- text
    def format(self) -> str:
        g = lambda b: f"{b / GIB:7.2f}"
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"memory plan: {self.title}",
            f"  {self.model_params / 1e9:.2f}B params/model; mesh {mesh} on {self.devices} {self.platform} devices; "
            f"fits = peak <= {self.headroom:.0%} of HBM",
            f"  resident per device (GiB): " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.resident.items()),
        ]
        targets = list(self.targets)
        title = lambda t: TARGET_TITLES.get(t, t) + ("*" if t == self.primary else "")
        head = (f"  {'phase (per device, GiB)':<24}{'params':>8}{'opt':>8}{'grads':>8}{'act+tmp':>8}{'KV':>8}"
                f"{'peak':>8} | " + " ".join(f"{title(t):>9}" for t in targets))
        lines += [head, "  " + "-" * (len(head) - 2)]
        for p in self.phases:
            marks = []
            for t in targets:
                hbm = self.targets[t] * GIB
                marks.append("ok" if p.peak <= hbm * self.headroom else ("tight" if p.peak <= hbm else "NO"))
            lines.append(f"  {PHASE_TITLES.get(p.name, p.name):<24}{g(p.params)} {g(p.opt_state)} {g(p.grads)} "
                         f"{g(p.activations)} {g(p.kv_cache)} {g(p.peak)} | " + " ".join(f"{m:>9}" for m in marks))
        lines.append(f"  {'whole iteration (max)':<24}{'':>40}{g(self.peak())} | " + " ".join(
            f"{('fits' if self.fits(t) else 'NO'):>9}" for t in targets))
        for p in self.phases:
            c = p.compiled
            lines.append(f"    {p.name:<8} {p.detail}; XLA: args {c['argument'] / GIB:.2f} temp {c['temp'] / GIB:.2f} "
                         f"out {c['output'] / GIB:.2f} alias {c['alias'] / GIB:.2f} GiB; compiled in {c['seconds']:.0f}s")
        if self.primary:
            verdict = "fits" if self.fits(self.primary) else "does NOT fit"
            lines.append(f"  => {verdict} the preset's target {TARGET_TITLES.get(self.primary, self.primary)} (*)")
        for t, items in self.suggestions.items():
            for s in items:
                lines.append(f"  suggestion for {TARGET_TITLES.get(t, t)}: {s}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        lines.append(f"  ({self.seconds:.0f}s)")
        return "\n".join(lines)


# =============================================================================================
# building the programs
# =============================================================================================
def model_config(config):
    """The `Qwen2Config` of a run: a local checkpoint's config.json if there is one, else the
    shape fields of `config.model` (hub ids are not downloaded: the plan needs no weights)."""
    from prime_jax.models import Qwen2Config

    m = config.model
    run = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    local = Path(os.path.expanduser(m.path)) / "config.json" if m.path and m.path != "random" else None
    if local is not None and local.is_file():
        return Qwen2Config.from_hf_dict(json.loads(local.read_text()), **run)
    if not m.vocab_size:
        raise ValueError("plan: model.vocab_size is 0 (the tokenizer's size); set it for the plan")
    return Qwen2Config(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        head_dim=m.head_dim or None, rope_theta=float(m.rope_theta), max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=bool(m.tie_word_embeddings), **run,
    )


def _optimizer(o):
    from prime_jax.train import make_optimizer

    return make_optimizer(o.lr, weight_decay=o.weight_decay, clip_norm=o.clip_norm or None, b1=o.b1, b2=o.b2,
                          eps=o.eps)


def _shard_bytes(tree) -> float:
    """Per-device bytes of a pytree of ShapeDtypeStructs carrying shardings (max over devices)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return float(total)


def _with_shardings(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _memory(compiled, seconds: float) -> dict:
    ma = compiled.memory_analysis()
    get = lambda name: float(getattr(ma, name, 0) or 0)
    return dict(argument=get("argument_size_in_bytes"), output=get("output_size_in_bytes"),
                alias=get("alias_size_in_bytes"), temp=get("temp_size_in_bytes"),
                code=get("generated_code_size_in_bytes"), seconds=seconds)


def _compile(lowerable, args, log) -> dict:
    return _measure(lambda: lowerable.lower(*args).compile(), log)


def _measure(build, log) -> dict:
    """Memory analysis (and compile seconds) of the executable that `build()` compiles."""
    start = time.perf_counter()
    compiled = build()
    seconds = time.perf_counter() - start
    mem = _memory(compiled, seconds)
    log(f"  compiled in {seconds:.1f}s: args {mem['argument'] / GIB:.2f} temp {mem['temp'] / GIB:.2f} "
        f"out {mem['output'] / GIB:.2f} alias {mem['alias'] / GIB:.2f} GiB")
    return mem


def plan_memory(config, devices: Any = None, *, targets: dict | None = None, headroom: float = DEFAULT_HEADROOM,
                programs: Sequence[str] = PROGRAMS, sample_prompts: int = 0,
                score_micro_batches: int = SCORE_MICRO_BATCHES, title: str = "", verbose: bool = False
                ) -> PlanReport:
    """Compiles the iteration's programs for `config` on `devices` and returns the PlanReport.

    devices: a list of jax devices (compile for them: the real backend on a slice), an int N (a
    fake N-device CPU mesh; run in a subprocess unless this process already has exactly N CPU
    devices), or None (all devices). targets: name -> HBM GiB (default: the four TARGETS, or
    the real devices' memory limit when compiling for TPU/GPU). sample_prompts: prompts per
    generate call (0: ceil(rollout.oversample * batch.prompts_per_step)). score_micro_batches:
    micro-batches of one scoring call of `batch.score_batch` rows (the loop uses 1).
    """
    import jax

    unknown = set(programs) - set(PROGRAMS)
    if unknown:
        raise ValueError(f"unknown programs {sorted(unknown)}; choose from {PROGRAMS}")
    if devices is None:
        devices = jax.devices()
    if isinstance(devices, int):
        local = jax.devices()
        if local[0].platform == "cpu" and len(local) == devices:
            devices = local
        else:
            return _plan_in_subprocess(config, devices, targets=targets, headroom=headroom, programs=programs,
                                       sample_prompts=sample_prompts, score_micro_batches=score_micro_batches,
                                       title=title, verbose=verbose)
    devices = list(devices)
    platform = devices[0].platform
    if targets is None:
        targets = dict(TARGETS)
        if platform != "cpu":
            limit = (devices[0].memory_stats() or {}).get("bytes_limit")
            if limit:
                targets = {devices[0].device_kind: limit / GIB}
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if verbose else (lambda s: None)
    start = time.perf_counter()
    report = _build_and_compile(config, devices, targets, headroom, programs, sample_prompts, score_micro_batches,
                                title, log)
    report.seconds = time.perf_counter() - start
    return report


def _build_and_compile(config, devices, targets, headroom, programs, sample_prompts, score_micro_batches, title,
                       log) -> PlanReport:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from prime_jax.models import Qwen2ForCausalLM
    from prime_jax.parallel import mesh_from_config
    from prime_jax.train import make_train_steps
    from prime_jax.train.state import abstract_train_state, split_params

    c = config
    mesh = mesh_from_config(c, devices)
    mcfg = model_config(c)
    n = c.rollout.n
    P, R = c.data.max_prompt_tokens, c.rollout.max_new_tokens
    uses_prm = c.algo.estimator != "outcome_rloo"
    updates_prm = uses_prm and c.algo.prm_update != "none"
    dp = mesh.shape["data"] * mesh.shape["fsdp"]

    abstract_model = nnx.eval_shape(lambda: Qwen2ForCausalLM(mcfg, rngs=nnx.Rngs(0)))
    _, params = split_params(abstract_model)
    policy_opt, prm_opt = _optimizer(c.policy_optim), _optimizer(c.prm_optim)
    steps = make_train_steps(
        abstract_model, policy_opt, prm_opt if updates_prm else None, mesh, n=n,
        micro_batches=c.batch.micro_batches, score_micro_batches=score_micro_batches, beta=c.algo.beta,
        clip_eps=c.algo.clip_eps,
        temperature=c.rollout.temperature, chunk_size=c.model.logprob_chunk,
        prm_loss_type=c.algo.prm_loss, agg=c.algo.agg)
    params_sds = _with_shardings(params, steps.param_shardings)
    policy_state = _with_shardings(abstract_train_state(params, policy_opt), steps.policy_state_shardings)
    prm_state = _with_shardings(abstract_train_state(params, prm_opt), steps.prm_state_shardings) if updates_prm else None

    params_b = _shard_bytes(params_sds)
    policy_opt_b = _shard_bytes(policy_state.opt_state) + _shard_bytes((policy_state.step, policy_state.nan_skips))
    resident = {"policy_params": params_b, "policy_opt": policy_opt_b}
    if uses_prm:
        resident["prm_params"] = params_b
        if updates_prm:
            resident["prm_opt"] = _shard_bytes(prm_state.opt_state) + _shard_bytes((prm_state.step, prm_state.nan_skips))
        resident["ref_params"] = params_b
    total_params = sum(v for k, v in resident.items() if k.endswith("_params"))
    total_opt = sum(v for k, v in resident.items() if k.endswith("_opt"))
    resident_total = total_params + total_opt
    grads_b = _shard_bytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding),
                                        params_sds))

    rows_sh = steps.batch_sharding
    S = jax.ShapeDtypeStruct

    def batch(rows: int, keys: Sequence[str]):
        shapes = {
            "prompt_ids": ((rows, P), jnp.int32), "prompt_mask": ((rows, P), jnp.int32),
            "response_ids": ((rows, R), jnp.int32), "response_mask": ((rows, R), jnp.int32),
            "old_logprobs": ((rows, R), jnp.float32), "advantages": ((rows, R), jnp.float32),
            "ref_logprobs": ((rows, R), jnp.float32), "outcome": ((rows,), jnp.float32),
        }
        return {k: S(shapes[k][0], shapes[k][1], sharding=rows_sh) for k in keys}

    from prime_jax.train.steps import POLICY_KEYS, PRM_KEYS, SCORE_KEYS

    phases: list[Phase] = []
    notes: list[str] = []

    def add(name, detail, mem, resident_in_args, grads=0.0, kv=0.0, rows_per_device=0.0):
        peak = (resident_total - resident_in_args) + mem["argument"] + mem["temp"] + mem["output"] - mem["alias"]
        act = peak - total_params - total_opt - grads - kv
        phases.append(Phase(name, detail, total_params, total_opt, grads, kv, act, peak, mem, rows_per_device))

    k = c.batch.micro_batches
    # No mesh context here: the sampler and the train steps trace under their mesh themselves
    # (`parallel.under_mesh`), so the model's activation constraints apply exactly as in the run.
    if "prefill" in programs or "decode" in programs:
        _sampler_phases(c, mcfg, abstract_model, mesh, sample_prompts, programs, add, log, notes,
                        resident_params=params_b, dp=dp)
    if "score" in programs:
        rows, ks = c.batch.score_batch, score_micro_batches
        log(f"score: {rows} rows x {P}+{R} tokens, {ks} micro-batches")
        args = (params_sds, params_sds if uses_prm else None, params_sds if uses_prm else None,
                batch(rows, SCORE_KEYS))
        mem = _compile(jax.jit(steps.score), args, log)
        add("score", f"{rows} responses x {P}+{R} tokens in {ks} micro-batches ({rows / ks / dp:g} rows/device)",
            mem, total_params, rows_per_device=rows / ks / dp)
    if "prm" in programs and updates_prm:
        rows = c.batch.prm_mini_batch
        log(f"prm: {rows} rows, {k} micro-batches")
        mem = _compile(steps.prm, (prm_state, batch(rows, PRM_KEYS)), log)
        add("prm", f"mini-batch {rows} in {k} micro-batches ({rows / k / dp:g} rows/device)", mem,
            resident["prm_params"] + resident["prm_opt"], grads=grads_b, rows_per_device=rows / k / dp)
    if "policy" in programs:
        rows = c.batch.mini_batch
        log(f"policy: {rows} rows, {k} micro-batches")
        mem = _compile(steps.policy, (policy_state, batch(rows, POLICY_KEYS)), log)
        add("policy", f"mini-batch {rows} in {k} micro-batches ({rows / k / dp:g} rows/device)", mem,
            resident["policy_params"] + resident["policy_opt"], grads=grads_b, rows_per_device=rows / k / dp)

    for field in ("mini_batch", "prm_mini_batch", "score_batch"):
        rows = c.batch[field] / (score_micro_batches if field == "score_batch" else k)
        if rows % dp:
            notes.append(f"batch.{field}/micro_batches = {rows:g} rows is not a multiple of data*fsdp = {dp}: "
                         f"rows are not split evenly over the devices")
    report = PlanReport(
        title=title or c.get("name", "run"), devices=len(devices), platform=devices[0].platform,
        mesh={a: int(s) for a, s in mesh.shape.items()}, model_params=mcfg.num_params(), resident=resident,
        phases=phases, targets=dict(targets), headroom=headroom, notes=notes)
    preset = c.mesh.get("preset", "") if "mesh" in c else ""
    if preset:
        from prime_jax.parallel import mesh_preset

        accel = mesh_preset(preset)["accelerator"]
        report.primary = accel if accel in report.targets else ""
    report.suggestions = suggest(report, c, dp=dp)
    return report


class _SamplerPlanned(Exception):
    """Stops `Sampler.generate` once its programs are compiled (nothing is run)."""


@contextlib.contextmanager
def _abstract_device_put():
    """`jax.device_put` passes pytrees of ShapeDtypeStructs through (abstract state and key)."""
    import jax

    original = jax.device_put

    def device_put(x, *args, **kwargs):
        leaves = jax.tree.leaves(x)
        if leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves):
            return x
        return original(x, *args, **kwargs)

    jax.device_put = device_put
    try:
        yield
    finally:
        jax.device_put = original


def _sampler_phases(c, mcfg, abstract_model, mesh, sample_prompts, programs, add, log, notes, *,
                    resident_params, dp):
    """Compiles the `Sampler`'s own prefill and decode programs for one rollout generate call.

    A `Sampler` subclass runs the real `generate` on abstract weights: its `_compile` hook compiles
    each program through the sampler's own `_compile` (its jit, shardings, donation and mesh)
    with the arguments made abstract, records the memory analysis and returns a stand-in that
    yields abstract outputs; after the decode program it stops. So the plan follows the sampler's
    code, whatever its internals.
    """
    import jax
    import numpy as np
    from flax import nnx

    from prime_jax.parallel import state_shardings
    from prime_jax.sampling import sampler as sampling

    graphdef, state = nnx.split(abstract_model)
    state = _with_shardings(state, state_shardings(state, mesh))
    n, R, P = c.rollout.n, c.rollout.max_new_tokens, c.data.max_prompt_tokens
    prompts = sample_prompts or math.ceil(c.rollout.oversample * c.batch.prompts_per_step)
    while prompts * n % dp:  # as train/loop.py rounds prompts_per_attempt
        prompts += 1
    records: dict = {}

    def abstract(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, (np.ndarray, np.generic, jax.Array)):
            return jax.ShapeDtypeStruct(np.shape(x), x.dtype)
        return x

    class PlanningSampler(sampling.Sampler):
        def _compile(self, fn, args, shardings, donate):
            outs = shardings[1] if shardings is not None else None
            args = jax.tree.map(abstract, args)
            name = getattr(fn, "__name__", "program")
            log(f"{name}: {detail}")
            # the sampler's own jit (traced under its mesh, with its shardings and donation)
            mem = _measure(lambda: super(PlanningSampler, self)._compile(fn, args, shardings, donate), log)
            records[name] = (mem, jax.eval_shape(fn, *args), outs)
            if "decode" in records:
                raise _SamplerPlanned()
            result = records[name][1]
            return lambda *call_args: result

    sampler = PlanningSampler(mesh, min_prompt_bucket=16, decode_slots=c.rollout.decode_slots or None)  # as train/loop.py
    G, P_bucket = sampler.buckets(prompts, P)
    rows = G * n
    detail = (f"{G} prompts (bucket of {prompts}) x n={n} = {rows} rows in {sampler.num_slots(rows)} decode slots, "
              f"cache {P_bucket}+{R} columns "
              f"({rows / dp:g} rows/device)")
    with _abstract_device_put():
        try:
            sampler.generate((graphdef, state), [[1] * P] * prompts, max_new_tokens=R, n=n,
                             temperature=c.rollout.temperature, top_p=c.rollout.top_p, top_k=c.rollout.top_k,
                             stop_token_ids=(151643, 151645), key=jax.ShapeDtypeStruct((2,), np.uint32))
        except _SamplerPlanned:
            pass
    if "prefill" not in records or "decode" not in records:
        raise RuntimeError(f"plan: the sampler compiled {sorted(records)}, expected prefill and decode")
    _, decode_state, decode_state_shardings = records["prefill"]  # prefill returns the decode state
    if decode_state_shardings is not None:
        decode_state = _with_shardings(decode_state, decode_state_shardings)
    # the slots' cache and the prefilled prompts they copy from
    kv_bytes = _shard_bytes((decode_state.cache, decode_state.prompt_k, decode_state.prompt_v))
    for name in ("prefill", "decode"):
        if name in programs:
            add(name, detail, records[name][0], resident_params, kv=kv_bytes, rows_per_device=rows / dp)


# =============================================================================================
# suggestions
# =============================================================================================
def suggest(report: PlanReport, config, *, dp: int) -> dict:
    """For each target that some phase does not fit: what to change (estimates; rerun to confirm)."""
    out: dict[str, list[str]] = {}
    c = config
    k = c.batch.micro_batches
    devices = report.devices
    tensor = report.mesh.get("tensor", 1)
    chosen = [report.primary] if report.primary else list(report.targets)
    for target in chosen:
        hbm = report.targets[target]
        budget = hbm * GIB * report.headroom
        items: list[str] = []
        state = (sum(report.resident.values()))
        if state > budget:
            per_device_total = state * (report.mesh.get("fsdp", 1) * tensor)  # state of one replica group
            need = 2 ** math.ceil(math.log2(per_device_total / (budget * 0.6)))
            items.append(f"params + optimizer states alone take {state / GIB:.1f} GiB/device: shard over more "
                         f"devices (data=1, fsdp=-1 on >= {need} devices) or use a bigger-HBM target")
            out[target] = items
            continue
        for p in report.failing(target):
            fixed = p.params + p.opt_state + p.grads
            if p.name in ("policy", "prm", "score"):
                per_row = p.activations / max(p.rows_per_device, 1e-9)
                rows_fit = (budget - fixed - p.kv_cache) / per_row if per_row > 0 else float("inf")
                field = {"policy": "mini_batch", "prm": "prm_mini_batch", "score": "score_batch"}[p.name]
                rows_total = c.batch[field]
                if rows_fit >= 1 and p.rows_per_device > 1:
                    rows_dev = 2 ** int(math.floor(math.log2(min(rows_fit, p.rows_per_device))))
                    est = f"est. peak {(fixed + p.kv_cache + per_row * rows_dev) / GIB:.1f} GiB"
                    if p.name == "score":
                        items.append(f"{PHASE_TITLES[p.name]}: batch.score_batch={rows_dev * dp} "
                                     f"({rows_dev} rows/device per scoring call; {est})")
                    else:
                        new_k = int(rows_total // (rows_dev * dp))
                        items.append(f"{PHASE_TITLES[p.name]}: batch.micro_batches={new_k} ({rows_dev} rows/device "
                                     f"per micro-batch; {est})")
                else:
                    items.append(f"{PHASE_TITLES[p.name]}: activations of {p.rows_per_device:g} row/device "
                                 f"({p.activations / GIB:.1f} GiB) exceed the {(budget - fixed) / GIB:.1f} GiB left: "
                                 f"use tensor parallelism (mesh.tensor=2 or 4 splits heads and MLP) or more devices")
            else:  # sampling: KV cache and prefill temporaries scale with the rows per generate call
                per_row = (p.kv_cache + p.activations) / max(p.rows_per_device, 1e-9)
                rows_fit = (budget - fixed) / per_row if per_row > 0 else float("inf")
                if rows_fit >= 1:
                    rows_dev = 2 ** int(math.floor(math.log2(rows_fit)))
                    prompts = rows_dev * dp // c.rollout.n
                    items.append(f"{PHASE_TITLES[p.name]}: at most {prompts} prompts per generate call fit "
                                 f"({rows_dev} rows/device; est. peak {(fixed + per_row * rows_dev) / GIB:.1f} GiB); "
                                 f"the loop samples ceil(rollout.oversample * batch.prompts_per_step) prompts per "
                                 f"call, padded to a power of two: lower rollout.oversample, sample in chunks, "
                                 f"or use more devices")
                else:
                    items.append(f"{PHASE_TITLES[p.name]}: not even one row/device fits next to the resident "
                                 f"state; use more devices")
        if items:
            out[target] = items
    return out


# =============================================================================================
# check_fits (for prime_jax.main) and the subprocess re-exec
# =============================================================================================
def check_fits(config, devices: Any = None, *, target: str | None = None, hbm_gib: float | None = None,
               headroom: float = DEFAULT_HEADROOM, verbose: bool = False) -> PlanReport:
    """Plans `config` on `devices` and raises PlanDoesNotFit if a phase exceeds the target's HBM.

    On a TPU/GPU slice call it with `jax.devices()`: the programs are compiled by the real backend
    and checked against the devices' own memory limit. With an int N (fake CPU mesh), the target is
    `target` (a TARGETS name), else `hbm_gib`, else the accelerator of `config.mesh.preset`.
    Returns the PlanReport when everything fits.
    """
    targets = None
    if hbm_gib is not None:
        target = target or "hbm"
        targets = {target: float(hbm_gib)}
    elif target is not None:
        targets = {target: TARGETS[target]}
    elif isinstance(devices, int):
        preset = config.mesh.get("preset", "") if "mesh" in config else ""
        if not preset:
            raise ValueError("check_fits with a device count needs target=, hbm_gib= or config.mesh.preset")
        from prime_jax.parallel import mesh_preset

        accel = mesh_preset(preset)["accelerator"]
        targets = {accel: TARGETS[accel]}
    report = plan_memory(config, devices, targets=targets, headroom=headroom, verbose=verbose)
    for name in report.targets:
        if not report.fits(name):
            raise PlanDoesNotFit(report, name)
    return report


def _config_to_json(config) -> str:
    return config.to_json() if hasattr(config, "to_json") else json.dumps(config)


def _plan_in_subprocess(config, devices: int, **kwargs) -> PlanReport:
    """Runs the plan in a fresh interpreter whose CPU backend has `devices` fake devices."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, out_path = Path(tmp) / "config.json", Path(tmp) / "plan.json"
        cfg_path.write_text(_config_to_json(config))
        cmd = [sys.executable, "-m", "prime_jax.plan", f"--config_json={cfg_path}", f"--devices={devices}",
               f"--json_out={out_path}", f"--headroom={kwargs['headroom']}",
               f"--programs={','.join(kwargs['programs'])}",
               f"--sample_prompts={kwargs['sample_prompts']}",
               f"--score_micro_batches={kwargs['score_micro_batches']}", "--quiet"]
        if kwargs.get("targets"):
            cmd.append("--targets=" + ",".join(f"{k}={v}" for k, v in kwargs["targets"].items()))
        if kwargs.get("title"):
            cmd.append(f"--title={kwargs['title']}")
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)
        env["JAX_PLATFORMS"] = "cpu"
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"plan subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return PlanReport.from_dict(json.loads(out_path.read_text()))


# =============================================================================================
# CLI
# =============================================================================================
def _parse_targets(text: str) -> dict:
    if not text:
        return dict(TARGETS)
    out = {}
    for item in text.split(","):
        item = item.strip()
        if "=" in item:
            name, gib = item.split("=", 1)
            out[name.strip()] = float(gib)
        else:
            out[item] = TARGETS[item]
    return out


def _set_fake_devices(n: int) -> None:
    """Must run before the first jax backend use: N fake CPU devices, CPU only."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_platforms", "cpu")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except Exception:  # older jax: the XLA flag does it
        pass


def rollout_estimate(config, devices: int, *, sample_prompts: int = 0, p50: float = 0, p90: float = 0,
                     accelerators: Sequence[str] = ("v4", "v5e", "v5p", "h100")) -> list[str]:
    """The plan's rollout-time estimate (`rollout_cost.rollout_table`) for `config` on `devices`:
    one sampling attempt as the loop makes it, response lengths lognormal with median `p50` and
    90th percentile `p90` (0: a sixth and a half of `rollout.max_new_tokens`)."""
    from prime_jax import rollout_cost
    from prime_jax.parallel import mesh_sizes_from_config

    c = config
    data, fsdp, tensor = mesh_sizes_from_config(c, devices)
    shards = data * fsdp
    prompts = sample_prompts or math.ceil(c.rollout.oversample * c.batch.prompts_per_step)
    bucket = -(-(1 << (prompts - 1).bit_length()) // shards) * shards  # the sampler's prompt bucket
    max_new = c.rollout.max_new_tokens
    mcfg = model_config(c)
    return rollout_cost.rollout_table(
        rollout_cost.ModelShape.from_qwen2(mcfg, bytes_per_value=mcfg.compute_dtype.itemsize),
        prompts=prompts, n=c.rollout.n, prompt_tokens=1 << (c.data.max_prompt_tokens - 1).bit_length(),
        max_new_tokens=max_new, shards=shards, tensor=tensor, slots=c.rollout.decode_slots,
        accelerators=list(accelerators), p50=p50 or max(1, max_new // 6), p90=p90 or max(1, max_new // 2),
        bucket_prompts=bucket)


def main(argv: Sequence[str] | None = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    FLAGS = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/qwen7b.py:v4-64", flag_values=FLAGS,
                                    lock_config=False)
    flags.DEFINE_string("config_json", "", "a config as JSON (used by check_fits' subprocess)", flag_values=FLAGS)
    flags.DEFINE_integer("devices", 0, "fake CPU devices to plan for (0: the preset's device count)", flag_values=FLAGS)
    flags.DEFINE_string("targets", "", "comma list of targets (v4,v5e,v5p,h100) or name=GiB; default all four",
                        flag_values=FLAGS)
    flags.DEFINE_float("headroom", DEFAULT_HEADROOM, "fraction of HBM a phase may use", flag_values=FLAGS)
    flags.DEFINE_string("programs", ",".join(PROGRAMS), "which programs to compile", flag_values=FLAGS)
    flags.DEFINE_integer("sample_prompts", 0, "prompts per generate call (0: oversample * prompts_per_step)",
                         flag_values=FLAGS)
    flags.DEFINE_integer("score_micro_batches", SCORE_MICRO_BATCHES, "micro-batches per scoring call (loop: 1)",
                         flag_values=FLAGS)
    flags.DEFINE_string("json_out", "", "also write the report as JSON here", flag_values=FLAGS)
    flags.DEFINE_string("title", "", "title of the table", flag_values=FLAGS)
    flags.DEFINE_bool("quiet", False, "no progress lines on stderr", flag_values=FLAGS)
    flags.DEFINE_bool("strict", False, "exit with status 1 when some target does not fit", flag_values=FLAGS)
    flags.DEFINE_float("response_p50", 0, "median response length of the rollout estimate "
                       "(0: rollout.max_new_tokens / 6)", flag_values=FLAGS)
    flags.DEFINE_float("response_p90", 0, "90th-percentile response length of the rollout estimate "
                       "(0: rollout.max_new_tokens / 2)", flag_values=FLAGS)
    argv = list(sys.argv if argv is None else argv)
    FLAGS(argv)

    if FLAGS.config_json:
        import ml_collections

        config = ml_collections.ConfigDict(json.loads(Path(FLAGS.config_json).read_text()))
        title = FLAGS.title
    elif FLAGS.config is not None:
        config = FLAGS.config
        title = FLAGS.title or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    else:
        print("plan: --config is required (e.g. --config=configs/qwen7b.py:v4-64)", file=sys.stderr)
        return 2
    devices = FLAGS.devices
    preset = config.mesh.get("preset", "") if "mesh" in config else ""
    if not devices:
        if not preset:
            print("plan: --devices is required when the config has no mesh.preset", file=sys.stderr)
            return 2
        from prime_jax.parallel import mesh_preset

        devices = mesh_preset(preset)["devices"]
    _set_fake_devices(devices)

    from prime_jax.config import ConfigError, validate

    try:
        validate(config, num_devices=devices)
    except ConfigError as e:
        msg = str(e)
        if not msg.startswith(("model.path", "tokenizer.path", "data.")):  # plan needs no weights or data
            print(f"plan: invalid config: {msg}", file=sys.stderr)
            return 2
    import jax

    report = plan_memory(config, jax.devices(), targets=_parse_targets(FLAGS.targets), headroom=FLAGS.headroom,
                         programs=[p for p in FLAGS.programs.split(",") if p],
                         sample_prompts=FLAGS.sample_prompts,
                         score_micro_batches=FLAGS.score_micro_batches, title=title, verbose=not FLAGS.quiet)
    print(report.format())
    if not FLAGS.config_json:  # check_fits' subprocess wants the memory report only
        print("\n".join(rollout_estimate(config, devices, sample_prompts=FLAGS.sample_prompts,
                                          p50=FLAGS.response_p50, p90=FLAGS.response_p90)))
    if FLAGS.json_out:
        Path(FLAGS.json_out).write_text(json.dumps(report.to_dict()))
    if FLAGS.strict and not all(report.fits(t) for t in report.targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
