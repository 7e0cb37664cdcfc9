"""Qwen2 parity with transformers' PyTorch Qwen2ForCausalLM, checkpoint I/O, config, KV cache, remat.

Reference models are tiny random transformers models (GQA with 2 query heads per kv head, q/k/v
biases and norm weights randomised, weights large enough that attention is far from uniform),
saved with transformers' save_pretrained and loaded with ours.
"""

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from prime_jax.models import (
    KVCache,
    Qwen2Config,
    Qwen2ForCausalLM,
    from_pretrained,
    load_config,
    save_pretrained,
)
from prime_jax.models.config import REMAT_POLICIES, UnsupportedModelError
from prime_jax.sampling import Sampler

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS = 96, 32, 2, 4, 2
ROPE_THETA = 500.0  # small, so rotary angles vary a lot over a few positions


def hf_config(tie: bool, head_dim: int | None = None):
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
        rope_theta=ROPE_THETA, tie_word_embeddings=tie, rms_norm_eps=1e-6,
    )
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    return transformers.Qwen2Config(**kwargs)


def make_hf_model(tie: bool, seed: int, head_dim: int | None = None):
    """A random transformers Qwen2ForCausalLM whose every parameter (biases, norms too) is non-trivial."""
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(hf_config(tie, head_dim)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model


def left_padded_batch(seed: int, lengths=(12, 7, 1), total: int = 12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(len(lengths), total)).astype(np.int32)
    mask = np.zeros((len(lengths), total), np.int32)
    for row, n in enumerate(lengths):
        mask[row, total - n:] = 1
    return ids, mask


def hf_logits(model, ids, mask):
    position_ids = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            position_ids=torch.as_tensor(position_ids, dtype=torch.long),
        )
    return out.logits.float().numpy()


def jit_logits(model: Qwen2ForCausalLM, ids, mask):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    return np.asarray(fn(state, jnp.asarray(ids), jnp.asarray(mask)))


def max_real_diff(a, b, mask):
    real = mask.astype(bool)
    return float(np.max(np.abs(a[real] - b[real])))


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_checkpoint(request, tmp_path_factory):
    tie = request.param
    model = make_hf_model(tie, seed=1 if tie else 2)
    folder = tmp_path_factory.mktemp("hf_tied" if tie else "hf_untied")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def untied_checkpoint(tmp_path_factory):
    """One checkpoint for the tests that need not run for both head kinds (KV cache, remat, errors)."""
    model = make_hf_model(tie=False, seed=4)
    folder = tmp_path_factory.mktemp("hf_one")
    model.save_pretrained(folder)
    return model, folder


# ---------------------------------------------------------------------------------------- parity


def test_float32_logits_match_transformers(hf_checkpoint):
    hf_model, folder = hf_checkpoint
    ids, mask = left_padded_batch(0)
    expected = hf_logits(hf_model, ids, mask)
    model = from_pretrained(folder)
    assert model.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    assert model.config.rope_theta == ROPE_THETA
    got = jit_logits(model, ids, mask)
    assert got.shape == (3, 12, VOCAB) and got.dtype == np.float32
    scale = float(np.std(expected[mask.astype(bool)]))
    assert scale > 1.0  # logits are not trivially small
    assert max_real_diff(got, expected, mask) <= 1e-4


def test_explicit_head_dim_matches_transformers(tmp_path):
    hf_model = make_hf_model(tie=False, seed=3, head_dim=16)  # 4 heads x 16 != hidden 32
    hf_model.save_pretrained(tmp_path)
    ids, mask = left_padded_batch(1, lengths=(9, 4), total=9)
    model = from_pretrained(tmp_path)
    assert model.config.head_size == 16
    assert max_real_diff(jit_logits(model, ids, mask), hf_logits(hf_model, ids, mask), mask) <= 1e-4


def test_bfloat16_compute_is_close(hf_checkpoint):
    hf_model, folder = hf_checkpoint
    ids, mask = left_padded_batch(0)
    expected = hf_logits(hf_model, ids, mask)
    model = from_pretrained(folder, dtype="bfloat16")
    assert model.config.compute_dtype == jnp.bfloat16
    got = jit_logits(model, ids, mask)
    assert got.dtype == np.float32  # logits always come out in float32
    assert np.all(np.isfinite(got))
    scale = float(np.max(np.abs(expected[mask.astype(bool)])))
    diff = max_real_diff(got, expected, mask)
    assert diff > 0  # really ran in bfloat16
    assert diff < 0.1 * scale, (diff, scale)


