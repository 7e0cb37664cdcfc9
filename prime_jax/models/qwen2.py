"""Qwen2 / Qwen2.5 and Llama-family decoder in Flax NNX.

The architecture matches Hugging Face's `Qwen2ForCausalLM` and `LlamaForCausalLM` (the config's
`model_type`): token embedding, RMSNorm, rotary position embeddings, grouped-query attention with
q/k/v biases for Qwen2 and none for Llama (`config.attention_bias`; never an o bias), SwiGLU MLP,
tied or untied LM head. Layers are stored stacked (leading `layers` axis) and run with `lax.scan`, so
compile time does not grow with depth; with a KV cache (prefill and decoding) they run one after
the other, each on its own cache buffers. Every parameter names its logical axes; `parallel/`
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

from prime_jax.kernels import cpu_attention
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

    k: `k[layer][block]` `[B, K, H, C]` and v: `v[layer][block]` `[B, K, C, H]`: each layer's cache
    is a tuple of separate arrays of C = `block` columns (S = blocks x C). Separate buffers are what
    let a decode step run without copies on CPU: it writes one column of each layer in place and its
    attention reads the live blocks directly, where a slice of a stacked `[L, ..., S]` array is
    materialised before the dot (half of a decode step at 30 layers). Keys are stored transposed so
    that both attention products are plain `[rows, n] x [n, m]` matmuls per (row, kv head).
    valid: `[B, S]` bool, slot holds a real (non-padding) token; next_position: `[B]` int32, RoPE
    position of each row's next token; end: `[B]` int32, first free slot per row.

    A chunk of T > 1 tokens (prefill) is written at a column shared by all rows (`end[0]`: prompts
    are left-padded to a common length). A single token (T = 1, decoding) is written at each row's
    own `end`, so rows at different lengths (the sampler's decode slots) share one cache, and
    attention reads only the blocks up to the longest row (`decode_attention`).
    """

    k: tuple
    v: tuple
    valid: jax.Array
    next_position: jax.Array
    end: jax.Array

    @classmethod
    def init(cls, config: Qwen2Config, batch_size: int, max_len: int, dtype=None, block: int | None = None
             ) -> "KVCache":
        """An empty cache of `max_len` columns in blocks of `decode_block_size(max_len, block)`."""
        dtype = dtype or config.compute_dtype
        shapes = cls.shapes(config, batch_size, max_len, block)
        blocks = max_len // decode_block_size(max_len, block)
        layers = config.num_hidden_layers
        return cls(
            k=tuple(tuple(jnp.zeros(shapes["k"], dtype) for _ in range(blocks)) for _ in range(layers)),
            v=tuple(tuple(jnp.zeros(shapes["v"], dtype) for _ in range(blocks)) for _ in range(layers)),
            valid=jnp.zeros(shapes["valid"], bool),
            next_position=jnp.zeros(shapes["next_position"], jnp.int32),
            end=jnp.zeros(shapes["end"], jnp.int32),
        )

    @classmethod
    def shapes(cls, config: Qwen2Config, batch_size: int, max_len: int, block: int | None = None
               ) -> dict[str, tuple[int, ...]]:
        """The shape of every field for B = `batch_size` rows and S = `max_len` slots; for k and v, the
        shape of one block of one layer (its layout is `LOGICAL_AXES`)."""
        sizes = {"batch": batch_size, "kv_heads": config.num_key_value_heads, "head_dim": config.head_size,
                 "cache_seq": max_len}
        shapes = {field: tuple(sizes[axis] for axis in axes) for field, axes in cls.LOGICAL_AXES.items()}
        sizes["cache_seq"] = decode_block_size(max_len, block)
        shapes.update({field: tuple(sizes[axis] for axis in cls.LOGICAL_AXES[field]) for field in ("k", "v")})
        return shapes

    @property
    def block(self) -> int:
        """Columns per block."""
        return self.v[0][0].shape[2]

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    # Logical axes of each field (for k and v: of every block of every layer), in order: the layout,
    # and the names `parallel.named_sharding` maps.
    LOGICAL_AXES = {
        "k": ("batch", "kv_heads", "head_dim", "cache_seq"),
        "v": ("batch", "kv_heads", "cache_seq", "head_dim"),
        "valid": ("batch", "cache_seq"),
        "next_position": ("batch",),
        "end": ("batch",),
    }


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype) -> jax.Array:
    """RMSNorm in float32, as transformers does; `[..., D]` -> `[..., D]` in `dtype`."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * normed).astype(dtype)


def rope_tables(positions: jax.Array, head_size: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) of the rotary angles, each `[B, T, 1, H]` float32, for positions `[B, T]`."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_size, 2, dtype=jnp.float32) / head_size))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary embedding (rotate-half convention). x `[B, T, heads, H]`, rope = `rope_tables(...)`."""
    cos, sin = rope
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


