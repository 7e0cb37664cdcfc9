"""Batched autoregressive sampling: one prefill per prompt, then a jitted while_loop decode.

A call runs two compiled programs:

1. **prefill** `(params, prompt_ids [G, P], prompt_mask, key, temperature, top_p) ->
   (cache, first_tokens [B], first_logprobs [B])`: runs the G left-padded prompts once, repeats
   each prompt's KV cache rows n times (B = G·n rows, prompt i's samples at rows [i·n, (i+1)·n)),
   pads the cache to P + max_new_tokens slots and samples every row's first token.
2. **decode** `(params, cache, first_tokens, first_logprobs, active [B], stop_ids, key, temperature,
   top_p) -> (tokens, logprobs, lengths, finished, steps, cache)`: a `lax.while_loop` that feeds
   one token per row, samples the next and stops as soon as every row has hit a stop token (or at
   max_new_tokens). The cache is donated and returned, so the loop updates it in place.

Shapes are bucketed so that a training run compiles a handful of programs: prompt lengths are
left-padded to a power of two (at least `min_prompt_bucket`), the number of prompts is padded
with dummy rows to a power of two (a multiple of the mesh's data-parallel size); dummy rows start
finished and are dropped from the result. Both programs are compiled ahead of time and kept per
shape key, so `Sampler.num_compilations` is exactly the number of XLA programs built.

With a mesh, rows are split over the data axes (logical `batch`), parameters keep the training
sharding (`parallel.state_shardings`) and the KV cache is sharded by `KVCache.LOGICAL_AXES` as the
programs' input/output shardings (never replicated on every device).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from prime_jax.models.qwen2 import KVCache
from prime_jax.parallel import (batch_sharding, logical_to_spec, named_sharding, put_replicated, put_rows, replicated,
                                shard_state, state_shardings, to_host, under_mesh)
from prime_jax.sampling import strategies
from prime_jax.sampling.rollouts import Rollouts


PAD_ID = 0  # prompt left-padding and response tokens after the end


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class _ProgramKey:
    """Everything a compiled prefill/decode pair depends on (all hashable)."""

    graphdef: Any
    state_treedef: Any
    state_avals: tuple
    key_aval: tuple
    num_prompts: int  # G, the bucketed prompt batch
    prompt_len: int  # P, the bucketed prompt length
    n: int
    max_new_tokens: int
    greedy: bool
    top_k: int
    use_top_p: bool
    num_stop_slots: int  # stop ids are an input array, padded with -1 to a power of two (>= 8)


@dataclasses.dataclass
class _Programs:
    prefill: Any = None
    decode: Any = None


class Sampler:
    """Holds the compiled prefill/decode programs across calls; one per training run.

    `sampler.generate(model_or_(graphdef, state), prompts, ...)` every step; new prompt lengths
    and batch sizes reuse a program as long as they fall into the same buckets.
    """

    def __init__(self, mesh: Mesh | None = None, *, min_prompt_bucket: int = 16, min_batch_bucket: int = 1):
        self.mesh = mesh
        self.min_prompt_bucket = int(min_prompt_bucket)
        self.min_batch_bucket = int(min_batch_bucket)
        self._programs: dict[_ProgramKey, _Programs] = {}
        self._num_compilations = 0
        self.last_stats: dict[str, Any] = {}

    @property
    def num_compilations(self) -> int:
        """Number of XLA programs this sampler has compiled (a prefill and a decode per shape key)."""
        return self._num_compilations

    @property
    def data_parallel_size(self) -> int:
        """How many shards the batch rows are split into on the mesh (1 without a mesh)."""
        if self.mesh is None:
            return 1
        spec = logical_to_spec(("batch",), self.mesh)[0]
        axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
        return math.prod(self.mesh.shape[a] for a in axes)

    def buckets(self, num_prompts: int, max_prompt_len: int) -> tuple[int, int]:
        """(bucketed prompt batch G, bucketed prompt length P) for a call."""
        batch = _round_up(_next_pow2(max(num_prompts, self.min_batch_bucket)), self.data_parallel_size)
        length = max(self.min_prompt_bucket, _next_pow2(max_prompt_len))
        return batch, length

    # ------------------------------------------------------------------ the call

    def generate(self, model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, n: int = 1,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 stop_token_ids: Sequence[int] = (), key: jax.Array) -> Rollouts:
        """Samples n responses for each prompt (lists of token ids, any lengths). See `Rollouts`.

        model: a `Qwen2ForCausalLM` or its `(graphdef, state)` from `nnx.split`. temperature 0 is
        greedy; top_k 0 and top_p 1 switch those filters off. The same key gives the same tokens
        (also across meshes and batch buckets: row r of step t draws with
        `fold_in(fold_in(key, t), r)`).
        """
        graphdef, state = nnx.split(model) if isinstance(model, nnx.Module) else model
        config = nnx.merge(graphdef, state).config
        vocab = config.vocab_size
        _check_args(prompts, max_new_tokens, n, temperature, top_p, top_k, vocab)
        greedy = temperature == 0
        top_k = 0 if greedy or top_k >= vocab else int(top_k)
        use_top_p = (not greedy) and top_p < 1.0
        stop_set = sorted({int(t) for t in stop_token_ids})
        stop_ids = np.full(max(8, _next_pow2(len(stop_set))), -1, np.int32)
        stop_ids[: len(stop_set)] = stop_set

        num_prompts = len(prompts)
        batch, length = self.buckets(num_prompts, max(len(p) for p in prompts))
        prompt_ids = np.full((batch, length), PAD_ID, np.int32)
        prompt_mask = np.zeros((batch, length), np.int32)
        for i, prompt in enumerate(prompts):
            prompt_ids[i, length - len(prompt):] = np.asarray(prompt, np.int32)
            prompt_mask[i, length - len(prompt):] = 1
        host_prompt_ids, host_prompt_mask = prompt_ids, prompt_mask
        rows, real_rows = batch * n, num_prompts * n
        active = np.arange(rows) < real_rows

        scalars = (np.float32(temperature if not greedy else 1.0), np.float32(top_p))
        if self.mesh is not None:
            # Global arrays on every process (multi-host: each process feeds only its devices' rows).
            state = shard_state(state, self.mesh)
            key, stop_ids, scalars = put_replicated((key, stop_ids, scalars), self.mesh)
            prompt_ids, prompt_mask, active = put_rows((prompt_ids, prompt_mask, active), self.mesh)

        program_key = _ProgramKey(
            graphdef=graphdef,
            state_treedef=jax.tree.structure(state),
            state_avals=tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(state)),
            key_aval=(tuple(key.shape), str(key.dtype)),
            num_prompts=batch, prompt_len=length, n=n, max_new_tokens=max_new_tokens,
            greedy=greedy, top_k=top_k, use_top_p=use_top_p, num_stop_slots=len(stop_ids),
        )
        programs = self._programs.setdefault(program_key, _Programs())

        start, compile_seconds = time.perf_counter(), 0.0
        prefill_args = (state, prompt_ids, prompt_mask, key, *scalars)
        if programs.prefill is None:
            compile_start = time.perf_counter()
            programs.prefill = self._compile(_prefill_fn(program_key), prefill_args,
                                             self._prefill_shardings(config, state, program_key), donate=())
            compile_seconds += time.perf_counter() - compile_start
        cache, first_tokens, first_logprobs = programs.prefill(*prefill_args)

        decode_args = (state, cache, first_tokens, first_logprobs, active, stop_ids, key, *scalars)
        if programs.decode is None:
            compile_start = time.perf_counter()
            decode_fn = _decode_fn(program_key, self._cache_shardings(config, program_key))
            programs.decode = self._compile(decode_fn, decode_args, self._decode_shardings(config, state, program_key),
                                            donate=(1,))
            compile_seconds += time.perf_counter() - compile_start
        tokens, logprobs, lengths, finished, steps, cache = programs.decode(*decode_args)
        del cache  # donated in, handed back, dropped
        tokens, logprobs, lengths, finished, steps = to_host((tokens, logprobs, lengths, finished, steps))
        seconds = time.perf_counter() - start - compile_seconds

        tokens, logprobs = tokens[:real_rows], logprobs[:real_rows]
        lengths, finished = lengths[:real_rows], finished[:real_rows]
        response_mask = (np.arange(max_new_tokens)[None, :] < lengths[:, None]).astype(np.int32)
        self.last_stats = dict(prompt_batch_bucket=batch, prompt_len_bucket=length, rows=rows,
                               decode_steps=int(steps), seconds=seconds, compile_seconds=compile_seconds,
                               new_tokens=int(lengths.sum()))
        return Rollouts(
            tokens=tokens.astype(np.int32),
            response_mask=response_mask,
            logprobs=np.where(response_mask > 0, logprobs, 0.0).astype(np.float32),
            lengths=lengths.astype(np.int32),
            finished=finished.astype(bool),
            prompt_tokens=np.repeat(host_prompt_ids[:num_prompts], n, axis=0),
            prompt_mask=np.repeat(host_prompt_mask[:num_prompts], n, axis=0),
            prompt_index=np.repeat(np.arange(num_prompts, dtype=np.int32), n),
            n=n,
            temperature=float(temperature),
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

    def _cache_shardings(self, config, key: _ProgramKey) -> KVCache | None:
        if self.mesh is None:
            return None
        shapes = KVCache.shapes(config, key.num_prompts * key.n, key.prompt_len + key.max_new_tokens)
        return KVCache(**{f: named_sharding(self.mesh, KVCache.LOGICAL_AXES[f], shapes[f]) for f in shapes})

    def _prefill_shardings(self, config, state, key: _ProgramKey):
        if self.mesh is None:
            return None
        mesh, rows = self.mesh, batch_sharding(self.mesh, 1)
        rep = replicated(mesh)
        ins = (state_shardings(state, mesh), batch_sharding(mesh, 2), batch_sharding(mesh, 2), rep, rep, rep)
        outs = (self._cache_shardings(config, key), rows, rows)
        return ins, outs

    def _decode_shardings(self, config, state, key: _ProgramKey):
        if self.mesh is None:
            return None
        mesh, rows = self.mesh, batch_sharding(self.mesh, 1)
        rep = replicated(mesh)
        cache = self._cache_shardings(config, key)
        ins = (state_shardings(state, mesh), cache, rows, rows, rows, rep, rep, rep, rep)
        outs = (batch_sharding(mesh, 2), batch_sharding(mesh, 2), rows, rows, rep, cache)
        return ins, outs


# ---------------------------------------------------------------------- the programs


def _constrain(tree, shardings):
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


def _prefill_fn(key: _ProgramKey):
    n, new_tokens = key.n, key.max_new_tokens

    def prefill(state, prompt_ids, prompt_mask, rng, temperature, top_p):
        model = nnx.merge(key.graphdef, state)
        batch, length = prompt_ids.shape
        cache = KVCache.init(model.config, batch, length)
        hidden, cache = model.hidden_states(prompt_ids, prompt_mask, cache)
        logits = model.logits_from_hidden(hidden[:, -1:])[:, 0]  # left padding: the last slot is real
        repeat = lambda x, axis: jnp.repeat(x, n, axis=axis)
        pad_slots = lambda x, field: jnp.pad(
            x, [(0, new_tokens if axis == "cache_seq" else 0) for axis in KVCache.LOGICAL_AXES[field]])
        cache = KVCache(
            k=pad_slots(repeat(cache.k, 1), "k"),
            v=pad_slots(repeat(cache.v, 1), "v"),
            valid=pad_slots(repeat(cache.valid, 0), "valid"),
            next_position=repeat(cache.next_position, 0),
            end=cache.end,
        )
        rows = batch * n
        tokens, logprobs = strategies.sample(
            repeat(logits, 0), strategies.row_keys(rng, 0, rows), temperature, top_p,
            greedy=key.greedy, top_k=key.top_k, use_top_p=key.use_top_p)
        return cache, tokens, logprobs

    return prefill


def _decode_fn(key: _ProgramKey, cache_shardings: KVCache | None):
    new_tokens = key.max_new_tokens

    def decode(state, cache, first_tokens, first_logprobs, active, stop_ids, rng, temperature, top_p):
        is_stop = lambda tokens: (tokens[:, None] == stop_ids[None, :]).any(axis=-1)
        model = nnx.merge(key.graphdef, state)
        rows = first_tokens.shape[0]
        tokens = jnp.full((rows, new_tokens), PAD_ID, jnp.int32).at[:, 0].set(jnp.where(active, first_tokens, PAD_ID))
        logprobs = jnp.zeros((rows, new_tokens), jnp.float32).at[:, 0].set(jnp.where(active, first_logprobs, 0.0))
        finished = active & is_stop(first_tokens)
        init = (jnp.int32(1), cache, first_tokens, tokens, logprobs, active.astype(jnp.int32), finished,
                ~active | finished)

        def cond(carry):
            step, done = carry[0], carry[-1]
            return (step < new_tokens) & ~jnp.all(done)

        def body(carry):
            step, cache, last, tokens, logprobs, lengths, finished, done = carry
            logits, cache = model.forward_with_cache(last[:, None], jnp.ones((rows, 1), bool), cache)
            new, new_logprobs = strategies.sample(
                logits[:, 0], strategies.row_keys(rng, step, rows), temperature, top_p,
                greedy=key.greedy, top_k=key.top_k, use_top_p=key.use_top_p)
            live = ~done
            tokens = jax.lax.dynamic_update_slice(tokens, jnp.where(live, new, PAD_ID)[:, None], (0, step))
            logprobs = jax.lax.dynamic_update_slice(logprobs, jnp.where(live, new_logprobs, 0.0)[:, None], (0, step))
            stopped = live & is_stop(new)
            return (step + 1, _constrain(cache, cache_shardings), new, tokens, logprobs,
                    lengths + live.astype(jnp.int32), finished | stopped, done | stopped)

        step, cache, _, tokens, logprobs, lengths, finished, _ = jax.lax.while_loop(cond, body, init)
        return tokens, logprobs, lengths, finished, step, cache

    return decode


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
             stop_token_ids: Sequence[int] = (), key: jax.Array, mesh: Mesh | None = None) -> Rollouts:
    """One-shot convenience: `Sampler(mesh).generate(...)` (compiles every call; a training loop
    should keep one `Sampler`)."""
    return Sampler(mesh).generate(
        model, prompts, max_new_tokens=max_new_tokens, n=n, temperature=temperature, top_p=top_p,
        top_k=top_k, stop_token_ids=stop_token_ids, key=key)