def test_bfloat16_params_load(untied_checkpoint):
    _, folder = untied_checkpoint
    model = from_pretrained(folder, dtype="bfloat16", param_dtype="bfloat16")
    assert model.layers.q_kernel[...].dtype == jnp.bfloat16
    ids, mask = left_padded_batch(0)
    assert np.all(np.isfinite(jit_logits(model, ids, mask)))


# ------------------------------------------------------------------------------ checkpoint I/O


@pytest.mark.parametrize("max_shard_bytes", [2**31, 20_000], ids=["single-file", "sharded"])
def test_save_pretrained_round_trips_through_transformers(hf_checkpoint, tmp_path, max_shard_bytes):
    hf_model, folder = hf_checkpoint
    model = from_pretrained(folder)
    save_pretrained(model, tmp_path, max_shard_bytes=max_shard_bytes)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if max_shard_bytes == 2**31:
        assert files == ["model.safetensors"] and not (tmp_path / "model.safetensors.index.json").exists()
    else:
        assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(files)
        on_disk = sum(len(load_file(tmp_path / f)) for f in files)
        assert on_disk == len(index["weight_map"])

    reloaded, info = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    ids, mask = left_padded_batch(2)
    ours = jit_logits(model, ids, mask)
    assert max_real_diff(hf_logits(reloaded.eval(), ids, mask), ours, mask) <= 1e-4
    # And the exact weights come back through our own loader.
    again = from_pretrained(tmp_path)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


def test_save_bfloat16_checkpoint_loads_in_transformers(untied_checkpoint, tmp_path):
    _, folder = untied_checkpoint
    save_pretrained(from_pretrained(folder), tmp_path, dtype="bfloat16")
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert from_pretrained(tmp_path).layers.q_kernel[...].dtype == jnp.float32  # upcast to param_dtype


def _doctor(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(untied_checkpoint, tmp_path):
    _, folder = untied_checkpoint
    name = "model.layers.1.self_attn.k_proj.bias"
    bad = _doctor(folder, tmp_path / "bad", lambda t: t.pop(name))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias.*\(16,\)"):
        from_pretrained(bad)


@pytest.mark.parametrize("name,shape", [
    ("model.layers.0.mlp.up_proj.weight", (65, 32)),  # wrong size
    ("model.layers.1.self_attn.k_proj.weight", (32, 16)),  # same size, transposed layout
    ("model.embed_tokens.weight", (32, 96)),
])
def test_mismatched_tensor_names_both_shapes(untied_checkpoint, tmp_path, name, shape):
    _, folder = untied_checkpoint
    rng = np.random.default_rng(0)

    def edit(tensors):
        expected = tensors[name].shape
        tensors[name] = rng.standard_normal(shape).astype(np.float32)
        edit.expected = expected

    bad = _doctor(folder, tmp_path / "bad", edit)
    with pytest.raises(ValueError) as err:
        from_pretrained(bad)
    message = str(err.value)
    assert name in message and str(tuple(shape)) in message and str(tuple(edit.expected)) in message, message


def test_hub_id_uses_snapshot_download(untied_checkpoint, monkeypatch, tmp_path):
    import huggingface_hub

    _, folder = untied_checkpoint
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)  # make sure no local folder called Qwen/ exists
    model = from_pretrained("Qwen/Qwen2.5-Math-7B")
    assert calls and all(c[0] == "Qwen/Qwen2.5-Math-7B" for c in calls)
    patterns = calls[0][1].get("allow_patterns") or []
    assert "*.safetensors" in patterns and "*.json" in patterns
    local = from_pretrained(folder)
    np.testing.assert_array_equal(np.asarray(model.embed_tokens[...]), np.asarray(local.embed_tokens[...]))
    assert load_config("Qwen/Qwen2.5-Math-7B") == local.config


def test_bad_local_path_does_not_hit_the_hub(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("hub was called"))
    with pytest.raises(FileNotFoundError):
        from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        from_pretrained("./Qwen/Qwen2.5-Math-7B")