# Columns per block of the KV cache: a decode step reads ceil(longest row / block) blocks, so its
# cost follows the live rows, not the cache's capacity. 128 columns keep the per-block overhead
# (a conditional and two scatters per layer) small next to the block's two products; a long cache
# has at most MAX_DECODE_BLOCKS blocks (larger ones), which bounds the program's size.
DECODE_BLOCK = 128
MAX_DECODE_BLOCKS = 32


def decode_block_size(capacity: int, block: int | None = None) -> int:
    """The block size of a cache of `capacity` columns: `block` (default `DECODE_BLOCK`), doubled
    until there are at most `MAX_DECODE_BLOCKS` blocks, when it divides the capacity; else the
    whole capacity in one block."""
    block = block or DECODE_BLOCK
    while capacity > MAX_DECODE_BLOCKS * block and capacity % (2 * block) == 0:
        block *= 2
    return block if capacity % block == 0 else capacity


def decode_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, k_blocks, v_blocks, columns: jax.Array,
                     valid: jax.Array, num_columns, scale: float, prefix=None) -> tuple[jax.Array, tuple, tuple]:
    """One new token per row: writes its key and value at the row's own column and attends over
    columns `[0, num_columns)` of one layer's cache.

    q `[B, N, H]`, k_new and v_new `[B, K, H]`; k_blocks: the layer's key blocks `[B, K, H, C]`,
    v_blocks its value blocks `[B, K, C, H]`; columns `[B]` (each < num_columns); valid `[B, S]`;
    num_columns `[]` traced. Blocks are written and read in order, straight from their buffers (no
    slice is copied), each one after the first inside a loop on the previous one that runs only when
    the block starts before `num_columns` (no row writes to a later block): a step visits only the
    live blocks, whatever the capacity. Online softmax in float32 over the blocks
    (running max, sum and weighted values): a block that is not read, or fully masked for a row,
    leaves that row's result bit for bit unchanged, so a row's output does not depend on how many
    blocks the longest row in the batch needs. Returns the attention `[B, N, H]` in q's dtype and
    the new blocks.

    prefix: optional (keys `[P, K, H, C']`, values `[P, K, C', H]`, valid `[P, C']`) of P shared
    prefixes, each attended by B / P consecutive rows before their own columns (the sampler's n
    samples of a prompt: the prompt's keys are read once for its n rows, as n x G query rows).

    On one CPU device the step runs as a hand-written kernel (`kernels.cpu_attention`: same
    results to float rounding, the cache read about as fast as memory allows) when it builds.
    """
    batch, heads, head_size = q.shape
    kv_heads, block = k_blocks[0].shape[1], k_blocks[0].shape[3]
    q = q.reshape(batch, kv_heads, heads // kv_heads, head_size)
    rows = jnp.arange(batch)
    if cpu_attention.applies(q, k_blocks, prefix):  # one CPU device: the hand-written kernel
        attention, k_blocks, v_blocks = cpu_attention.decode_attention(
            q * jnp.asarray(scale, q.dtype), k_new, v_new, k_blocks, v_blocks, columns, valid, num_columns, prefix)
        return attention.astype(q.dtype).reshape(batch, heads, head_size), k_blocks, v_blocks
    # A power-of-two scale (head size 64: 1/8) is exact on q, so it is applied once to q instead of
    # to every block's scores (one pass over the scores less per block and layer, same bits).
    exact = math.frexp(scale)[0] == 0.5
    q, score_scale = (q * jnp.asarray(scale, q.dtype), None) if exact else (q, scale)

    def softmax_part(q, k, v, mask, running_max):  # (max, sum, values) of one block, float32
        scores = jnp.einsum("bkgh,bkhc->bkgc", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = scores if score_scale is None else scores * score_scale
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        probs = jnp.exp(scores - new_max[..., None])
        values = jnp.einsum("bkgc,bkch->bkgh", probs.astype(q.dtype), v.astype(q.dtype),
                            preferred_element_type=jnp.float32)
        return new_max, probs.sum(axis=-1), values

    def write(i, k, v):  # the new column into block i; rows writing to another block are dropped
        local = columns - i * block
        local = jnp.where((local >= 0) & (local < block), local, block)
        return (k.at[rows, :, :, local].set(k_new.astype(k.dtype), mode="drop"),
                v.at[rows, :, local, :].set(v_new.astype(v.dtype), mode="drop"))

    def attend(i, stats, k, v):  # stats after block i
        running_max, total, acc = stats
        new_max, block_sum, values = softmax_part(q, k, v, valid[:, i * block:(i + 1) * block], running_max)
        correction = jnp.exp(running_max - new_max)
        return new_max, total * correction + block_sum, acc * correction[..., None] + values

    def from_block(i, stats, k_blocks, v_blocks):  # blocks i, i + 1, ...: write, read, then the next if live
        k, v = write(i, k_blocks[0], v_blocks[0])
        stats = attend(i, stats, k, v)
        if len(k_blocks) == 1:
            return stats, (k,), (v,)
        # The next block runs inside a `while_loop` that runs once or not at all: its carry (the
        # remaining blocks) is updated in place. A `lax.cond` returning the blocks made XLA:CPU copy
        # each of them in and out, every layer and step, whether the branch ran or not.
        def next_blocks(carry):
            _, stats, k_rest, v_rest = carry
            return (jnp.bool_(False), *from_block(i + 1, stats, k_rest, v_rest))

        _, stats, k_rest, v_rest = jax.lax.while_loop(
            lambda carry: carry[0], next_blocks, ((i + 1) * block < num_columns, stats, k_blocks[1:], v_blocks[1:]))
        return stats, (k, *k_rest), (v, *v_rest)

    shape = (batch, kv_heads, heads // kv_heads)
    if prefix is None:
        stats = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                 jnp.zeros((*shape, head_size), jnp.float32))
    else:
        stats = _prefix_stats(q, prefix, softmax_part)
    stats, k_blocks, v_blocks = from_block(0, stats, tuple(k_blocks), tuple(v_blocks))
    _, total, acc = stats
    return (acc / total[..., None]).astype(q.dtype).reshape(batch, heads, head_size), k_blocks, v_blocks


def _prefix_stats(q: jax.Array, prefix, softmax_part) -> tuple:
    """`decode_attention`'s online-softmax statistics after the shared prefixes: q `[B, K, G, H]`,
    prefix (keys `[P, K, H, C']`, values `[P, K, C', H]`, valid `[P, C']`); the B / P rows of a prefix
    are read as one group of n G query rows ([B, K, G, ...] <-> [P, K, n G, ...])."""
    shape, kv_heads = q.shape[:3], q.shape[1]
    prefix_k, prefix_v, prefix_valid = prefix
    num_prefixes = prefix_k.shape[0]
    group = lambda x: jnp.swapaxes(x.reshape(num_prefixes, -1, *x.shape[1:]), 1, 2).reshape(  # noqa: E731
        num_prefixes, kv_heads, -1, *x.shape[3:])
    ungroup = lambda x: jnp.swapaxes(x.reshape(num_prefixes, kv_heads, -1, *shape[2:], *x.shape[3:]), 1, 2  # noqa: E731
                                     ).reshape(*shape, *x.shape[3:])
    no_max = jnp.full((num_prefixes, kv_heads, shape[0] // num_prefixes * shape[2]), -jnp.inf, jnp.float32)
    return tuple(map(ungroup, softmax_part(group(q), prefix_k, prefix_v, prefix_valid, no_max)))


def _write_chunk(blocks, new: jax.Array, start, column_axis: int) -> tuple[jax.Array, tuple]:
    """Writes `new` (T columns on `column_axis`) at column `start` of all rows of a layer's blocks;
    returns the whole layer `[..., S, ...]` (for the attention of T > 1 tokens) and the new blocks."""
    block = blocks[0].shape[column_axis]
    full = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=column_axis)
    index = [0, 0, 0, 0]
    index[column_axis] = start
    full = jax.lax.dynamic_update_slice(full, new.astype(full.dtype), tuple(index))
    if len(blocks) == 1:
        return full, (full,)
    return full, tuple(jax.lax.slice_in_dim(full, i * block, (i + 1) * block, axis=column_axis)
                       for i in range(len(blocks)))


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Grouped-query attention over one layer of the cache; the result is `[B, T, N, H]`.

    q `[B, T, N, H]` (query head n reads kv head n // (N / K), as transformers' `repeat_kv`),
    k `[B, K, H, S]`, v `[B, K, S, H]`, mask `[B, 1, T, S]`. Scores and softmax in float32.
    """
    batch, length, heads, head_size = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_size)
    scores = jnp.einsum("btkgh,bkhs->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)  # mask as [B, 1, 1, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v)
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

    def __call__(self, x, rope, mask, kv=None, end=None, decode=None):
        """One layer (params already sliced). x `[B, T, D]`, rope = `rope_tables(positions [B, T], ...)`,
        mask `[B, 1, T, S]`.

        kv: optional (k_blocks, v_blocks): this layer's cache blocks (`KVCache` layouts). Only the new
        keys/values are written, in place, at column `end` (`[]`, shared by all rows); attention reads
        the whole layer. decode: optional (valid `[B, S]`, num_columns, prefix) for one token per row
        (T = 1) written at each row's own column `end` `[B]`, attention read block by block up to
        `num_columns` after this layer's shared prefix (`decode_attention`; `mask` is unused).
        Returns (x, (k_blocks, v_blocks)) with the updated blocks, or (x, None).
        """
        c, dt = self.config, self.config.compute_dtype
        h = rms_norm(x, self.input_norm.get_value(), c.rms_norm_eps, dt)
        # With a cache (the sampler), the projections are 2-D products over [D, N H] and [N H, D] (bitcasts
        # of the kernels): the einsums over (n, h) made XLA:CPU copy o_kernel transposed every decode step.
        # Training keeps the einsums, so its numbers keep their bits.
        flat = kv is not None

        def proj(kernel, bias):
            kernel = kernel.get_value().astype(dt)
            if flat:
                out = jnp.dot(h, kernel.reshape(kernel.shape[0], -1)).reshape(*h.shape[:2], *kernel.shape[1:])
            else:
                out = jnp.einsum("btd,dnh->btnh", h, kernel)
            return out if bias is None else out + bias.get_value().astype(dt)

        q = apply_rope(proj(self.q_kernel, self.q_bias), rope)
        k = apply_rope(proj(self.k_kernel, self.k_bias), rope)
        v = proj(self.v_kernel, self.v_bias)
        scale = 1.0 / math.sqrt(c.head_size)
        if kv is not None and decode is not None:
            k_blocks, v_blocks = kv
            valid, num_columns, prefix = decode
            attn, k_blocks, v_blocks = decode_attention(q[:, 0], k[:, 0], v[:, 0], k_blocks, v_blocks, end, valid,
                                                        num_columns, scale, prefix)
            attn = attn[:, None]
            new_kv = (k_blocks, v_blocks)
        elif kv is not None:
            # This step's keys as [B, K, H, T] and values as [B, K, T, H], at column `end`.
            layer_k, k_blocks = _write_chunk(kv[0], k.transpose(0, 2, 3, 1), end, column_axis=3)
            layer_v, v_blocks = _write_chunk(kv[1], v.transpose(0, 2, 1, 3), end, column_axis=2)
            attn = cached_attention(q, layer_k.astype(dt), layer_v.astype(dt), mask, scale)
            new_kv = (k_blocks, v_blocks)
        else:
            attn = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
            new_kv = None
        o_kernel = self.o_kernel.get_value().astype(dt)
        if flat:
            out = jnp.dot(attn.reshape(*attn.shape[:2], -1), o_kernel.reshape(-1, o_kernel.shape[-1]))
        else:
            out = jnp.einsum("btnh,nhd->btd", attn, o_kernel)
        x = x + out.astype(x.dtype)
        h = rms_norm(x, self.post_norm.get_value(), c.rms_norm_eps, dt)
        if c.fused_mlp:
            # One product over [D, 2, F] (the kernels side by side, each keeping its F split): as two products,
            # XLA:CPU wrote their backward's [B T, F] gradients transposed for the kernels' gradients, through
            # a fusion of strided reads (18 ms a layer at SmolLM2's shape; now one plain transpose, 4.5 ms).
            gate_up = jnp.stack([self.gate_kernel.get_value(), self.up_kernel.get_value()], axis=1).astype(dt)
            gate_up = jnp.einsum("btd,dkf->btkf", h, gate_up)
            gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
        else:
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

    def layer_params(self) -> tuple:
        """Each layer's parameters as its own arrays (a tuple of L `nnx.State`s without the `layers`
        axis), for `hidden_states(..., layer_params=...)`. Slicing the stack copies the weights, so
        a decode loop takes these once, outside the loop, instead of slicing every layer every step."""
        _, stacked = nnx.split(self.layers)
        return tuple(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(self.config.num_hidden_layers))

    def hidden_states(self, input_ids, attention_mask=None, cache: KVCache | None = None,
                      layer_params: tuple | None = None, prefix: KVCache | None = None):
        """Final-norm hidden states `[B, T, D]` (compute dtype), and the updated cache (or None).

        attention_mask `[B, T]` marks real tokens (1) vs padding (0); left padding is expected.
        Positions are `cumsum(mask) - 1`, continued from `cache.next_position` when decoding.
        Without a cache the layers run as one `lax.scan` over the stacked parameters (compile time
        does not grow with depth). With a cache they run one after the other (the cache's layers are
        separate buffers, updated in place), from `layer_params` (`self.layer_params()`, sliced here
        when not given); T > 1 tokens go to the column all rows share (`cache.end[0]`); T = 1 goes to
        each row's own `cache.end` and attention reads the cache's blocks up to the longest row, so
        rows may be at different lengths. prefix (T = 1 only): a cache of P rows (one block a layer)
        that consecutive groups of B / P rows attend before their own columns (a prompt shared by
        its samples, read once for all of them); `cache` then holds only the rows' own tokens.
        """
        c, dt = self.config, self.config.compute_dtype
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), bool)
        attention_mask = attention_mask.astype(bool)
        positions, mask, key_valid, end, decode = _positions_and_mask(attention_mask, cache)

        x = self.embed_tokens.get_value()[input_ids].astype(dt)
        graphdef, stacked = nnx.split(self.layers)
        # Rows stay split over the data axes between layers; without the constraint the compiler
        # follows the FSDP split of the weights and every device computes the whole batch.
        if cache is None:
            def one_layer(x, params):
                rope = rope_tables(positions, c.head_size, c.rope_theta)  # in the body: training keeps its bits
                x, _ = nnx.merge(graphdef, params)(constrain(x, _HIDDEN_AXES), rope, mask)
                return constrain(x, _HIDDEN_AXES), None

            if c.remat != "none":
                one_layer = jax.checkpoint(one_layer, policy=_REMAT[c.remat], prevent_cse=False)
            x, _ = jax.lax.scan(one_layer, x, stacked)
            return rms_norm(x, self.final_norm.get_value(), c.rms_norm_eps, dt), None

        layer_params = self.layer_params() if layer_params is None else layer_params
        rope = rope_tables(positions, c.head_size, c.rope_theta)
        if jax.default_backend() == "cpu" and cpu_attention.one_device():
            # XLA:CPU fuses cos and sin into every layer's rotation and computes them there for every head
            # (12 ms of a 250-ms SmolLM2 decode step; an optimization barrier is removed before fusion).
            # A conditional's result is a buffer: computed once here, the same bits.
            rope = jax.lax.cond(positions[0, 0] >= 0, lambda tables: tables,
                                lambda tables: jax.tree.map(jnp.zeros_like, tables), rope)
        new_k, new_v = [], []
        for layer, (params, k_blocks, v_blocks) in enumerate(zip(layer_params, cache.k, cache.v)):
            if decode is not None and prefix is not None:  # a prefix is one block a layer
                ((prefix_k,), (prefix_v,)) = prefix.k[layer], prefix.v[layer]
                decode = (*decode[:2], (prefix_k, prefix_v, prefix.valid))
            x, (k_blocks, v_blocks) = nnx.merge(graphdef, params)(
                constrain(x, _HIDDEN_AXES), rope, mask, (k_blocks, v_blocks), end, decode)
            x = constrain(x, _HIDDEN_AXES)
            new_k.append(k_blocks)
            new_v.append(v_blocks)
        hidden = rms_norm(x, self.final_norm.get_value(), c.rms_norm_eps, dt)
        new_cache = KVCache(
            k=tuple(new_k),
            v=tuple(new_v),
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

    def forward_with_cache(self, input_ids, attention_mask, cache: KVCache, layer_params: tuple | None = None,
                           prefix: KVCache | None = None):
        """Prefill or decode: logits `[B, T, V]` of the new tokens and the cache holding them."""
        hidden, cache = self.hidden_states(input_ids, attention_mask, cache, layer_params, prefix)
        return self.logits_from_hidden(hidden), cache


def _positions_and_mask(attention_mask, cache: KVCache | None):
    """(positions [B, T], mask [B, 1, T, S] or None, the keys' validity [B, S], the write column(s),
    decode) of a forward over `attention_mask [B, T]` (bool) with or without `cache` (see
    `Qwen2ForCausalLM.hidden_states`). One-token decoding gets no dense mask: `decode` = (validity,
    columns to read, prefix slot) tells the attention which cache blocks and columns are live."""
    length = attention_mask.shape[1]
    new_positions = jnp.cumsum(attention_mask, axis=1, dtype=jnp.int32) - 1
    if cache is None:
        positions = jnp.maximum(new_positions, 0)
        key_valid, query_slot = attention_mask, jnp.arange(length)
        num_slots, end = length, None
    elif length == 1:  # one token per row, each at its own column
        positions = jnp.maximum(cache.next_position[:, None] + new_positions, 0)
        end = cache.end
        key_valid = jax.vmap(lambda row, column, real: row.at[column].set(real))(
            cache.valid, end, attention_mask[:, 0])
        return positions, None, key_valid, end, (key_valid, jnp.max(end) + 1, None)  # prefix: per layer
    else:
        positions = jnp.maximum(cache.next_position[:, None] + new_positions, 0)
        end = cache.end[0]  # prompts are left-padded to a common length: every row is at the same column
        key_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attention_mask, end, axis=1)
        query_slot = end + jnp.arange(length)
        num_slots = cache.valid.shape[1]
    slots = jnp.arange(num_slots)
    causal = slots[None, :] <= query_slot[:, None]  # [T, S]
    own_slot = slots[None, :] == query_slot[:, None]  # padding queries attend to themselves (no NaN)
    mask = ((causal[None] & key_valid[:, None, :]) | own_slot[None])[:, None]  # [B, 1, T, S]
    return positions, mask, key_valid, end, None
