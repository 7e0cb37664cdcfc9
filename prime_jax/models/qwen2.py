"""Qwen2 / Qwen2.5 and Llama-family decoder in Flax NNX.

The architecture matches Hugging Face's `Qwen2ForCausalLM` and `LlamaForCausalLM` (the config's
`model_type`): token embedding, RMSNorm, rotary position embeddings, grouped-query attention with
q/k/v biases for Qwen2 and none for Llama (`config.attention_bias`; never an o bias), SwiGLU MLP,
tied or untied LM head. Layers are stored stacked (leading `layers` axis) and run with `lax.scan`, so
compile time does not grow with depth. Every parameter names its logical axes; `parallel/`
maps them to the mesh.

Shapes: B batch, T new tokens, S cache slots, D hidden, N query heads, K kv heads, H head size,
F MLP width, V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from prime_jax.models.config import Qwen2Config
from prime_jax.parallel import constrain

_INIT_STD = 0.02  # transformers' `initializer_range` default


def _param(rngs: nnx.Rngs, shape, logical_axes, dtype, init: str = "normal") -> nnx.Param:
    if init == "normal":
        value = _INIT_STD * jax.random.normal(rngs.params(), shape, dtype=jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:  # ones
        value = jnp.ones(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=tuple(logical_axes))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for B rows and S slots, filled left to right.

    k: `[L, B, K, S, H]` and v: `[L, B, K, H, S]`, so that both attention products of a decode step
    contract the minor axes of contiguous per-(row, kv head) blocks, the layout small-matrix
    kernels want (on CPU the `[L, B, S, K, H]` layout spent over half of each decode step copying
    and transposing every layer's keys and values); valid: `[B, S]` bool, slot holds a real (non-padding) token;
    next_position: `[B]` int32, RoPE position of each row's next token; end: `[]` int32, first
    free slot per row, `[B]` int32.

    A chunk of T > 1 tokens (prefill) is written at a column shared by all rows (`end[0]`: prompts
    are left-padded to a common length). A single token (T = 1, decoding) is written at each row's
    own `end`, so rows at different lengths (the sampler's decode slots) share one cache, and
    attention reads only the columns up to the longest row (`decode_attention`).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    next_position: jax.Array
    end: jax.Array

    @classmethod
    def init(cls, config: Qwen2Config, batch_size: int, max_len: int, dtype=None) -> "KVCache":
        dtype = dtype or config.compute_dtype
        shapes = cls.shapes(config, batch_size, max_len)
        return cls(
            k=jnp.zeros(shapes["k"], dtype),
            v=jnp.zeros(shapes["v"], dtype),
            valid=jnp.zeros(shapes["valid"], bool),
            next_position=jnp.zeros(shapes["next_position"], jnp.int32),
            end=jnp.zeros(shapes["end"], jnp.int32),
        )

    @classmethod
    def shapes(cls, config: Qwen2Config, batch_size: int, max_len: int) -> dict[str, tuple[int, ...]]:
        """The shape of every field for B = `batch_size` rows and S = `max_len` slots (its layout is
        `LOGICAL_AXES`)."""
        sizes = {"layers": config.num_hidden_layers, "batch": batch_size, "kv_heads": config.num_key_value_heads,
                 "cache_seq": max_len, "head_dim": config.head_size}
        return {field: tuple(sizes[axis] for axis in axes) for field, axes in cls.LOGICAL_AXES.items()}

    # Logical axes of each field, in order: the layout, and the names `parallel.named_sharding` maps.
    LOGICAL_AXES = {
        "k": ("layers", "batch", "kv_heads", "cache_seq", "head_dim"),
        "v": ("layers", "batch", "kv_heads", "head_dim", "cache_seq"),
        "valid": ("batch", "cache_seq"),
        "next_position": ("batch",),
        "end": ("batch",),
    }


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype) -> jax.Array:
    """RMSNorm in float32, as transformers does; `[..., D]` -> `[..., D]` in `dtype`."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * normed).astype(dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (rotate-half convention). x `[B, T, heads, H]`, positions `[B, T]`."""
    head_size = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_size, 2, dtype=jnp.float32) / head_size))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


# Columns per block of a decode step's attention read: a step reads ceil(longest row / block)
# blocks, so its cost follows the live rows, not the cache's capacity. 128 columns keep the
# per-block loop overhead small next to the block's two products on CPU and accelerators alike.
DECODE_BLOCK = 128


def decode_block_size(capacity: int, block: int | None = None) -> int:
    """The block a cache of `capacity` columns is read in: `block` (default `DECODE_BLOCK`) when it
    divides the capacity, else the whole capacity in one block (a block must never straddle the end:
    `dynamic_slice` would clamp it back over columns already read)."""
    block = block or DECODE_BLOCK
    return block if capacity % block == 0 else capacity