# ---------------------------------------------------------------------------------------- config


def test_transformers5_writes_rope_parameters_and_we_read_it(untied_checkpoint):
    _, folder = untied_checkpoint
    written = json.loads((folder / "config.json").read_text())
    # transformers 5 writes rope theta only inside `rope_parameters`.
    assert written["rope_parameters"] == {"rope_theta": ROPE_THETA, "rope_type": "default"}
    assert "rope_theta" not in written
    config = load_config(folder)
    assert config.rope_theta == ROPE_THETA
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_size) == (HEADS, KV_HEADS, 8)


def test_rope_theta_spellings():
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
    assert Qwen2Config.from_hf_dict({**base, "rope_theta": 1e6}).rope_theta == 1e6  # transformers 4 / Qwen2.5 hub
    assert Qwen2Config.from_hf_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}).rope_theta == 7.0
    assert Qwen2Config.from_hf_dict(base).rope_theta == 10000.0  # transformers' default
    with pytest.raises(UnsupportedModelError, match="yarn"):
        Qwen2Config.from_hf_dict({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 7.0, "factor": 4.0}})
    # What we write, transformers reads back with the same theta.
    ours = Qwen2Config.from_hf_dict({**base, "rope_theta": 123.0})
    hf = transformers.Qwen2Config(**ours.to_hf_dict())
    assert hf.rope_parameters["rope_theta"] == 123.0
    assert Qwen2Config.from_hf_dict(hf.to_dict()) == ours.replace(head_dim=ours.head_size)


# ---------------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("block", [None, 4])  # one block; four blocks of 4 columns (decoding crosses them)
def test_kv_cache_decode_matches_full_forward(untied_checkpoint, block):
    _, folder = untied_checkpoint
    model = from_pretrained(folder)
    graphdef, state = nnx.split(model)
    prompt_ids, prompt_mask = left_padded_batch(3, lengths=(6, 3, 1), total=6)
    steps = 5
    rng = np.random.default_rng(4)
    new_ids = rng.integers(0, VOCAB, size=(3, steps)).astype(np.int32)
    new_mask = np.ones((3, steps), np.int32)
    new_mask[1, 3:] = 0  # row 1 finished: padding fed after its last token

    full_ids = np.concatenate([prompt_ids, new_ids], axis=1)
    full_mask = np.concatenate([prompt_mask, new_mask], axis=1)
    expected = jit_logits(model, full_ids, full_mask)

    @jax.jit
    def step(state, ids, mask, cache):
        return nnx.merge(graphdef, state).forward_with_cache(ids, mask, cache)

    cache = KVCache.init(model.config, batch_size=3, max_len=6 + steps + 5, block=block)  # spare slots stay unused
    assert len(cache.k[0]) == (4 if block else 1)
    logits, cache = step(state, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), cache)
    pieces = [np.asarray(logits)]
    for t in range(steps):
        logits, cache = step(state, jnp.asarray(new_ids[:, t:t + 1]), jnp.asarray(new_mask[:, t:t + 1]), cache)
        pieces.append(np.asarray(logits))
    got = np.concatenate(pieces, axis=1)
    assert max_real_diff(got, expected, full_mask) <= 1e-5
    assert (np.asarray(cache.end) == 6 + steps).all()
    np.testing.assert_array_equal(np.asarray(cache.next_position), full_mask.sum(axis=1))


