"""A roofline estimate of one iteration's rollout time, static batch vs decode slots.

Labelled an *estimate* wherever it is printed: it models the sampler's schedule exactly (which
row decodes in which step, per data shard, as `sampling/decode.py` does it) but prices each step
from peak numbers only, `max(FLOPs / peak FLOP/s, bytes read / HBM bandwidth)` per device, and
ignores collectives, kernel overheads and host work. The formula is in docs/scale_out.md
("Rollout cost model").

Shapes: `lengths [rows]` response lengths in tokens; per-step traces `[steps]`.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Sequence

import numpy as np

from prime_jax.parallel.mesh import HBM_BYTES_PER_S, PEAK_FLOPS

# z of the 90th percentile of a standard normal (lognormal p90 = p50 * exp(Z90 * sigma)).
Z90 = 1.2815515655446004


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """Peak numbers of one device (what `jax.devices()` lists: a TPU chip, a GPU)."""

    name: str
    bf16_flops: float  # dense bf16 matmul peak, FLOP/s
    hbm_bytes_per_s: float  # HBM bandwidth, bytes/s

    @classmethod
    def named(cls, name: str) -> "Accelerator":
        """The spec-sheet peaks of a `parallel.mesh` accelerator name (v4, v5e, v5p, h100)."""
        if name not in PEAK_FLOPS:
            raise ValueError(f"no peak numbers for accelerator {name!r}; known: {sorted(PEAK_FLOPS)}")
        return cls(name, PEAK_FLOPS[name], HBM_BYTES_PER_S[name])


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What a decode step reads and computes, from a Qwen2 config."""

    params: int  # weights read every step (embedding lookup excluded, LM head included)
    layers: int
    kv_heads: int
    head_size: int
    query_heads: int
    bytes_per_value: int  # bytes of a weight and of a cached key/value element

    @classmethod
    def from_qwen2(cls, mcfg, bytes_per_value: int = 2) -> "ModelShape":
        h, i, L = mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_hidden_layers
        q = mcfg.num_attention_heads * mcfg.head_size
        kv = mcfg.num_key_value_heads * mcfg.head_size
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i  # q/k/v/o projections + gated MLP
        return cls(params=L * per_layer + h * mcfg.vocab_size, layers=L, kv_heads=mcfg.num_key_value_heads,
                   head_size=mcfg.head_size, query_heads=mcfg.num_attention_heads,
                   bytes_per_value=bytes_per_value)

    @property
    def kv_bytes_per_position(self) -> int:
        """Cached keys + values of one position over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_size * self.bytes_per_value

    @property
    def flops_per_token(self) -> float:
        """Matmul FLOPs of one token outside attention: 2 per weight."""
        return 2.0 * self.params

    @property
    def flops_per_position(self) -> float:
        """Attention FLOPs per cache position a token reads: q·k and p·v, 2 * 2 per head element."""
        return 4.0 * self.layers * self.query_heads * self.head_size


def response_lengths(p50: float, p90: float, cap: int, count: int, seed: int = 0) -> np.ndarray:
    """`[count]` int response lengths from a lognormal with the given median and 90th percentile
    (`sigma = log(p90 / p50) / Z90`), clipped to `[1, cap]` (the clip is the rows that hit
    `max_new_tokens`). Drawn from `seed`, so a plan prints the same estimate every time."""
    if not 0 < p50 <= p90:
        raise ValueError(f"response lengths need 0 < p50 <= p90, got p50={p50}, p90={p90}")
    sigma = math.log(p90 / p50) / Z90
    draws = np.random.default_rng(seed).lognormal(math.log(p50), sigma, size=count)
    return np.clip(np.rint(draws), 1, cap).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class ShardTrace:
    """One data shard's decode steps: `rows [steps]` rows computed in the step (live or not: a
    static batch computes finished rows too), `context [steps]` the cache positions each of them
    reads (the longest live row's, as blockwise attention reads up to it) and `live_positions
    [steps]` the sum of the live rows' own positions (what a paged kernel would read instead)."""

    rows: np.ndarray
    context: np.ndarray
    live_positions: np.ndarray

    @property
    def steps(self) -> int:
        return int(self.rows.shape[0])


def static_trace(lengths: np.ndarray, prompt_tokens: int, rows: int | None = None) -> ShardTrace:
    """A static batch: every row starts at step 0 and all `rows` (the real ones plus the bucket's
    padding rows, default none) stay until the longest ends."""
    return _trace(np.zeros_like(lengths), lengths, rows or lengths.shape[0], prompt_tokens)


def slot_trace(lengths: np.ndarray, slots: int, prompt_tokens: int) -> ShardTrace:
    """K slots over a queue of rows in order: a slot whose row ends takes the next waiting row for
    the next step (`refill_in_loop`). Every step computes all K slots (idle ones are masked, not
    skipped) and reads up to the longest live row's position."""
    slots = min(slots, lengths.shape[0])
    free_at = [0] * slots  # the step at which each slot can start a row (a heap)
    starts = np.empty(lengths.shape[0], np.int64)
    for row, length in enumerate(lengths):
        starts[row] = heapq.heappop(free_at)
        heapq.heappush(free_at, int(starts[row] + length))
    return _trace(starts, lengths, slots, prompt_tokens)


def _trace(starts: np.ndarray, lengths: np.ndarray, rows: int, prompt_tokens: int) -> ShardTrace:
    """The trace of rows decoding steps `[start, start + length)`, `rows` computed per step."""
    ends = starts + lengths
    steps = int(ends.max())
    # The longest live row at step t started first: context = t + 1 - min(start of live rows).
    first_start = np.full(steps, steps, np.int64)
    for start, end in zip(starts, ends):
        np.minimum(first_start[start:end], start, out=first_start[start:end])
    # Live rows and the sum of their starts per step, by difference arrays.
    live = np.zeros(steps + 1, np.int64)
    start_sum = np.zeros(steps + 1, np.int64)
    np.add.at(live, starts, 1), np.add.at(live, ends, -1)
    np.add.at(start_sum, starts, starts), np.add.at(start_sum, ends, -starts)
    live, start_sum = np.cumsum(live)[:-1], np.cumsum(start_sum)[:-1]
    t = np.arange(steps)
    return ShardTrace(rows=np.full(steps, rows), context=prompt_tokens + t + 1 - first_start,
                      live_positions=live * (prompt_tokens + t + 1) - start_sum)


def utilisation(traces: Sequence[ShardTrace], lengths: np.ndarray) -> float:
    """Generated tokens (`lengths [rows]`, all shards) / row-steps the shards' `traces` compute."""
    return float(lengths.sum() / max(sum(int(t.rows.sum()) for t in traces), 1))


def trace_seconds(trace: ShardTrace, model: ModelShape, accel: Accelerator, tensor: int,
                  paged: bool = False) -> float:
    """Roofline seconds of a shard's decode steps on one device of its `tensor` group: each step
    reads the weights once and every computed row's cache up to the trace's context (`paged`: only
    the live rows, each up to its own position, as a paged-attention kernel would)."""
    positions = trace.live_positions if paged else trace.rows * trace.context
    flops = (trace.rows * model.flops_per_token + positions * model.flops_per_position) / tensor
    read = (model.params * model.bytes_per_value + positions * model.kv_bytes_per_position) / tensor
    return float(np.maximum(flops / accel.bf16_flops, read / accel.hbm_bytes_per_s).sum())


@dataclasses.dataclass(frozen=True)
class RolloutEstimate:
    seconds: float  # the slowest shard's decode plus prefill
    decode_steps: int  # the slowest shard's
    utilisation: float  # generated tokens / computed row-steps, over all shards


def shard_traces(lengths: np.ndarray, *, prompts: int, n: int, prompt_tokens: int, shards: int, slots: int = 0,
                 bucket_prompts: int = 0) -> list[ShardTrace]:
    """The decode schedule of one sampling attempt, one trace per data shard: `prompts * n` rows
    with `lengths [prompts * n]`, spread over `shards` data shards (data x fsdp) like the sampler
    spreads them (group by group, round robin), `slots` decode slots in all (0: static batch). A
    static batch also computes the padding rows of the sampler's prompt bucket (`bucket_prompts`,
    default `prompts`); slots skip them. It depends on no hardware: price it with `price_rollout`."""
    rows = prompts * n
    if lengths.shape != (rows,):
        raise ValueError(f"lengths must be [{rows}], got {lengths.shape}")
    per_shard = [lengths.reshape(prompts, n)[s::shards].reshape(-1) for s in range(shards)]
    per_shard = [x for x in per_shard if x.size]
    if slots:
        return [slot_trace(x, -(-slots // shards), prompt_tokens) for x in per_shard]
    static_rows = -(-max(bucket_prompts, prompts) // shards) * n
    return [static_trace(x, prompt_tokens, static_rows) for x in per_shard]


def price_rollout(traces: Sequence[ShardTrace], lengths: np.ndarray, *, prompts: int, prompt_tokens: int,
                  shards: int, tensor: int, model: ModelShape, accel: Accelerator,
                  paged: bool = False) -> RolloutEstimate:
    """Roofline seconds of `shard_traces`' schedule on `accel`, each shard on `tensor` devices:
    the slowest shard's decode plus the prefill. `paged`: price attention as a paged kernel would
    (each live row reads its own positions) instead of the sampler's read up to the longest live row."""
    decode = max(trace_seconds(t, model, accel, tensor, paged) for t in traces)
    # Prefill: each shard's prompts once, compute bound (a prompt is shared by its n rows).
    shard_prompts = -(-prompts // shards)
    prefill_flops = shard_prompts * prompt_tokens * (model.flops_per_token
                                                     + model.flops_per_position * prompt_tokens / 2) / tensor
    prefill = float(max(prefill_flops / accel.bf16_flops, model.params * model.bytes_per_value / tensor
                        / accel.hbm_bytes_per_s))
    return RolloutEstimate(seconds=decode + prefill, decode_steps=max(t.steps for t in traces),
                           utilisation=utilisation(traces, lengths))


def estimate_rollout(lengths: np.ndarray, *, prompts: int, n: int, prompt_tokens: int, shards: int,
                     tensor: int, model: ModelShape, accel: Accelerator, slots: int = 0,
                     bucket_prompts: int = 0, paged: bool = False) -> RolloutEstimate:
    """`price_rollout` of `shard_traces` (see both for the arguments)."""
    traces = shard_traces(lengths, prompts=prompts, n=n, prompt_tokens=prompt_tokens, shards=shards, slots=slots,
                          bucket_prompts=bucket_prompts)
    return price_rollout(traces, lengths, prompts=prompts, prompt_tokens=prompt_tokens, shards=shards,
                         tensor=tensor, model=model, accel=accel, paged=paged)


def rollout_table(model: ModelShape, *, prompts: int, n: int, prompt_tokens: int, max_new_tokens: int,
                  shards: int, tensor: int, slots: int, accelerators: list[str], p50: float, p90: float,
                  bucket_prompts: int = 0, seed: int = 0) -> list[str]:
    """The plan's printout: per accelerator, one attempt's estimated rollout time with a static
    batch, with `slots` decode slots (0: half the rows) as the sampler reads the cache, and with
    the same slots under a paged read (what a paged-attention kernel would add)."""
    rows = prompts * n
    lengths = response_lengths(p50, p90, max_new_tokens, rows, seed)
    slots = slots or max(shards, rows // 2 // shards * shards)
    lines = ["rollout time of one sampling attempt -- an ESTIMATE from peak FLOP/s and HBM bandwidth "
             "(formula: docs/scale_out.md, 'Rollout cost model'):",
             f"  {prompts} prompts x {n} = {rows} responses over {shards} data shards x {tensor} tensor; "
             f"lengths lognormal p50 {p50:g} / p90 {p90:g}, cap {max_new_tokens}: mean {lengths.mean():.0f}, "
             f"max {lengths.max()}, {np.mean(lengths == max_new_tokens):.1%} at the cap",
             f"  {'':8}{'static':>18}{f'{slots} slots':>24}{f'{slots} slots, paged read':>28}"]
    # The two schedules depend on no hardware: simulated once, priced per accelerator.
    schedule = dict(prompts=prompts, n=n, prompt_tokens=prompt_tokens, shards=shards, bucket_prompts=bucket_prompts)
    static_traces, slot_traces = shard_traces(lengths, **schedule), shard_traces(lengths, slots=slots, **schedule)
    for name in accelerators:
        common = dict(prompts=prompts, prompt_tokens=prompt_tokens, shards=shards, tensor=tensor, model=model,
                      accel=Accelerator.named(name))
        static = price_rollout(static_traces, lengths, **common)
        slotted = price_rollout(slot_traces, lengths, **common)
        paged = price_rollout(slot_traces, lengths, paged=True, **common)
        lines.append(f"  {name:8}{static.seconds:9.1f}s u={static.utilisation:.2f}"
                     f"{slotted.seconds:9.1f}s u={slotted.utilisation:.2f} {static.seconds / slotted.seconds:4.2f}x"
                     f"{paged.seconds:13.1f}s {static.seconds / paged.seconds:4.2f}x")
    lines.append("  (u: generated tokens / computed row-steps; Nx: static time / this time)")
    return lines