def decode_attention(q: jax.Array, k_all: jax.Array, v_all: jax.Array, layer, valid: jax.Array,
                     num_columns, scale: float, block: int) -> jax.Array:
    """Attention of one new token per row over columns `[0, num_columns)` of one layer's cache.

    q `[B, N, H]`; k_all `[L, B, K, S, H]` and v_all `[L, B, K, H, S]` (all layers: only this
    `layer`'s blocks are sliced out, never the whole layer); valid `[B, S]`; num_columns `[]` traced,
    rounded up to whole blocks of `block` columns (which must divide S). Online softmax over the
    blocks in float32 (running max, sum and weighted values), so a block that is fully masked for a
    row leaves that row's result bit for bit unchanged: a row's output does not depend on how many
    blocks the longest row in the batch needs. Returns `[B, N, H]` in q's dtype.
    """
    batch, heads, head_size = q.shape
    kv_heads = k_all.shape[2]
    q = q.reshape(batch, kv_heads, heads // kv_heads, head_size)
    num_blocks = (num_columns + block - 1) // block

    def one_block(j, carry):
        running_max, total, acc = carry
        start = j * block
        k = jax.lax.dynamic_slice(k_all, (layer, 0, 0, start, 0), (1, batch, kv_heads, block, head_size))[0]
        v = jax.lax.dynamic_slice(v_all, (layer, 0, 0, 0, start), (1, batch, kv_heads, head_size, block))[0]
        mask = jax.lax.dynamic_slice_in_dim(valid, start, block, axis=1)[:, None, None, :]  # [B, 1, 1, block]
        scores = jnp.einsum("bkgh,bksh->bkgs", q, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        correction = jnp.exp(running_max - new_max)
        probs = jnp.exp(scores - new_max[..., None])
        total = total * correction + probs.sum(axis=-1)
        values = jnp.einsum("bkgs,bkhs->bkgh", probs.astype(q.dtype), v.astype(q.dtype),
                            preferred_element_type=jnp.float32)
        return new_max, total, acc * correction[..., None] + values

    shape = (batch, kv_heads, heads // kv_heads)
    carry = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
             jnp.zeros((*shape, head_size), jnp.float32))
    if k_all.shape[3] == block:  # a single block: no loop (its overhead is most of a small step on CPU)
        carry = one_block(0, carry)
    else:
        carry = jax.lax.fori_loop(0, num_blocks, one_block, carry)
    _, total, acc = carry
    return (acc / total[..., None]).astype(q.dtype).reshape(batch, heads, head_size)


def _write_rows(cache: jax.Array, new: jax.Array, layer, columns: jax.Array, column_axis: int) -> jax.Array:
    """Writes `new` `[B, K, H]` (one token per row) into the stacked cache `[L, B, ...]` at `layer`
    and each row's own column (`columns` `[B]`, on `column_axis` of the cache), in place.

    One scatter with the row index as an iota: as fast as the shared-column `dynamic_update_slice`
    on CPU, where a vmapped `dynamic_update_slice` made XLA copy the cache every layer (4x slower).
    """
    rows = jnp.arange(cache.shape[1])
    index = [layer, rows, slice(None), slice(None), slice(None)]
    index[column_axis] = columns
    return cache.at[tuple(index)].set(new.astype(cache.dtype))


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Grouped-query attention over one layer of the cache; the result is `[B, T, N, H]`.

    q `[B, T, N, H]` (query head n reads kv head n // (N / K), as transformers' `repeat_kv`),
    k `[B, K, S, H]`, v `[B, K, H, S]`, mask `[B, 1, T, S]`. Scores and softmax in float32.
    """
    batch, length, heads, head_size = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_size)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)  # mask as [B, 1, 1, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bkhs->btkgh", probs, v)
    return out.reshape(batch, length, heads, head_size)


class DecoderLayers(nnx.Module):
    """All L decoder layers, parameters stacked on a leading `layers` axis.

    `Qwen2ForCausalLM` scans over the stack and hands `__call__` one layer's slice at a time.
    """

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        c = config
        L, D, F = c.num_hidden_layers, c.hidden_size, c.intermediate_size
        N, K, H = c.num_attention_heads, c.num_key_value_heads, c.head_size
        p = lambda shape, axes, init="normal": _param(rngs, (L, *shape), ("layers", *axes), c.weight_dtype, init)
        self.config = config
        self.input_norm = p((D,), ("norm",), "ones")
        bias = lambda shape, axes: p(shape, axes, "zeros") if c.attention_bias else None  # Llama: none
        self.q_kernel = p((D, N, H), ("embed", "heads", "head_dim"))
        self.q_bias = bias((N, H), ("heads", "head_dim"))
        self.k_kernel = p((D, K, H), ("embed", "kv_heads", "head_dim"))
        self.k_bias = bias((K, H), ("kv_heads", "head_dim"))
        self.v_kernel = p((D, K, H), ("embed", "kv_heads", "head_dim"))
        self.v_bias = bias((K, H), ("kv_heads", "head_dim"))
        self.o_kernel = p((N, H, D), ("heads", "head_dim", "embed"))
        self.post_norm = p((D,), ("norm",), "ones")
        self.gate_kernel = p((D, F), ("embed", "mlp"))
        self.up_kernel = p((D, F), ("embed", "mlp"))
        self.down_kernel = p((F, D), ("mlp", "embed"))

    def __call__(self, x, positions, mask, kv=None, end=None, decode=None):
        """One layer (params already sliced). x `[B, T, D]`, positions `[B, T]`, mask `[B, 1, T, S]`.

        kv: optional (k, v, layer): the stacked cache of all layers (`KVCache` layouts), and this
        layer's index. Only the new keys/values are written, in place, at `[layer, :, end]` (end `[]`);
        attention reads this layer's slice. decode: optional (valid `[B, S]`, num_columns, block) for
        one token per row (T = 1) written at each row's own column `end` `[B]`, attention read in
        blocks up to `num_columns` (`decode_attention`; `mask` is unused). Returns (x, (k, v)) with
        the updated stacked cache, or (x, None).
        """
        c, dt = self.config, self.config.compute_dtype
        h = rms_norm(x, self.input_norm.get_value(), c.rms_norm_eps, dt)
        def proj(kernel, bias):
            out = jnp.einsum("btd,dnh->btnh", h, kernel.get_value().astype(dt))
            return out if bias is None else out + bias.get_value().astype(dt)

        q = apply_rope(proj(self.q_kernel, self.q_bias), positions, c.rope_theta)
        k = apply_rope(proj(self.k_kernel, self.k_bias), positions, c.rope_theta)
        v = proj(self.v_kernel, self.v_bias)
        scale = 1.0 / math.sqrt(c.head_size)
        if kv is not None and decode is not None:
            k_all, v_all, layer = kv
            valid, num_columns, block = decode
            k_all = _write_rows(k_all, k[:, 0], layer, end, column_axis=3)  # [L, B, K, S, H]
            v_all = _write_rows(v_all, v[:, 0], layer, end, column_axis=4)  # [L, B, K, H, S]
            attn = decode_attention(q[:, 0], k_all, v_all, layer, valid, num_columns, scale, block)[:, None]
            new_kv = (k_all, v_all)
        elif kv is not None:
            k_all, v_all, layer = kv
            # Write this step's keys as [B, K, T, H] and values as [B, K, H, T] at slot `end`.
            k_all = jax.lax.dynamic_update_slice(
                k_all, k.astype(k_all.dtype).transpose(0, 2, 1, 3)[None], (layer, 0, 0, end, 0))
            v_all = jax.lax.dynamic_update_slice(
                v_all, v.astype(v_all.dtype).transpose(0, 2, 3, 1)[None], (layer, 0, 0, 0, end))
            layer_k = jax.lax.dynamic_index_in_dim(k_all, layer, axis=0, keepdims=False).astype(dt)
            layer_v = jax.lax.dynamic_index_in_dim(v_all, layer, axis=0, keepdims=False).astype(dt)
            attn = cached_attention(q, layer_k, layer_v, mask, scale)
            new_kv = (k_all, v_all)
        else:
            attn = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
            new_kv = None
        x = x + jnp.einsum("btnh,nhd->btd", attn, self.o_kernel.get_value().astype(dt)).astype(x.dtype)
        h = rms_norm(x, self.post_norm.get_value(), c.rms_norm_eps, dt)
        gate = jnp.einsum("btd,df->btf", h, self.gate_kernel.get_value().astype(dt))
        up = jnp.einsum("btd,df->btf", h, self.up_kernel.get_value().astype(dt))
        mlp = jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, self.down_kernel.get_value().astype(dt))
        return x + mlp.astype(x.dtype), new_kv


_HIDDEN_AXES = ("batch", "seq", "embed")

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Qwen2ForCausalLM(nnx.Module):
    """`logits = model(input_ids, attention_mask)`: `[B, T]` -> `[B, T, V]` float32."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        c = config
        self.config = config
        self.embed_tokens = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.weight_dtype)
        self.layers = DecoderLayers(config, rngs=rngs)
        self.final_norm = _param(rngs, (c.hidden_size,), ("norm",), c.weight_dtype, "ones")
        if not c.tie_word_embeddings:
            self.lm_head = _param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), c.weight_dtype)

    def output_kernel(self) -> jax.Array:
        """The `[D, V]` output projection (the embedding's transpose when tied), compute dtype."""
        kernel = self.embed_tokens.get_value().T if self.config.tie_word_embeddings else self.lm_head.get_value()
        return kernel.astype(self.config.compute_dtype)

    def hidden_states(self, input_ids, attention_mask=None, cache: KVCache | None = None,
                      decode_block: int | None = None):
        """Final-norm hidden states `[B, T, D]` (compute dtype), and the updated cache (or None).

        attention_mask `[B, T]` marks real tokens (1) vs padding (0); left padding is expected.
        Positions are `cumsum(mask) - 1`, continued from `cache.next_position` when decoding.
        With a cache, T > 1 tokens go to the column all rows share (`cache.end[0]`); T = 1 goes to
        each row's own `cache.end` and attention reads blocks of `decode_block` columns (default
        `DECODE_BLOCK`) up to the longest row, so rows may be at different lengths.
        """
        c, dt = self.config, self.config.compute_dtype
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), bool)
        attention_mask = attention_mask.astype(bool)
        new_positions = jnp.cumsum(attention_mask, axis=1, dtype=jnp.int32) - 1
        decode = None
        if cache is None:
            positions = jnp.maximum(new_positions, 0)
            key_valid, query_slot = attention_mask, jnp.arange(length)
            num_slots, end = length, None
        elif length == 1:  # one token per row, each at its own column
            positions = jnp.maximum(cache.next_position[:, None] + new_positions, 0)
            end = cache.end
            key_valid = jax.vmap(lambda row, column, real: row.at[column].set(real))(
                cache.valid, end, attention_mask[:, 0])
            capacity = cache.valid.shape[1]
            decode = (key_valid, jnp.max(end) + 1, decode_block_size(capacity, decode_block))
        else:
            positions = jnp.maximum(cache.next_position[:, None] + new_positions, 0)
            end = cache.end[0]  # prompts are left-padded to a common length: every row is at the same column
            key_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attention_mask, end, axis=1)
            query_slot = end + jnp.arange(length)
            num_slots = cache.valid.shape[1]
        if decode is None:
            slots = jnp.arange(num_slots)
            causal = slots[None, :] <= query_slot[:, None]  # [T, S]
            own_slot = slots[None, :] == query_slot[:, None]  # padding queries attend to themselves (no NaN)
            mask = ((causal[None] & key_valid[:, None, :]) | own_slot[None])[:, None]  # [B, 1, T, S]
        else:
            mask = None

        x = self.embed_tokens.get_value()[input_ids].astype(dt)
        graphdef, layer_params = nnx.split(self.layers)

        # The stacked cache rides in the scan carry and each layer writes only its new slots in place
        # (as scan inputs/outputs it would be copied whole every step and held twice in memory).
        # Rows stay split over the data axes between layers; without the constraint the compiler
        # follows the FSDP split of the weights and every device computes the whole batch.
        def one_layer(carry, params):
            x, kv, layer = carry
            layer_kv = None if kv is None else (*kv, layer)
            x, kv = nnx.merge(graphdef, params)(constrain(x, _HIDDEN_AXES), positions, mask, layer_kv, end, decode)
            return (constrain(x, _HIDDEN_AXES), kv, layer + 1), None

        if c.remat != "none":
            one_layer = jax.checkpoint(one_layer, policy=_REMAT[c.remat], prevent_cse=False)
        kv_in = None if cache is None else (cache.k, cache.v)
        (x, kv_out, _), _ = jax.lax.scan(one_layer, (x, kv_in, jnp.int32(0)), layer_params)
        hidden = rms_norm(x, self.final_norm.get_value(), c.rms_norm_eps, dt)
        if cache is None:
            return hidden, None
        new_cache = KVCache(
            k=kv_out[0],
            v=kv_out[1],
            valid=key_valid,
            next_position=cache.next_position + attention_mask.sum(axis=1, dtype=jnp.int32),
            end=cache.end + length,
        )
        return hidden, new_cache

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """`[B, T, D]` -> `[B, T, V]` float32 logits."""
        return jnp.einsum("btd,dv->btv", hidden, self.output_kernel(), preferred_element_type=jnp.float32)

    def __call__(self, input_ids, attention_mask=None):
        hidden, _ = self.hidden_states(input_ids, attention_mask)
        return self.logits_from_hidden(hidden)

    def forward_with_cache(self, input_ids, attention_mask, cache: KVCache, decode_block: int | None = None):
        """Prefill or decode: logits `[B, T, V]` of the new tokens and the cache holding them."""
        hidden, cache = self.hidden_states(input_ids, attention_mask, cache, decode_block)
        return self.logits_from_hidden(hidden), cache
