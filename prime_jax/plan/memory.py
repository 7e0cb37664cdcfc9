"""The memory plan's compiling half: the iteration's programs built by the run's `RunBuilder`, lowered
and compiled from abstract weights, and their per-device peaks (`plan_memory`), the check that
`prime_jax.main` runs before loading weights (`check_fits`), and the rollout-time estimate. See
`prime_jax.plan` for the method and its caveats."""

from __future__ import annotations

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

import jax
import jax.numpy as jnp
import numpy as np

from prime_jax.parallel import mesh_from_config, mesh_preset
from prime_jax.plan import rollout_cost
from prime_jax.plan.report import DEFAULT_HEADROOM, GIB, PROGRAMS, TARGETS, Phase, PlanDoesNotFit, PlanReport, suggest
from prime_jax.train.builder import RunBuilder, abstract_params


# =============================================================================================
# compiling the programs
# =============================================================================================
def _shard_bytes(tree) -> float:
    """Per-device bytes of a pytree of ShapeDtypeStructs carrying shardings (max over devices)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return float(total)


def _memory(compiled, seconds: float) -> dict:
    ma = compiled.memory_analysis()
    get = lambda name: float(getattr(ma, name, 0) or 0)
    return dict(argument=get("argument_size_in_bytes"), output=get("output_size_in_bytes"),
                alias=get("alias_size_in_bytes"), temp=get("temp_size_in_bytes"),
                code=get("generated_code_size_in_bytes"), seconds=seconds)


def _log_memory(mem: dict, log) -> dict:
    log(f"  compiled in {mem['seconds']:.1f}s: args {mem['argument'] / GIB:.2f} temp {mem['temp'] / GIB:.2f} "
        f"out {mem['output'] / GIB:.2f} alias {mem['alias'] / GIB:.2f} GiB")
    return mem


def _compile(lowerable, args, log) -> dict:
    """Memory analysis (and compile seconds) of `lowerable.lower(*args).compile()`."""
    start = time.perf_counter()
    compiled = lowerable.lower(*args).compile()
    return _log_memory(_memory(compiled, time.perf_counter() - start), log)


def plan_memory(config, devices: Any = None, *, targets: dict | None = None, headroom: float = DEFAULT_HEADROOM,
                programs: Sequence[str] = PROGRAMS, sample_prompts: int = 0, title: str = "",
                verbose: bool = False) -> PlanReport:
    """Compiles the iteration's programs for `config` on `devices` and returns the PlanReport.

    devices: a list of jax devices (compile for them: the real backend on a slice), an int N (a
    fake N-device CPU mesh; run in a subprocess unless this process already has exactly N CPU
    devices), or None (all devices). targets: name -> HBM GiB (default: the four TARGETS, or
    the real devices' memory limit when compiling for TPU/GPU). sample_prompts: prompts per
    generate call (0: the loop's, `RunBuilder.prompts_per_attempt`).
    """
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
                                       sample_prompts=sample_prompts, title=title, verbose=verbose)
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
    report = _build_and_compile(config, devices, targets, headroom, programs, sample_prompts, title, log)
    report.seconds = time.perf_counter() - start
    return report


class _Ledger:
    """The phases' per-device peaks: the resident states outside a program plus what XLA says the
    program holds (arguments + temporaries + outputs not aliased to inputs)."""

    def __init__(self, resident: dict):
        self.resident = resident
        self.params = sum(v for k, v in resident.items() if k.endswith("_params"))
        self.opt = sum(v for k, v in resident.items() if k.endswith("_opt"))
        self.phases: list[Phase] = []

    def add(self, name, detail, mem, resident_in_args, grads=0.0, kv=0.0, rows_per_device=0.0) -> None:
        peak = (self.params + self.opt - resident_in_args) + mem["argument"] + mem["temp"] + mem["output"] - mem["alias"]
        act = peak - self.params - self.opt - grads - kv
        self.phases.append(Phase(name, detail, self.params, self.opt, grads, kv, act, peak, mem, rows_per_device))


def _resident(builder, params) -> dict:
    """Per-device bytes of every state a run keeps on the devices (policy, PRM, reference)."""
    def opt_bytes(state):
        return _shard_bytes(state.opt_state) + _shard_bytes((state.step, state.nan_skips))

    params_b = _shard_bytes(params)
    resident = {"policy_params": params_b, "policy_opt": opt_bytes(builder.abstract_train_state(params, "policy"))}
    if builder.uses_process_rewards:
        resident["prm_params"] = params_b
        if builder.updates_prm:
            resident["prm_opt"] = opt_bytes(builder.abstract_train_state(params, "prm"))
        resident["ref_params"] = params_b
    return resident


def _build_and_compile(config, devices, targets, headroom, programs, sample_prompts, title, log) -> PlanReport:
    c = config
    mesh = mesh_from_config(c, devices)
    builder = RunBuilder(c, mesh)
    mcfg = builder.model_config(download=False)  # the plan needs no weights: hub ids are not downloaded
    graphdef, params = abstract_params(mcfg, mesh)
    steps = builder.train_steps((graphdef, params))
    ledger = _Ledger(_resident(builder, params))
    grads_b = _shard_bytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding),
                                        params))
    # No mesh context here: the sampler and the train steps trace under their mesh themselves
    # (`parallel.under_mesh`), so the model's activation constraints apply exactly as in the run.
    notes = []
    if "prefill" in programs or "decode" in programs:
        sampler_model = (graphdef, params)
        if devices[0].platform == "cpu" and mcfg.compute_dtype == jnp.bfloat16:
            # XLA:CPU has no native bf16 dynamic-slice: it converts the whole operand to f32, and
            # hoists that convert of the KV cache out of the attention's block loop (two f32 copies
            # of the cache that TPU and GPU compiles never hold). float16 has the same sizes and is
            # native on CPU, so the sampler's programs are planned with it.
            sampler_model = abstract_params(dataclasses.replace(mcfg, dtype="float16"), mesh)
            notes.append("sampler programs compiled with float16 in place of bfloat16 (same sizes): XLA:CPU "
                         "would add f32 copies of the bf16 KV cache that TPU/GPU do not make")
        _sampler_phases(builder, sampler_model, programs, sample_prompts, ledger, log)
    _train_phases(builder, steps, params, programs, ledger, log, grads_b)

    dp, k = builder.data_parallel, c.batch.micro_batches
    for field in ("mini_batch", "prm_mini_batch", "score_batch"):
        rows = c.batch[field] / (1 if field == "score_batch" else k)
        if rows % dp:
            notes.append(f"batch.{field}/micro_batches = {rows:g} rows is not a multiple of data*fsdp = {dp}: "
                         f"rows are not split evenly over the devices")
    report = PlanReport(
        title=title or c.get("name", "run"), devices=len(devices), platform=devices[0].platform,
        mesh={a: int(s) for a, s in mesh.shape.items()}, model_params=mcfg.num_params(), resident=ledger.resident,
        phases=ledger.phases, targets=dict(targets), headroom=headroom, notes=notes)
    preset = c.mesh.get("preset", "") if "mesh" in c else ""
    if preset:
        accel = mesh_preset(preset)["accelerator"]
        report.primary = accel if accel in report.targets else ""
    report.suggestions = suggest(report, c, dp=dp)
    return report


def _sampler_phases(builder, model, programs, sample_prompts, ledger, log) -> None:
    """The rollout's prefill and decode programs, compiled by `Sampler.compile` from the abstract
    policy weights with the run's settings (exactly what its first `generate` call compiles)."""
    sampler = builder.sampler()
    compiled = builder.compile_rollout(sampler, model, key=jax.ShapeDtypeStruct((2,), np.uint32),
                                       num_prompts=sample_prompts)
    c, dp, n = builder.config, builder.data_parallel, builder.n
    prompts = sample_prompts or builder.prompts_per_attempt
    rows = compiled.rows
    asked = (f"--sample_prompts={prompts}" if sample_prompts else
             f"rollout.oversample {c.rollout.oversample:g} x batch.prompts_per_step {c.batch.prompts_per_step}")
    detail = (f"{prompts} prompts per attempt ({asked}), padded to the sampler's bucket of {compiled.num_prompts}, "
              f"x n={n} = {rows} rows in {compiled.num_slots} decode slots, cache {compiled.prompt_len}+"
              f"{c.rollout.max_new_tokens} columns ({rows / dp:g} rows/device)")
    log(f"sample: {detail}")
    state = compiled.decode_state
    # the slots' cache and the prefilled prompts they copy from
    kv_bytes = _shard_bytes((state.cache, state.prompt_k, state.prompt_v))
    for name in ("prefill", "decode"):
        if name in programs:
            mem = _log_memory(_memory(getattr(compiled, name), compiled.compile_seconds[name]), log)
            ledger.add(name, detail, mem, ledger.resident["policy_params"], kv=kv_bytes, rows_per_device=rows / dp)


def _train_phases(builder, steps, params, programs, ledger, log, grads_b) -> None:
    """The scoring, PRM and policy programs, lowered through the train steps' public `lower`."""
    c, dp, k = builder.config, builder.data_parallel, builder.config.batch.micro_batches
    P, R = builder.prompt_width, c.rollout.max_new_tokens
    for name, (rows, scored) in builder.score_calls().items():
        if name not in programs:
            continue
        models = [m for m, on in zip(("policy", "PRM", "reference"), scored) if on]
        detail = f"{rows} responses x {P}+{R} tokens: {', '.join(models)} log-probs ({rows / dp:g} rows/device)"
        log(f"{name}: {detail}")
        args = (*(params if on else None for on in scored), builder.abstract_batch(name, rows))
        mem = _compile(steps.score, args, log)
        ledger.add(name, detail, mem, ledger.resident["policy_params"] * len(models), rows_per_device=rows / dp)
    for name, field in (("prm", "prm_mini_batch"), ("policy", "mini_batch")):
        if name not in programs or (name == "prm" and not builder.updates_prm):
            continue
        rows = c.batch[field]
        log(f"{name}: {rows} rows, {k} micro-batches")
        state = builder.abstract_train_state(params, name)
        mem = _compile(getattr(steps, name), (state, builder.abstract_batch(name, rows)), log)
        ledger.add(name, f"mini-batch {rows} in {k} micro-batches ({rows / k / dp:g} rows/device)", mem,
                   ledger.resident[f"{name}_params"] + ledger.resident[f"{name}_opt"], grads=grads_b,
                   rows_per_device=rows / k / dp)


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
               f"--sample_prompts={kwargs['sample_prompts']}", "--quiet"]
        if kwargs.get("targets"):
            cmd.append("--targets=" + ",".join(f"{k}={v}" for k, v in kwargs["targets"].items()))
        if kwargs.get("title"):
            cmd.append(f"--title={kwargs['title']}")
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)
        env["JAX_PLATFORMS"] = "cpu"
        root = str(Path(__file__).resolve().parents[2])  # the folder holding prime_jax/
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"plan subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return PlanReport.from_dict(json.loads(out_path.read_text()))


