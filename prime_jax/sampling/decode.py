"""Slot decoding: K decode slots work through a queue of B rows inside jitted programs.

The two programs a `Sampler` compiles per shape key:

1. **prefill** runs the G prompts once, keeps their keys/values (`DecodeState.prompt_*`), samples
   every row's first token and returns a `DecodeState` whose K slots are all idle.
2. **decode** hands queued rows to idle slots (`refill`: the row's prompt keys/values are copied
   into the slot, so a prompt is prefilled once and shared by its n samples), then runs
   `lax.while_loop` steps: one token for every live slot, written into the row's place of the
   `[B, R]` outputs. Each layer's weights are sliced out of the stacked parameters once, before
   the loop (`Qwen2ForCausalLM.layer_params`), so a step reads them in place. A slot whose row
   stops (stop token or R tokens) goes idle; with `refill_in_loop` the loop refills idle slots
   after every step (only when a slot is idle and rows wait), else the program returns when
   `stop_at` steps are reached or no slot is live and the next call refills. The loop also
   returns at `stop_at`, so a caller can stream finished groups out between calls; the state is
   donated and carried on.

K = B (one slot per row) is the static batch: every row starts at once and nothing is refilled
(`DecodeSpec.static`: a step writes one column of the outputs and folds the step into the keys once,
and the prompts are not copied into the slots: a prompt's n rows attend its prefilled keys/values as
one group, which reads them once instead of n times).

Determinism: row r's token t is drawn with `fold_in(fold_in(key, t), row_id[r])` from logits that
do not depend on which slot decodes it or on K (a slot's cache columns hold exactly its row's
prompt and response, and `models.qwen2.decode_attention` is blockwise exact under extra masked
blocks), so the same call with any K gives the same tokens; log-probs agree to float rounding
(a backend's matmul may round differently for another number of rows per step, and the static
batch sums a row's prompt part and its response part of the attention as two blocks where slots
hold them in one cache), so a token could only differ where its draw is within rounding of a tie.

Sharding: rows, prompts and slots are split over the data axes (logical `batch`). The queue is kept
per data shard (D shards, `queue_head`/`queue_end` `[D]`): shard d's slots only take shard d's rows,
so every gather and scatter between slots, rows and prompts is local (`_per_shard` views arrays as
`[D, local]` and vmaps over D). The sampler spreads the real prompts evenly over the shards.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from prime_jax.models.qwen2 import KVCache
from prime_jax.sampling import strategies

PAD_ID = 0  # prompt left-padding and response tokens after the end


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """What the decode loop carries. B rows (G prompts x n), K slots, P prompt columns (bucket),
    S cache columns per slot (>= P + R; static batch: >= R), R new tokens per row, D data shards;
    L, Kv, H: layers, kv heads, head size.

    cache: the slots' `KVCache` (per layer, S / C blocks: k `[K, Kv, H, C]`, v `[K, Kv, C, H]`;
        valid `[K, S]`, next_position `[K]`, end `[K]`); a slot's prompt sits in columns `[0, P)` and
        its response from P on; an idle slot's `end` is 0, so it does not lengthen the attention read.
        The static batch's cache holds only the responses (S >= R): its rows attend their prompt
        in `prompt_k`/`prompt_v` first, read once for a prompt's n rows.
    prompt_k, prompt_v: the prefilled prompts' keys `[G, Kv, H, P]` and values `[G, Kv, P, H]`, per
        layer (one block each, as a `KVCache`'s); prompt_valid `[G, P]` bool, prompt_length `[G]`
        int32: copied into a slot's first columns when it takes a row.
    row_id `[B]` int32: the row's index in the caller's order (the sampling key's row).
    tokens `[B, R]` int32, logprobs `[B, R]` float32: the responses, written in place.
    lengths `[B]` int32: tokens sampled so far; finished `[B]` bool: ended by a stop token;
        done `[B]` bool: nothing more to sample (stopped, R tokens, or a padding row).
    slot_row `[K]` int32: the row a slot decodes, as an index within its shard's rows (-1: none);
        slot_live `[K]` bool: the slot's row is still being decoded; last_token `[K]` int32: the
        token to feed next; slot_length `[K]` int32: tokens its row has so far.
    queue_head `[D]` int32: the next waiting row of each shard (local index); queue_end `[D]` int32:
        how many real rows each shard has (they are the first of its rows).
    step `[]` int32: decode steps run; busy `[]` int32: live slot-steps (utilisation numerator).
    """

    cache: KVCache
    prompt_k: jax.Array
    prompt_v: jax.Array
    prompt_valid: jax.Array
    prompt_length: jax.Array
    row_id: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    finished: jax.Array
    done: jax.Array
    slot_row: jax.Array
    slot_live: jax.Array
    last_token: jax.Array
    slot_length: jax.Array
    queue_head: jax.Array
    queue_end: jax.Array
    step: jax.Array
    busy: jax.Array

    # Logical axes of every field but `cache` (see `KVCache.LOGICAL_AXES`): rows, prompts, slots
    # and queue shards all lie along `batch`, split over the data axes.
    LOGICAL_AXES = {
        "prompt_k": KVCache.LOGICAL_AXES["k"], "prompt_v": KVCache.LOGICAL_AXES["v"],
        "prompt_valid": ("batch", "cache_seq"), "prompt_length": ("batch",), "row_id": ("batch",),
        "tokens": ("batch", None), "logprobs": ("batch", None), "lengths": ("batch",),
        "finished": ("batch",), "done": ("batch",), "slot_row": ("batch",), "slot_live": ("batch",),
        "last_token": ("batch",), "slot_length": ("batch",), "queue_head": ("batch",),
        "queue_end": ("batch",), "step": (), "busy": (),
    }

    @property
    def num_shards(self) -> int:
        return self.queue_head.shape[0]


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """The static settings both programs are built for (hashable)."""

    graphdef: object
    n: int
    max_new_tokens: int
    num_slots: int  # K
    capacity: int  # S
    block: int  # cache block (divides S)
    shards: int  # D
    greedy: bool
    top_k: int
    use_top_p: bool
    refill_in_loop: bool
    # K = B: slot i decodes row i from the first step to its end and nothing is refilled, so every
    # live row is at the same position and a step writes one column (`decode_step`'s fast path)
    static: bool = False


def _per_shard(fn: Callable, shards: int, *arrays):
    """Applies `fn` to each shard's slice: every array's leading axis is viewed as `[D, local]` and
    `fn` is vmapped over D; results come back with the two axes merged again. One shard: `fn` on
    the arrays themselves (a size-1 vmap turns gathers and scatters into slower batched ones)."""
    if shards == 1:
        return fn(*arrays)
    out = jax.vmap(fn)(*(x.reshape((shards, -1) + x.shape[1:]) for x in arrays))
    return jax.tree.map(lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), out)


def _sample(spec: DecodeSpec, logits, keys, temperature, top_p):
    return strategies.sample(logits, keys, temperature, top_p, greedy=spec.greedy, top_k=spec.top_k,
                             use_top_p=spec.use_top_p)


def _is_stop(tokens, stop_ids):
    return (tokens[:, None] == stop_ids[None, :]).any(axis=-1)


def prefill_fn(spec: DecodeSpec) -> Callable:
    """`(params, prompt_ids [G, P], prompt_mask [G, P], row_id [B], active [B], stop_ids, key,
    temperature, top_p) -> DecodeState` with every slot idle (the first decode call fills them)."""
    n, new_tokens = spec.n, spec.max_new_tokens

    def prefill(state, prompt_ids, prompt_mask, row_id, active, stop_ids, rng, temperature, top_p):
        model = nnx.merge(spec.graphdef, state)
        num_prompts, prompt_len = prompt_ids.shape
        prompt_cache = KVCache.init(model.config, num_prompts, prompt_len, block=prompt_len)  # one block
        hidden, prompt_cache = model.hidden_states(prompt_ids, prompt_mask, prompt_cache)
        logits = model.logits_from_hidden(hidden[:, -1:])[:, 0]  # left padding: the last column is real
        rows = num_prompts * n
        first, first_logprobs = _sample(spec, jnp.repeat(logits, n, axis=0),
                                        strategies.keys_for(rng, jnp.zeros(rows, jnp.int32), row_id),
                                        temperature, top_p)
        finished = active & _is_stop(first, stop_ids)
        tokens = jnp.full((rows, new_tokens), PAD_ID, jnp.int32).at[:, 0].set(jnp.where(active, first, PAD_ID))
        logprobs = jnp.zeros((rows, new_tokens), jnp.float32).at[:, 0].set(jnp.where(active, first_logprobs, 0.0))
        slots, shards = spec.num_slots, spec.shards
        return DecodeState(
            cache=KVCache.init(model.config, slots, spec.capacity, dtype=prompt_cache.k[0][0].dtype,
                               block=spec.block),
            prompt_k=prompt_cache.k, prompt_v=prompt_cache.v, prompt_valid=prompt_cache.valid,
            prompt_length=prompt_cache.next_position, row_id=row_id, tokens=tokens, logprobs=logprobs,
            lengths=active.astype(jnp.int32), finished=finished,
            done=~active | finished | (new_tokens == 1),
            slot_row=jnp.full(slots, -1, jnp.int32), slot_live=jnp.zeros(slots, bool),
            last_token=jnp.zeros(slots, jnp.int32), slot_length=jnp.zeros(slots, jnp.int32),
            queue_head=jnp.zeros(shards, jnp.int32),
            queue_end=active.reshape(shards, rows // shards).sum(axis=1, dtype=jnp.int32),
            step=jnp.int32(0), busy=jnp.int32(0))

    return prefill


def refill(spec: DecodeSpec, s: DecodeState) -> DecodeState:
    """Gives each idle slot the next waiting row of its shard, in row order, and copies that row's
    prompt keys/values, mask and position into the slot (columns `[0, P)`); its first token (from
    prefill) is fed next. Rows already done (a stop token first) take a slot for no step. The static
    batch copies nothing: its rows read their prompt from `prompt_k`/`prompt_v` (`decode_step`)."""
    n = spec.n
    prompt_len = 0 if spec.static else s.prompt_valid.shape[1]  # prompt columns in a slot's cache

    def one_shard(slot_row, slot_live, head, end, last, slot_length, valid, position, column,
                  first_tokens, done, prompt_valid, prompt_length):
        free = ~slot_live
        wanted = head + jnp.cumsum(free) - 1
        take = free & (wanted < end)
        row = jnp.clip(wanted, 0, first_tokens.shape[0] - 1)
        prompt = row // n
        live = slot_live | (take & ~done[row])
        new_valid = jnp.zeros_like(valid).at[:, :prompt_len].set(prompt_valid[prompt][:, :prompt_len])
        return dict(
            slot_row=jnp.where(take, row, jnp.where(free, -1, slot_row)), slot_live=live,
            queue_head=head + take.sum(dtype=jnp.int32), last_token=jnp.where(take, first_tokens[row], last),
            slot_length=jnp.where(take, 1, slot_length), valid=jnp.where(take[:, None], new_valid, valid),
            next_position=jnp.where(take, prompt_length[prompt], position),
            end=jnp.where(live, jnp.where(take, prompt_len, column), 0),
            take=take, prompt=prompt)

    out = _per_shard(one_shard, spec.shards, s.slot_row, s.slot_live, s.queue_head, s.queue_end, s.last_token,
                     s.slot_length, s.cache.valid, s.cache.next_position, s.cache.end, s.tokens[:, 0], s.done,
                     s.prompt_valid, s.prompt_length)
    take, prompt = out.pop("take"), out.pop("prompt")  # prompt: local index within the shard

    def copy_prompt(cache, prompts, column_axis):
        """The taken slots' prompt columns from `prompts` `[G, Kv, ., .]` into the first columns of
        `cache` `[K, Kv, ., .]` (the same block of the slots' cache; columns on `column_axis`)."""
        window = [slice(None)] * cache.ndim
        window[column_axis] = slice(0, prompts.shape[column_axis])

        def one_shard(cache, prompts, take, prompt):  # cache [Kl, ...], prompts [Gl, ...]
            # A select written back with dynamic_update_slice. XLA copies the (K-row) block for it,
            # but on CPU that is ~1.6x faster per refill than a scatter.
            new = jnp.where(take.reshape((-1,) + (1,) * (cache.ndim - 1)), prompts[prompt], cache[tuple(window)])
            return jax.lax.dynamic_update_slice(cache, new, (0,) * cache.ndim)

        split = lambda x: x.reshape((spec.shards, -1) + x.shape[1:])
        out = jax.vmap(one_shard)(split(cache), split(prompts), split(take), split(prompt))
        return out.reshape(cache.shape)

    def copy_layer(blocks, prompt_blocks, column_axis):  # prompt columns [i C, (i + 1) C) into slot block i
        (prompts,) = prompt_blocks
        size = blocks[0].shape[column_axis]
        return tuple(block if i * size >= prompt_len else copy_prompt(
            block, jax.lax.slice_in_dim(prompts, i * size, min((i + 1) * size, prompt_len), axis=column_axis),
            column_axis) for i, block in enumerate(blocks))

    k, v = s.cache.k, s.cache.v
    if not spec.static:
        k = tuple(copy_layer(blocks, prompts, 3) for blocks, prompts in zip(k, s.prompt_k))
        v = tuple(copy_layer(blocks, prompts, 2) for blocks, prompts in zip(v, s.prompt_v))
    cache = KVCache(k=k, v=v, valid=out.pop("valid"), next_position=out.pop("next_position"), end=out.pop("end"))
    return dataclasses.replace(s, cache=cache, **out)


def decode_step(spec: DecodeSpec, model, layer_params, s: DecodeState, stop_ids, rng, temperature, top_p
                ) -> DecodeState:
    """One token for every live slot: feed `last_token`, sample with the row's key, write the token
    into the row's outputs, and retire slots whose row stopped or reached R tokens. `layer_params`:
    `model.layer_params()`, taken once outside the decode loop."""
    slots, prefix = spec.num_slots, None
    if spec.static:  # the n rows of a prompt read its keys/values once, from the prefill's cache
        prefix = KVCache(k=s.prompt_k, v=s.prompt_v, valid=s.prompt_valid, next_position=s.prompt_length,
                         end=jnp.full_like(s.prompt_length, s.prompt_valid.shape[1]))
    logits, cache = model.forward_with_cache(s.last_token[:, None], jnp.ones((slots, 1), bool), s.cache,
                                             layer_params, prefix)
    if spec.static:  # slot = row, and every live row's next token is token `step + 1`: the same keys
        keys = strategies.row_keys_at(rng, s.step + 1, s.row_id)
    else:
        slot_row_id = _per_shard(lambda row_id, slot_row: row_id[jnp.maximum(slot_row, 0)], spec.shards,
                                 s.row_id, s.slot_row)
        keys = strategies.keys_for(rng, s.slot_length, slot_row_id)
    new, new_logprobs = _sample(spec, logits[:, 0], keys, temperature, top_p)
    live = s.slot_live
    stopped = live & _is_stop(new, stop_ids)
    length = s.slot_length + live.astype(jnp.int32)
    still_live = live & ~stopped & (length < spec.max_new_tokens)
    if spec.static:
        rows = _write_column(s, s.step + 1, live, new, new_logprobs, stopped, length, still_live)
    else:
        rows = _per_shard(_write_rows, spec.shards, s.tokens, s.logprobs, s.lengths, s.finished, s.done,
                          s.slot_row, live, s.slot_length, new, new_logprobs, stopped, length, still_live)
    cache = dataclasses.replace(cache, end=jnp.where(still_live, cache.end, 0))
    return dataclasses.replace(
        s, cache=cache, slot_live=still_live, last_token=new, slot_length=length, step=s.step + 1,
        busy=s.busy + live.sum(dtype=jnp.int32), **rows)


def _write_rows(tokens, logprobs, lengths, finished, done, slot_row, live, slot_length, new, new_logprobs,
                stopped, length, still_live) -> dict:
    """Each live slot's new token into its row's outputs (one shard: `slot_row` indexes its rows)."""
    target = jnp.where(live, slot_row, tokens.shape[0])  # idle slots write nowhere
    return dict(
        tokens=tokens.at[target, slot_length].set(new, mode="drop"),
        logprobs=logprobs.at[target, slot_length].set(new_logprobs, mode="drop"),
        lengths=lengths.at[target].set(length, mode="drop"),
        finished=finished.at[target].set(stopped, mode="drop"),
        done=done.at[target].set(~still_live, mode="drop"))


def _write_column(s: DecodeState, column, live, new, new_logprobs, stopped, length, still_live) -> dict:
    """`_write_rows` for the static batch (slot i = row i, every live row at `column`): one column
    update; rows that are not live keep their values (their `column` entries are still padding)."""
    new = jnp.where(live, new, PAD_ID)
    return dict(
        tokens=jax.lax.dynamic_update_slice(s.tokens, new[:, None], (0, column)),
        logprobs=jax.lax.dynamic_update_slice(s.logprobs, jnp.where(live, new_logprobs, 0.0)[:, None], (0, column)),
        lengths=jnp.where(live, length, s.lengths), finished=jnp.where(live, stopped, s.finished),
        done=jnp.where(live, ~still_live, s.done))


def decode_fn(spec: DecodeSpec, constrain_state: Callable[[DecodeState], DecodeState]) -> Callable:
    """`(params, DecodeState, stop_ids, key, temperature, top_p, stop_at []) -> DecodeState`: refill,
    then decode until no row is left or `step == stop_at`. `constrain_state` pins the loop carry's
    sharding (identity without a mesh)."""

    def decode(state, s: DecodeState, stop_ids, rng, temperature, top_p, stop_at):
        model = nnx.merge(spec.graphdef, state)
        layer_params = model.layer_params()  # sliced once per call: in the loop, every step would copy them
        waiting = lambda s: jnp.any(s.queue_head < s.queue_end)

        def cond(s):
            work = jnp.any(s.slot_live) | (waiting(s) if spec.refill_in_loop and not spec.static else False)
            return (s.step < stop_at) & work

        def body(s):
            s = decode_step(spec, model, layer_params, s, stop_ids, rng, temperature, top_p)
            if spec.refill_in_loop and not spec.static:  # run once or never (a `cond` would copy the cache)
                needed = jnp.any(~s.slot_live) & waiting(s)
                s, _ = jax.lax.while_loop(lambda c: c[1], lambda c: (refill(spec, c[0]), False), (s, needed))
            return constrain_state(s)

        return jax.lax.while_loop(cond, body, constrain_state(refill(spec, s)))

    return decode
