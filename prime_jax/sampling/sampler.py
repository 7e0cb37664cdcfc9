"""Batched autoregressive sampling with decode slots: one prefill per prompt, then jitted decoding.

A call runs two compiled programs (`sampling.decode`): **prefill** runs the G prompts once and
samples every row's first token; **decode** lets K decode slots work through the queue of
B = G·n rows (prompt i's samples are rows `[i·n, (i+1)·n)`): a slot whose row has stopped takes the
next waiting row, whose prompt keys/values are copied in from prefill (a prompt is prefilled once
and shared by its n samples). `decode_slots=None` gives one slot per row (the static batch: all
rows start together and the call lasts as long as its longest row). With K < B a long-tailed
length distribution keeps the slots busy: the per-call statistics report the slot utilisation
(live slot-steps / (K × decode steps)).

The same key gives the same tokens whatever K, mesh or batch bucket: row r's token t is drawn with
`fold_in(fold_in(key, t), r)` from logits that do not depend on the row's slot (log-probs agree to
float rounding: a backend's matmul may round differently for another number of rows per step).

`generate` returns all rows at once; `stream` hands back each prompt's group of n samples as soon
as they are all done (the decode program returns every `stream_steps` steps, and the loop is
carried on with the donated state), so grading can run while decoding continues.

Shapes are bucketed so that a training run compiles a handful of programs: prompt lengths are
left-padded to a power of two or 1.5 times one (at least `min_prompt_bucket`), the number of prompts is padded with
dummy rows to a power of two (a multiple of the mesh's data-parallel size) and the cache holds
P + max_new_tokens columns rounded up to the attention block. Both programs are compiled ahead of
time and kept per shape key, so `Sampler.num_compilations` is exactly the number of XLA programs
built; streaming and chunk sizes are inputs, not part of a program.

With a mesh, rows, prompts and slots are split over the data axes (logical `batch`), parameters
keep the training sharding (`parallel.state_shardings`) and the decode state, KV caches included,
is sharded by `KVCache.LOGICAL_AXES` / `DecodeState.LOGICAL_AXES` (never replicated on every
device). Real prompts are spread evenly over the data shards, since each shard's slots decode that
shard's rows.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from prime_jax.models.qwen2 import DECODE_BLOCK, MAX_DECODE_BLOCKS, KVCache
from prime_jax.parallel import (batch_shards, batch_sharding, named_sharding, put_replicated, put_rows, replicated,
                                shard_state, state_shardings, to_host, under_mesh)
from prime_jax.sampling.decode import PAD_ID, DecodeSpec, DecodeState, decode_fn, prefill_fn
from prime_jax.sampling.rollouts import Rollouts

REFILL_MODES = ("loop", "chunks")
_NO_STOP = np.int32(2**31 - 1)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _length_bucket(x: int) -> int:
    """The smallest power of two or 1.5 x power of two >= x (16, 24, 32, 48, 64, 96, ...): prompts are
    padded by at most a third, where powers of two alone pad a 130-token prompt to 256."""
    power = _next_pow2(x)
    return power * 3 // 4 if power >= 4 and power * 3 // 4 >= x else power


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class _ProgramKey:
    """Everything a compiled prefill/decode pair depends on (all hashable)."""

    spec: DecodeSpec
    state_treedef: Any
    state_avals: tuple
    key_aval: tuple
    num_prompts: int  # G, the bucketed prompt batch
    prompt_len: int  # P, the bucketed prompt length
    num_stop_slots: int  # stop ids are an input array, padded with -1 to a power of two (>= 8)


@dataclasses.dataclass
class SamplerPrograms:
    """The compiled prefill and decode programs of one shape key (what `Sampler.compile` returns).

    prefill, decode: `jax.stages.Compiled` executables (`.memory_analysis()`, `.as_text()`).
    decode_state: the abstract `DecodeState` prefill returns (`jax.ShapeDtypeStruct` leaves, with
        their shardings on a mesh): the KV caches' shapes and placement.
    num_prompts, prompt_len: the bucketed prompt batch G and prompt length P; rows = G * n;
    num_slots: K; capacity: cache columns per slot.
    """

    prefill: Any = None
    decode: Any = None
    decode_state: Any = None
    num_prompts: int = 0
    prompt_len: int = 0
    rows: int = 0
    num_slots: int = 0
    capacity: int = 0
    compile_seconds: dict = dataclasses.field(default_factory=dict)  # {"prefill": s, "decode": s}


@dataclasses.dataclass
class _Call:
    """One generate/stream call on the host: its inputs in bucket order and how to map back."""

    programs: SamplerPrograms
    prefill_args: tuple
    decode_args: tuple  # (params, stop_ids, key, temperature, top_p)
    prompt_ids: np.ndarray  # [G, P] bucket order
    prompt_mask: np.ndarray
    position: np.ndarray  # [num_prompts]: the bucket position of each input prompt
    n: int
    temperature: float
    max_new_tokens: int
    num_slots: int
    start: float
    compile_seconds: float


class Sampler:
    """Holds the compiled prefill/decode programs across calls; one per training run.

    `sampler.generate(model_or_(graphdef, state), prompts, ...)` every step (or `sampler.stream`);
    new prompt lengths and batch sizes reuse a program as long as they fall into the same buckets.

    decode_slots: K, how many rows decode at once (rounded up to a multiple of the data-parallel
        size, at most the rows of the call); None: one slot per row (the static batch).
    refill: "loop" refills idle slots inside the jitted loop after every step; "chunks" runs
        `chunk_steps` steps per program call and refills at the start of the next call.
    stream_steps: decode steps between two looks for finished groups in `stream`.
    attention_block: cache columns per block: a decode step reads the blocks up to its longest row.
    """

    def __init__(self, mesh: Mesh | None = None, *, decode_slots: int | None = None, min_prompt_bucket: int = 16,
                 min_batch_bucket: int = 1, refill: str = "loop", chunk_steps: int = 16, stream_steps: int = 32,
                 attention_block: int = DECODE_BLOCK):
        if decode_slots is not None and int(decode_slots) < 1:
            raise ValueError(f"decode_slots must be a positive number of slots or None, got {decode_slots}")
        if refill not in REFILL_MODES:
            raise ValueError(f"refill must be one of {REFILL_MODES}, got {refill!r}")
        for name, value in (("chunk_steps", chunk_steps), ("stream_steps", stream_steps),
                            ("attention_block", attention_block)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.mesh = mesh
        self.decode_slots = None if decode_slots is None else int(decode_slots)
        self.min_prompt_bucket = int(min_prompt_bucket)
        self.min_batch_bucket = int(min_batch_bucket)
        self.refill = refill
        self.chunk_steps = int(chunk_steps)
        self.stream_steps = int(stream_steps)
        self.attention_block = int(attention_block)
        self._programs: dict[_ProgramKey, SamplerPrograms] = {}
        self._num_compilations = 0
        self.last_stats: dict[str, Any] = {}

    @property
    def num_compilations(self) -> int:
        """Number of XLA programs this sampler has compiled (a prefill and a decode per shape key)."""
        return self._num_compilations

    @property
    def data_parallel_size(self) -> int:
        """How many shards the batch rows are split into on the mesh (1 without a mesh)."""
        return 1 if self.mesh is None else batch_shards(self.mesh)

    def buckets(self, num_prompts: int, max_prompt_len: int) -> tuple[int, int]:
        """(bucketed prompt batch G, bucketed prompt length P) for a call."""
        batch = _round_up(_next_pow2(max(num_prompts, self.min_batch_bucket)), self.data_parallel_size)
        length = max(self.min_prompt_bucket, _length_bucket(max_prompt_len))
        return batch, length

    def num_slots(self, rows: int) -> int:
        """K for a call of `rows` bucketed rows: `decode_slots` rounded up to the data-parallel size."""
        if self.decode_slots is None:
            return rows
        return min(rows, _round_up(self.decode_slots, self.data_parallel_size))

    # ------------------------------------------------------------------ the calls

    def generate(self, model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, n: int = 1,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 stop_token_ids: Sequence[int] = (), key: jax.Array) -> Rollouts:
        """Samples n responses for each prompt (lists of token ids, any lengths). See `Rollouts`.

        model: a `Qwen2ForCausalLM` or its `(graphdef, state)` from `nnx.split`. temperature 0 is
        greedy; top_k 0 and top_p 1 switch those filters off. The same key gives the same tokens
        (also across meshes, batch buckets and `decode_slots`: row r's token t draws with
        `fold_in(fold_in(key, t), r)`).
        """
        call = self._prepare(model, prompts, max_new_tokens, n, temperature, top_p, top_k, stop_token_ids, key)
        outputs = None
        for outputs in self._decode_calls(call, stream=False):
            pass
        return self._rollouts(call, outputs, np.arange(len(prompts)))

    def stream(self, model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, n: int = 1,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
               stop_token_ids: Sequence[int] = (), key: jax.Array) -> Iterator[Rollouts]:
        """`generate`, handed back group by group: yields a `Rollouts` of the groups (a prompt's n
        samples) that finished since the last look, every `stream_steps` decode steps; its
        `prompt_index` says which input prompts they answer. Together the yields hold exactly
        `generate`'s rows (same tokens and log-probs). The next `stream_steps` decode steps are
        dispatched before a yield, so the device decodes while the caller works on the groups (e.g.
        grades them). Rows still decoding when the caller stops iterating are dropped with the decode
        state (at most the one dispatched chunk of steps still runs); `last_stats` covers the steps
        whose results were handed back.
        """
        call = self._prepare(model, prompts, max_new_tokens, n, temperature, top_p, top_k, stop_token_ids, key)
        emitted = np.zeros(len(prompts), bool)
        for outputs in self._decode_calls(call, stream=True):
            done = outputs.done[_rows_of(call.position, n)].reshape(len(prompts), n).all(axis=1)
            ready = np.flatnonzero(done & ~emitted)
            if ready.size:
                emitted[ready] = True
                yield self._rollouts(call, outputs, ready)

    def compile(self, model, *, num_prompts: int, prompt_len: int, max_new_tokens: int, n: int = 1,
                temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop_token_ids: Sequence[int] = (),
                key: jax.Array | jax.ShapeDtypeStruct) -> SamplerPrograms:
        """Compiles (or reuses) the programs a `generate` call of `num_prompts` prompts of at most
        `prompt_len` tokens with these settings runs, and returns them without running anything.

        `model` may be abstract (`nnx.eval_shape`, or a `(graphdef, state)` whose leaves are
        `jax.ShapeDtypeStruct`s) and `key` a `ShapeDtypeStruct`: memory plans compile exactly the
        programs training runs, from shapes alone. The programs are kept under the same key as
        `generate`'s, so a later call with matching shapes compiles nothing.
        """
        prompts = [[1] * int(prompt_len)] * int(num_prompts)  # token ids are data, not part of a program
        call = self._prepare(model, prompts, max_new_tokens, n, temperature, top_p, top_k, stop_token_ids, key)
        return call.programs

    # ------------------------------------------------------------------ one call, step by step

    def _compile_programs(self, programs: SamplerPrograms, spec: DecodeSpec, prefill_args, decode_args, start: float):
        """Compiles a call's prefill and decode programs into `programs` (timed from `start`), with
        the decode state's shardings."""
        state = prefill_args[0]
        shardings = self._shardings(spec, prefill_args)
        programs.prefill = self._compile(prefill_fn(spec), prefill_args, shardings and shardings[0], donate=())
        programs.compile_seconds["prefill"] = time.perf_counter() - start
        decode_example = (state, jax.eval_shape(prefill_fn(spec), *prefill_args), *decode_args[1:], _NO_STOP)
        constrain = (lambda s: s) if shardings is None else (
            lambda s: jax.lax.with_sharding_constraint(s, shardings[2]))
        programs.decode = self._compile(decode_fn(spec, constrain), decode_example,
                                        shardings and shardings[1], donate=(1,))
        programs.compile_seconds["decode"] = time.perf_counter() - start - programs.compile_seconds["prefill"]
        programs.decode_state = decode_example[1] if shardings is None else jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), decode_example[1], shardings[2])

    def _prepare(self, model, prompts, max_new_tokens, n, temperature, top_p, top_k, stop_token_ids, key) -> _Call:
        """Checks the arguments, lays the prompts out in buckets and compiles (or reuses) the programs."""
        graphdef, state = nnx.split(model) if isinstance(model, nnx.Module) else model
        config = nnx.merge(graphdef, state).config
        vocab = config.vocab_size
        _check_args(prompts, max_new_tokens, n, temperature, top_p, top_k, vocab)
        greedy = temperature == 0
        top_k = 0 if greedy or top_k >= vocab else int(top_k)
        stop_set = sorted({int(t) for t in stop_token_ids})
        stop_ids = np.full(max(8, _next_pow2(len(stop_set))), -1, np.int32)
        stop_ids[: len(stop_set)] = stop_set

        num_prompts, shards = len(prompts), self.data_parallel_size
        batch, length = self.buckets(num_prompts, max(len(p) for p in prompts))
        # Prompt i goes to shard i % D (each shard's slots decode that shard's rows): real rows spread evenly.
        position = (np.arange(num_prompts) % shards) * (batch // shards) + np.arange(num_prompts) // shards
        prompt_ids = np.full((batch, length), PAD_ID, np.int32)
        prompt_mask = np.zeros((batch, length), np.int32)
        for pos, prompt in zip(position, prompts):
            prompt_ids[pos, length - len(prompt):] = np.asarray(prompt, np.int32)
            prompt_mask[pos, length - len(prompt):] = 1
        rows = batch * n
        row_id = np.arange(rows, dtype=np.int32) + num_prompts * n  # padding rows: ids past the real ones
        row_id[_rows_of(position, n)] = np.arange(num_prompts * n, dtype=np.int32)
        active = np.zeros(rows, bool)
        active[_rows_of(position, n)] = True

        scalars = (np.float32(temperature if not greedy else 1.0), np.float32(top_p))
        host_prompt_ids, host_prompt_mask = prompt_ids, prompt_mask
        if self.mesh is not None:
            # Global arrays on every process (multi-host: each process feeds only its devices' rows).
            state = shard_state(state, self.mesh)
            key, stop_ids, scalars = put_replicated((key, stop_ids, scalars), self.mesh)
            prompt_ids, prompt_mask, row_id, active = put_rows((prompt_ids, prompt_mask, row_id, active), self.mesh)
        static = self.num_slots(rows) == rows
        own = max_new_tokens if static else length + max_new_tokens  # a slot's columns (static: no prompt)
        # a short cache is read in one block rather than padded up to a whole `attention_block`
        block = min(self.attention_block, _next_pow2(own))
        block = max(block, _next_pow2(-(-own // MAX_DECODE_BLOCKS)))  # a bounded number of blocks
        spec = DecodeSpec(
            graphdef=graphdef, n=n, max_new_tokens=max_new_tokens, num_slots=self.num_slots(rows),
            capacity=_round_up(own, block), block=block, shards=shards, greedy=greedy, top_k=top_k,
            use_top_p=(not greedy) and top_p < 1.0, refill_in_loop=self.refill == "loop", static=static)
        program_key = _ProgramKey(
            spec=spec, state_treedef=jax.tree.structure(state),
            state_avals=tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(state)),
            key_aval=(tuple(key.shape), str(key.dtype)), num_prompts=batch, prompt_len=length,
            num_stop_slots=len(stop_ids))
        programs = self._programs.setdefault(program_key, SamplerPrograms())

        start = time.perf_counter()
        prefill_args = (state, prompt_ids, prompt_mask, row_id, active, stop_ids, key, *scalars)
        decode_args = (state, stop_ids, key, *scalars)
        if programs.prefill is None:
            self._compile_programs(programs, spec, prefill_args, decode_args, start)
            programs.num_prompts, programs.prompt_len, programs.rows = batch, length, rows
            programs.num_slots, programs.capacity = spec.num_slots, spec.capacity
        compile_seconds = time.perf_counter() - start
        return _Call(programs=programs, prefill_args=prefill_args, decode_args=decode_args, prompt_ids=host_prompt_ids,
                     prompt_mask=host_prompt_mask, position=position, n=n, temperature=float(temperature),
                     max_new_tokens=max_new_tokens, num_slots=spec.num_slots, start=time.perf_counter(),
                     compile_seconds=compile_seconds)

    def _decode_calls(self, call: _Call, stream: bool) -> Iterator["_Outputs"]:
        """Runs prefill, then decode calls until every real row is done; yields the host outputs
        after each call, the next call already dispatched (the state is donated to it).

        A call runs to the end (refill "loop", not streaming), or for `stream_steps` /
        `chunk_steps` steps (the smaller of the ones that apply)."""
        params, *rest = call.decode_args
        every = [self.stream_steps] if stream else []
        if self.refill == "chunks":
            every.append(self.chunk_steps)
        rows = _rows_of(call.position, call.n)

        def dispatch(state, steps):
            stop_at = np.int32(steps + min(every)) if every else _NO_STOP
            if self.mesh is not None:
                stop_at = put_replicated(stop_at, self.mesh)
            return call.programs.decode(params, state, *rest, stop_at)

        state = dispatch(call.programs.prefill(*call.prefill_args), 0)
        calls = 1
        while True:
            done, step, busy = (np.asarray(x) for x in to_host((state.done, state.step, state.busy)))
            finished = done[rows].all()
            # the rows themselves only when someone reads them (a stream: every call)
            outputs = _Outputs.of(state, done, int(step), int(busy)) if stream or finished else None
            self._record_stats(call, int(step), int(busy), calls)
            if not finished:  # the device decodes on while the caller looks at these outputs
                state = dispatch(state, int(step))
                calls += 1
            yield outputs
            if finished:
                return

    def _record_stats(self, call: _Call, steps: int, busy: int, calls: int) -> None:
        self.last_stats = dict(
            prompt_batch_bucket=call.prompt_ids.shape[0], prompt_len_bucket=call.prompt_ids.shape[1],
            rows=call.prompt_ids.shape[0] * call.n, decode_slots=call.num_slots, decode_steps=steps,
            decode_calls=calls, slot_utilisation=busy / max(1, steps * call.num_slots),
            decoded_tokens=busy, slot_steps=steps * call.num_slots,
            new_tokens=busy + len(call.position) * call.n,  # decoded + the first tokens prefill sampled
            seconds=time.perf_counter() - call.start, compile_seconds=call.compile_seconds)

    def _rollouts(self, call: _Call, outputs: "_Outputs", prompt_indices: np.ndarray) -> Rollouts:
        """The rows of the given input prompts (their groups must be done), as host `Rollouts`."""
        n, new_tokens = call.n, call.max_new_tokens
        rows = _rows_of(call.position[prompt_indices], n)
        tokens, logprobs, lengths, finished = (x[rows] for x in
                                               (outputs.tokens, outputs.logprobs, outputs.lengths, outputs.finished))
        response_mask = (np.arange(new_tokens)[None, :] < lengths[:, None]).astype(np.int32)
        return Rollouts(
            tokens=tokens.astype(np.int32),
            response_mask=response_mask,
            logprobs=np.where(response_mask > 0, logprobs, 0.0).astype(np.float32),
            lengths=lengths.astype(np.int32),
            finished=finished.astype(bool),
            prompt_tokens=np.repeat(call.prompt_ids[call.position[prompt_indices]], n, axis=0),
            prompt_mask=np.repeat(call.prompt_mask[call.position[prompt_indices]], n, axis=0),
            prompt_index=np.repeat(np.asarray(prompt_indices, np.int32), n),
            n=n,
            temperature=call.temperature,
        )

    # ------------------------------------------------------------------ compilation

    def _compile(self, fn, args, shardings, donate):
        if shardings is None:
            jitted = jax.jit(fn, donate_argnums=donate)
        else:  # traced under the mesh so the model's activation constraints apply
            jitted = jax.jit(under_mesh(fn, self.mesh), in_shardings=shardings[0], out_shardings=shardings[1],
                             donate_argnums=donate)
        compiled = jitted.lower(*args).compile()
        self._num_compilations += 1
        return compiled

    def _shardings(self, spec: DecodeSpec, prefill_args):
        """((prefill ins, outs), (decode ins, outs), decode-state shardings), or None without a mesh."""
        if self.mesh is None:
            return None
        mesh = self.mesh
        shapes = jax.eval_shape(prefill_fn(spec), *prefill_args)
        # every leaf of a field (each layer's blocks, for the caches) has the field's logical axes
        sharded = lambda axes, field: jax.tree.map(lambda x: named_sharding(mesh, axes, x.shape), field)
        cache = KVCache(**{f: sharded(a, getattr(shapes.cache, f)) for f, a in KVCache.LOGICAL_AXES.items()})
        decode_state = DecodeState(cache=cache, **{f: sharded(a, getattr(shapes, f))
                                                   for f, a in DecodeState.LOGICAL_AXES.items()})
        rep, params = replicated(mesh), state_shardings(prefill_args[0], mesh)
        rows1, rows2 = batch_sharding(mesh, 1), batch_sharding(mesh, 2)
        prefill = ((params, rows2, rows2, rows1, rows1, rep, rep, rep, rep), decode_state)
        decode = ((params, decode_state, rep, rep, rep, rep, rep), decode_state)
        return prefill, decode, decode_state


@dataclasses.dataclass(frozen=True)
class _Outputs:
    """A decode state's results on the host (numpy; read before the state is donated to the next call)."""

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray
    done: np.ndarray
    step: int
    busy: int

    @staticmethod
    def of(state: DecodeState, done: np.ndarray, step: int, busy: int) -> "_Outputs":
        tokens, logprobs, lengths, finished = to_host((state.tokens, state.logprobs, state.lengths, state.finished))
        return _Outputs(tokens, logprobs, lengths, finished, done, step, busy)


def _rows_of(positions: np.ndarray, n: int) -> np.ndarray:
    """The bucket rows `[len(positions) * n]` of the prompts at the given bucket positions, in order."""
    return (np.asarray(positions)[:, None] * n + np.arange(n)[None, :]).reshape(-1)


def _check_args(prompts, max_new_tokens, n, temperature, top_p, top_k, vocab) -> None:
    if not prompts:
        raise ValueError("generate: no prompts")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"generate: prompt {i} is empty")
        if vocab > 0 and (min(prompt) < 0 or max(prompt) >= vocab):
            raise ValueError(f"generate: prompt {i} has token ids outside [0, {vocab})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, n: int = 1,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             stop_token_ids: Sequence[int] = (), key: jax.Array, mesh: Mesh | None = None,
             decode_slots: int | None = None) -> Rollouts:
    """One-shot convenience: `Sampler(mesh, decode_slots=...).generate(...)`. The sampler is kept
    per (mesh, decode_slots) (`_shared_sampler`), so a second call with the same shapes reuses its
    compiled programs."""
    return _shared_sampler(mesh, decode_slots).generate(
        model, prompts, max_new_tokens=max_new_tokens, n=n, temperature=temperature, top_p=top_p,
        top_k=top_k, stop_token_ids=stop_token_ids, key=key)


@functools.lru_cache(maxsize=8)
def _shared_sampler(mesh: Mesh | None, decode_slots: int | None) -> Sampler:
    """The `Sampler` behind the one-shot `generate` (a few, least recently used dropped first)."""
    return Sampler(mesh, decode_slots=decode_slots)