def rollout_estimate(builder, *, sample_prompts: int = 0, p50: float = 0, p90: float = 0,
                     accelerators: Sequence[str] = ("v4", "v5e", "v5p", "h100")) -> list[str]:
    """The plan's rollout-time estimate (`rollout_cost.rollout_table`) for a run's `RunBuilder`: one
    sampling attempt as the loop makes it (the sampler's prompt buckets), response lengths
    lognormal with median `p50` and 90th percentile `p90` (0: a sixth and a half of
    `rollout.max_new_tokens`)."""
    c = builder.config
    tensor = builder.mesh.shape["tensor"]
    prompts = sample_prompts or builder.prompts_per_attempt
    bucket, prompt_tokens = builder.sampler().buckets(prompts, c.data.max_prompt_tokens)
    max_new = c.rollout.max_new_tokens
    mcfg = builder.model_config(download=False)
    return rollout_cost.rollout_table(
        rollout_cost.ModelShape.from_qwen2(mcfg, bytes_per_value=mcfg.compute_dtype.itemsize),
        prompts=prompts, n=builder.n, prompt_tokens=prompt_tokens, max_new_tokens=max_new,
        shards=builder.data_parallel, tensor=tensor, slots=c.rollout.decode_slots, accelerators=list(accelerators),
        p50=p50 or max(1, max_new // 6), p90=p90 or max(1, max_new // 2), bucket_prompts=bucket)