def test_decode_attention_matches_full_attention():
    """Blockwise softmax == one softmax over the whole cache, whatever the number of blocks read
    (fully masked blocks, a row whose first block is all padding, blocks past the longest row), and
    each row's new key and value land in its own column of the right block."""
    from prime_jax.models.qwen2 import cached_attention, decode_attention

    rng = np.random.default_rng(0)
    B, K, G, S, H, block = 3, 2, 2, 64, 8, 16
    q = jnp.asarray(rng.normal(size=(B, K * G, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, K, H, S)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.float32)
    k_new = jnp.asarray(rng.normal(size=(B, K, H)), jnp.float32)
    v_new = jnp.asarray(rng.normal(size=(B, K, H)), jnp.float32)
    columns = np.array([29, 20, 44])  # each row's new token, in blocks 1, 1 and 2
    valid = np.zeros((B, S), bool)
    valid[0, 10:30] = True  # starts inside block 0
    valid[1, 20:21] = True  # block 0 all padding
    valid[2, :45] = True  # the longest row: 3 blocks
    k_written = np.asarray(k).copy()
    v_written = np.asarray(v).copy()
    k_written[np.arange(B), :, :, columns] = k_new
    v_written[np.arange(B), :, columns, :] = v_new
    expected = cached_attention(q[:, None], jnp.asarray(k_written), jnp.asarray(v_written),
                                jnp.asarray(valid)[:, None, None], 0.3)[:, 0]
    attend = jax.jit(decode_attention, static_argnums=8)
    blocks = lambda x, axis: tuple(jax.lax.slice_in_dim(x, i, i + block, axis=axis) for i in range(0, S, block))
    results = []
    for num_columns in (45, 48, 64):
        out, k_blocks, v_blocks = attend(q, k_new, v_new, blocks(k, 3), blocks(v, 2), jnp.asarray(columns),
                                         jnp.asarray(valid), num_columns, 0.3)
        np.testing.assert_array_equal(np.concatenate(k_blocks, axis=3), k_written)
        np.testing.assert_array_equal(np.concatenate(v_blocks, axis=2), v_written)
        results.append(np.asarray(out))
    np.testing.assert_allclose(results[0], np.asarray(expected), atol=1e-5)
    for other in results[1:]:  # extra, fully masked blocks change nothing, bit for bit
        np.testing.assert_array_equal(other, results[0])


def test_decode_attention_with_a_shared_prefix():
    """Rows that share a prefix (n consecutive rows per prefix) attend it as one group: the same as
    attending the prefix's columns copied in front of each row's own."""
    from prime_jax.models.qwen2 import cached_attention, decode_attention

    rng = np.random.default_rng(1)
    P, n, K, G, C, S, H, block = 2, 3, 2, 2, 12, 32, 8, 16
    B = P * n
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    q, k, v = normal(B, K * G, H), normal(B, K, H, S), normal(B, K, S, H)
    k_new, v_new = normal(B, K, H), normal(B, K, H)
    prefix_k, prefix_v = normal(P, K, H, C), normal(P, K, C, H)
    prefix_valid = np.ones((P, C), bool)
    prefix_valid[0, :5] = False  # left padding
    columns = np.array([0, 3, 20, 7, 1, 17])
    valid = np.arange(S)[None, :] <= columns[:, None]
    out, k_blocks, v_blocks = jax.jit(decode_attention, static_argnums=8)(
        q, k_new, v_new, (k[..., :block], k[..., block:]), (v[:, :, :block], v[:, :, block:]), jnp.asarray(columns),
        jnp.asarray(valid), int(columns.max()) + 1, 0.3, (prefix_k, prefix_v, jnp.asarray(prefix_valid)))
    rows = np.arange(B) // n
    full_k = jnp.concatenate([prefix_k[rows], jnp.concatenate(k_blocks, axis=3)], axis=3)
    full_v = jnp.concatenate([prefix_v[rows], jnp.concatenate(v_blocks, axis=2)], axis=2)
    full_valid = jnp.concatenate([jnp.asarray(prefix_valid)[rows], jnp.asarray(valid)], axis=1)
    expected = cached_attention(q[:, None], full_k, full_v, full_valid[:, None, None], 0.3)[:, 0]
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)


def test_decode_step_cost_follows_live_rows_not_capacity():
    """Short rows in a 4,096-column cache cost about what they cost in a 512-column one; the same
    cache with long rows costs clearly more (so the timing can tell the two apart)."""
    import time

    config = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    graphdef, state = nnx.split(Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    rows, steps = 16, 8

    def decode(state, cache):  # `steps` steps from the same start; the cache is donated, as in the sampler
        model = nnx.merge(graphdef, state)

        def one(_, carry):
            cache, tokens = carry
            logits, cache = model.forward_with_cache(tokens[:, None], jnp.ones((rows, 1), bool), cache)
            return cache, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)

        cache = jax.lax.fori_loop(0, steps, one, (cache, jnp.zeros(rows, jnp.int32)))[0]
        return dataclasses.replace(cache, end=cache.end - steps, next_position=cache.next_position - steps)

    decode = jax.jit(decode, donate_argnums=1)

    def filled(capacity, live):
        cache = KVCache.init(config, rows, capacity)
        return jax.block_until_ready(decode(state, dataclasses.replace(
            cache, valid=cache.valid.at[:, :live].set(True), next_position=cache.next_position + live,
            end=cache.end + live)))

    # Interleaved rounds, best of each: a burst of load from another test process (xdist) then hits all
    # three cases alike instead of one block of repeats.
    caches = [filled(512, 20), filled(4096, 20), filled(4096, 4000)]
    best = [float("inf")] * 3
    for _ in range(9):
        for i in range(3):
            start = time.perf_counter()
            caches[i] = jax.block_until_ready(decode(state, caches[i]))
            best[i] = min(best[i], time.perf_counter() - start)
    short_small, short_big, long_big = best
    assert short_big < 2.0 * short_small, (short_small, short_big)
    assert long_big > 2.0 * short_big, (short_big, long_big)


# ---------------------------------------------------------------------------------------- remat


def test_remat_policies_give_identical_logits_and_grads(untied_checkpoint):
    _, folder = untied_checkpoint
    ids, mask = left_padded_batch(5)
    targets = np.roll(ids, -1, axis=1)

    def logits_loss_and_grads(policy):
        model = from_pretrained(folder, remat=policy)
        assert model.config.remat == policy
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(params):
            logits = nnx.merge(graphdef, params)(jnp.asarray(ids), jnp.asarray(mask))
            logp = jax.nn.log_softmax(logits, axis=-1)
            picked = jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
            return -(picked * mask).sum() / mask.sum()

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        return jit_logits(model, ids, mask), float(value), jax.tree.map(np.asarray, grads)

    ref_logits, ref_loss, ref_grads = logits_loss_and_grads("none")
    assert all(np.abs(g[...]).max() > 0 for g in jax.tree.leaves(ref_grads))
    for policy in REMAT_POLICIES[1:]:
        logits, value, grads = logits_loss_and_grads(policy)
        np.testing.assert_array_equal(logits, ref_logits, err_msg=policy)  # the forward pass is untouched
        # Gradients: same maths, recomputed; XLA may fuse the recomputation differently (float32 ulps).
        assert value == pytest.approx(ref_loss, rel=1e-6, abs=1e-6)
        flat_ref, flat = jax.tree.leaves(ref_grads), jax.tree.leaves(grads)
        assert len(flat) == len(flat_ref)
        for a, b in zip(flat, flat_ref):  # float32 reassociation: an error on the scale of the leaf's largest entry
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()), err_msg=policy)


def test_fused_mlp_gives_the_same_logits_and_close_grads(untied_checkpoint):
    """model.fused_mlp: gate and up as one product over the stacked kernels; same parameters (and
    checkpoints), the same function, gradients within float32 reassociation; decoding too."""
    _, folder = untied_checkpoint
    ids, mask = left_padded_batch(5)
    targets = np.roll(ids, -1, axis=1)

    def logits_loss_and_grads(fused):
        model = from_pretrained(folder, fused_mlp=fused)
        assert model.config.fused_mlp is fused
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(params):
            logits = nnx.merge(graphdef, params)(jnp.asarray(ids), jnp.asarray(mask))
            picked = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), jnp.asarray(targets)[..., None], -1)
            return -(picked[..., 0] * mask).sum() / mask.sum()

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        return model, jit_logits(model, ids, mask), float(value), jax.tree.map(np.asarray, grads)

    plain, ref_logits, ref_loss, ref_grads = logits_loss_and_grads(False)
    fused, logits, value, grads = logits_loss_and_grads(True)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)  # the same parameters
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert value == pytest.approx(ref_loss, rel=1e-6, abs=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
    # Greedy decoding with the cache gives the same tokens.
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    outs = [Sampler().generate(m, prompts, max_new_tokens=6, temperature=0.0, key=jax.random.key(0))
            for m in (plain, fused)]
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)


def test_config_validation():
    with pytest.raises(ValueError, match="remat"):
        Qwen2Config(remat="sometimes")
    with pytest.raises(ValueError, match="multiple"):
        Qwen2Config(num_attention_heads=6, num_key_value_heads=4, hidden_size=48)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
    model = nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    counted = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert counted == config.num_params()
