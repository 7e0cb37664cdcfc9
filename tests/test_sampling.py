"""Sampler acceptance tests: HF greedy parity, sampling distributions, stop tokens, log-prob
agreement with the trainer, sharded == single-device, no recompilation within a bucket.

All on a tiny random Qwen2 (vocab 96, hidden 64, 2 layers) so the file runs in well under a minute
on a 2-core CPU. Programs are shared between tests through module-scoped samplers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from prime_jax.models import from_pretrained, response_logprobs
from prime_jax.parallel import make_mesh
from prime_jax.models.qwen2 import KVCache
from prime_jax.sampling import Rollouts, Sampler, generate, strategies
from prime_jax.sampling.decode import DecodeState

VOCAB = 96
PROMPTS = [[5, 6, 7, 8], [11, 3, 40, 41, 42, 43, 44, 9, 2], [70], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False,
        initializer_range=0.1,  # peaked logits: greedy argmax is not decided by float rounding
    )
    hf = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # transformers initialises the q/k/v biases to zero
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    hf.save_pretrained(path)
    return path, hf


@pytest.fixture(scope="module")
def model(hf_dir):
    return from_pretrained(hf_dir[0])


@pytest.fixture(scope="module")
def sampler():
    return Sampler(attention_block=16)  # small blocks: the decode attention reads several of them


@pytest.fixture(scope="module")
def greedy(model, sampler):
    return sampler.generate(model, PROMPTS, max_new_tokens=40, temperature=0.0, key=jax.random.key(0))


SAMPLED_ARGS = dict(max_new_tokens=24, n=3, temperature=0.7, top_k=20, top_p=0.9, stop_token_ids=(1, 2, 3),
                    key=jax.random.key(11))


@pytest.fixture(scope="module")
def sampled(model, sampler):
    return sampler.generate(model, PROMPTS, **SAMPLED_ARGS)


# ----------------------------------------------------------------------------- parity with HF


def test_greedy_matches_transformers(hf_dir, greedy):
    torch = pytest.importorskip("torch")
    _, hf = hf_dir
    for i, prompt in enumerate(PROMPTS):  # one prompt at a time: no padding on the HF side
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=40,
                              eos_token_id=None, pad_token_id=0)
        expected = out[0, len(prompt):].numpy()
        np.testing.assert_array_equal(greedy.tokens[i], expected, err_msg=f"prompt {i}")
    assert greedy.tokens.shape == (len(PROMPTS), 40)
    assert (greedy.lengths == 40).all() and not greedy.finished.any()
    assert greedy.response_mask.dtype == np.int32 and greedy.response_mask.all()


def test_rollouts_layout(greedy):
    r = greedy
    assert isinstance(r, Rollouts)
    assert r.prompt_tokens.shape == (4, 16) and r.prompt_mask.shape == (4, 16)  # prompt bucket 16
    for i, prompt in enumerate(PROMPTS):  # left-padded
        assert r.prompt_tokens[i, 16 - len(prompt):].tolist() == prompt
        assert r.prompt_mask[i].sum() == len(prompt) and r.prompt_mask[i, -1] == 1
    np.testing.assert_array_equal(r.prompt_index, np.arange(4))
    assert r.tokens.dtype == np.int32 and r.logprobs.dtype == np.float32 and r.finished.dtype == bool


# ----------------------------------------------------------------------------- distributions


def _filtered_probs(logits, temperature, top_k, top_p):
    """The exact distribution the sampler should draw from, in numpy (float64)."""
    z = np.asarray(logits, np.float64) / temperature
    keep = np.ones_like(z, bool)
    if top_k:
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        nucleus = np.zeros_like(keep)
        nucleus[order[before < top_p]] = True
        p = np.where(nucleus, p, 0.0)
        p /= p.sum()
    return p


def _assert_follows(draws, expected, num_categories):
    counts = np.bincount(draws, minlength=num_categories)
    support = expected > 0
    assert counts[~support].sum() == 0, "drew a filtered-out token"
    result = stats.chisquare(counts[support], expected[support] * counts.sum())
    assert result.pvalue > 1e-3, (counts, expected * counts.sum(), result)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.9, 6, 0.7)])
def test_sample_distribution(temperature, top_k, top_p):
    logits = np.array([2.0, 1.5, 1.2, 1.0, 0.5, 0.3, 0.0, -0.2, -0.5, -1.0, -2.0, -3.0], np.float32)
    rows = 20000
    draw = jax.jit(lambda keys, x: strategies.sample(x, keys, temperature, top_p, greedy=False, top_k=top_k,
                                                      use_top_p=top_p < 1.0))
    tokens, logprobs = draw(strategies.row_keys(jax.random.key(1), 0, rows), jnp.tile(logits, (rows, 1)))
    tokens = np.asarray(tokens)
    _assert_follows(tokens, _filtered_probs(logits, temperature, top_k, top_p), len(logits))
    # log-probs are of the temperature-scaled distribution, without top-k/top-p renormalisation
    full = jax.nn.log_softmax(logits / temperature)
    np.testing.assert_allclose(np.asarray(logprobs), np.asarray(full)[tokens], atol=1e-6)


@pytest.mark.parametrize("size", [1, 7, 96, 5000])
def test_gumbel_noise_is_jax_random_gumbel_bit_for_bit(size):
    """The unrolled threefry draws exactly jax's Gumbel noise (jitted and not), so the sampler's
    tokens are those `jax.random.gumbel` would give; other key types fall back to it."""
    keys = jax.random.split(jax.random.key(size), 5)
    expected = np.asarray(jax.vmap(lambda k: jax.random.gumbel(k, (size,), jnp.float32))(keys))
    np.testing.assert_array_equal(np.asarray(jax.jit(strategies.gumbel_noise, static_argnums=1)(keys, size)), expected)
    np.testing.assert_array_equal(np.asarray(strategies.gumbel_noise(keys, size)), expected)
    rbg = jax.random.split(jax.random.key(size, impl="rbg"), 3)
    np.testing.assert_array_equal(np.asarray(strategies.gumbel_noise(rbg, size)),
                                  np.asarray(jax.vmap(lambda k: jax.random.gumbel(k, (size,), jnp.float32))(rbg)))


def test_top_p_keeps_top_token_and_ties():
    logits = jnp.array([[3.0, 1.0, 1.0, 1.0, -5.0]])
    cutoff = strategies.nucleus_cutoff(jnp.sort(logits, axis=-1, descending=True), 0.01)
    assert float(cutoff[0, 0]) == 3.0  # tiny p: only the top token
    kept = strategies.top_p_logits(logits, 0.9)
    assert np.isfinite(np.asarray(kept[0, :4])).all() and not np.isfinite(float(kept[0, 4]))


def test_sampler_first_token_distribution(model):
    """End to end: n = 3000 samples of one prompt; first tokens follow the filtered model distribution."""
    prompt, temperature, top_k, top_p = [5, 6, 7, 8], 0.8, 0, 0.9  # top-k end to end: `sampled`
    r = generate(model, [prompt], max_new_tokens=1, n=3000, temperature=temperature, top_k=top_k, top_p=top_p,
                 key=jax.random.key(7))  # the one-shot API
    graphdef, state = nnx.split(model)
    logits = np.asarray(jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))(state, jnp.asarray([prompt]))[0, -1])
    _assert_follows(r.tokens[:, 0], _filtered_probs(logits, temperature, top_k, top_p), VOCAB)
    assert len(np.unique(r.tokens[:, 0])) > 2  # really sampling, not one token n times
    assert r.num_prompts == 1 and r.n == 3000 and (r.prompt_index == 0).all()


# ----------------------------------------------------------------------------- stop tokens


def test_stop_tokens_end_rows(model, sampler, greedy):
    compiled = sampler.num_compilations
    stop = int(greedy.tokens[0, 5])
    r = sampler.generate(model, PROMPTS, max_new_tokens=40, temperature=0.0, stop_token_ids=(stop,),
                         key=jax.random.key(0))
    for i in range(len(PROMPTS)):
        hits = np.flatnonzero(greedy.tokens[i] == stop)
        expected_len = int(hits[0]) + 1 if hits.size else 40
        assert r.lengths[i] == expected_len
        assert r.finished[i] == bool(hits.size)
        np.testing.assert_array_equal(r.tokens[i, :expected_len], greedy.tokens[i, :expected_len])
        assert (r.tokens[i, expected_len:] == 0).all()
        assert r.response_mask[i, :expected_len].all() and not r.response_mask[i, expected_len:].any()
        assert (r.logprobs[i, expected_len:] == 0).all()
    assert r.finished[0] and r.lengths[0] <= 6
    assert (~r.finished).any(), "want at least one truncated row in this test"
    np.testing.assert_array_equal(r.truncated, ~r.finished)
    assert sampler.num_compilations == compiled  # stop ids are an input, not part of the program


def test_early_exit_when_all_rows_stop(model, sampler, greedy):
    compiled = sampler.num_compilations
    first_tokens = sorted(set(greedy.tokens[:, 0].tolist()))  # every row stops at its first token
    r = sampler.generate(model, PROMPTS, max_new_tokens=40, temperature=0.0, stop_token_ids=first_tokens,
                         key=jax.random.key(0))
    assert (r.lengths == 1).all() and r.finished.all()
    assert sampler.last_stats["decode_steps"] == 0  # the while_loop never ran a step
    assert sampler.num_compilations == compiled  # stop ids are an input, not part of the program


# ----------------------------------------------------------------------------- trainer agreement


def _trainer_logprobs(model, r: Rollouts, temperature):
    return np.asarray(response_logprobs(model, jnp.asarray(r.prompt_tokens), jnp.asarray(r.prompt_mask),
                                        jnp.asarray(r.tokens), jnp.asarray(r.response_mask), temperature=temperature))


def test_logprobs_match_response_logprobs(model, sampled):
    r = sampled
    assert r.tokens.shape == (12, 24)
    np.testing.assert_array_equal(r.prompt_index, np.repeat(np.arange(4), 3))
    diff = np.abs(_trainer_logprobs(model, r, 0.7) - r.logprobs) * r.response_mask
    assert diff.max() <= 1e-4, diff.max()
    assert (r.logprobs <= 0).all() and (r.logprobs[r.response_mask > 0] < 0).any()
    assert r.finished.any() and not r.finished.all()  # some rows stopped, some were truncated


def test_sampled_tokens_match_a_full_forward_reference(model, sampled):
    """The contract, against a naive sampler: row r's token t is `strategies.sample` of the full
    forward's logits for its prefix (no cache) with key `fold_in(fold_in(key, t), r)`; a row ends at
    a stop token or after max_new_tokens."""
    args = SAMPLED_ARGS
    rows, new = len(sampled.lengths), args["max_new_tokens"]
    width = max(map(len, PROMPTS)) + new
    ids = np.zeros((rows, width), np.int32)
    mask = np.zeros((rows, width), np.int32)
    for r in range(rows):  # prompt i's n samples are rows [i n, (i + 1) n); prompts left-padded
        prompt = PROMPTS[r // args["n"]]
        ids[r, width - new - len(prompt):width - new] = prompt
        mask[r, width - new - len(prompt):width - new] = 1
    graphdef, state = nnx.split(model)
    logits_at = jax.jit(lambda state, ids, mask, column: nnx.merge(graphdef, state)(ids, mask)[:, column])
    draw = jax.jit(lambda logits, keys: strategies.sample(logits, keys, args["temperature"], args["top_p"],
                                                          greedy=False, top_k=args["top_k"], use_top_p=True)[0])
    tokens, live = np.zeros((rows, new), np.int32), np.ones(rows, bool)
    for t in range(new):
        logits = logits_at(state, ids, mask, width - new + t - 1)
        keys = strategies.keys_for(args["key"], jnp.full(rows, t, jnp.int32), jnp.arange(rows, dtype=jnp.int32))
        token = np.where(live, np.asarray(draw(logits, keys)), 0)
        tokens[:, t], ids[:, width - new + t], mask[:, width - new + t] = token, token, live
        live &= ~np.isin(token, args["stop_token_ids"])
    np.testing.assert_array_equal(sampled.tokens, tokens)


def test_greedy_logprobs_match_response_logprobs(model, greedy):
    diff = np.abs(_trainer_logprobs(model, greedy, greedy.logprob_temperature) - greedy.logprobs)
    assert greedy.logprob_temperature == 1.0  # greedy: log-probs at temperature 1
    assert diff.max() <= 1e-4, diff.max()


# ----------------------------------------------------------------------------- sharding


def test_sharded_matches_single_device(hf_dir, sampled):
    assert len(jax.devices()) == 8
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded_model = from_pretrained(hf_dir[0], mesh=mesh)
    sharded = Sampler(mesh, decode_slots=4, attention_block=16)  # 4 slots: one per data shard
    r = sharded.generate(sharded_model, PROMPTS, **SAMPLED_ARGS)
    assert sharded.last_stats["decode_slots"] == 4
    np.testing.assert_array_equal(r.tokens, sampled.tokens)
    np.testing.assert_array_equal(r.lengths, sampled.lengths)
    np.testing.assert_array_equal(r.finished, sampled.finished)
    np.testing.assert_allclose(r.logprobs, sampled.logprobs, atol=1e-5)
    # the KV cache is split over the batch (data x fsdp) and kv-head (tensor) axes, not replicated
    (programs,) = sharded._programs.values()
    for cache_sharding in jax.tree.leaves(programs.decode.input_shardings[0][1].cache.k):  # layers x blocks
        assert cache_sharding.spec[0] == ("data", "fsdp") and cache_sharding.spec[1] == "tensor"  # [B, K, H, C]
        assert not cache_sharding.is_fully_replicated


# ----------------------------------------------------------------------------- compilation


def test_no_recompilation_within_bucket(model, sampler, sampled):
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        count = sampler.num_compilations
        # new prompt lengths and a smaller batch (a dummy row), same buckets (4 prompts, length 16)
        same_first = sampler.generate(model, [PROMPTS[0], [9] * 14, [4, 4]], **SAMPLED_ARGS)
        other_key = sampler.generate(model, [PROMPTS[0], [3] * 16, [5]], **dict(SAMPLED_ARGS, key=jax.random.key(12)))
        assert sampler.num_compilations == count
        assert not compiles, "a call in the same bucket compiled something"
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    # a row's samples depend only on its prompt, its index and the key, not on the other rows
    np.testing.assert_array_equal(same_first.tokens[:3], sampled.tokens[:3])
    np.testing.assert_array_equal(same_first.logprobs[:3], sampled.logprobs[:3])
    assert not np.array_equal(other_key.tokens[:3], sampled.tokens[:3])
    assert same_first.tokens.shape == (9, 24) and other_key.tokens.shape == (9, 24)
    sampler.generate(model, PROMPTS + [[1, 2]], **SAMPLED_ARGS)  # 5 prompts -> batch bucket 8: new programs
    assert sampler.num_compilations == count + 2


def test_argument_validation(model):
    with pytest.raises(ValueError):
        generate(model, [[]], max_new_tokens=3, key=jax.random.key(0))
    with pytest.raises(ValueError):
        generate(model, [[VOCAB]], max_new_tokens=3, key=jax.random.key(0))
    with pytest.raises(ValueError):
        generate(model, [[1]], max_new_tokens=3, top_p=0.0, key=jax.random.key(0))


# ----------------------------------------------------------------------------- decode slots


def _compile_events():
    """A list that collects every XLA compilation while the returned listener is registered."""
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    return events, listener


@pytest.mark.parametrize("slots,refill", [(5, "loop"), (2, "chunks")])
def test_decode_slots_match_static_batch(model, sampled, slots, refill):
    """Any K, either refill mode: the same tokens and log-probs as one slot per row. (Log-probs to
    float rounding: XLA:CPU's matmul kernels may round differently for a different number of rows
    per step; on this model they agree bit for bit.)"""
    slotted = Sampler(decode_slots=slots, refill=refill, chunk_steps=3, attention_block=16)
    r = slotted.generate(model, PROMPTS, **SAMPLED_ARGS)
    np.testing.assert_array_equal(r.tokens, sampled.tokens)
    np.testing.assert_allclose(r.logprobs, sampled.logprobs, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(r.lengths, sampled.lengths)
    np.testing.assert_array_equal(r.finished, sampled.finished)
    stats = slotted.last_stats
    assert stats["decode_slots"] == slots and slotted.num_compilations == 2
    assert stats["new_tokens"] == sampled.lengths.sum()
    # K slots finish the work in fewer slot-steps than one slot per row would spend
    assert stats["decode_steps"] * slots < len(sampled.lengths) * (sampled.lengths.max() - 1)
    assert 0.5 < stats["slot_utilisation"] <= 1.0
    if refill == "chunks":
        assert stats["decode_calls"] > 1


def test_stream_hands_back_groups_as_they_finish(model, sampled):
    streamer = Sampler(decode_slots=2, stream_steps=4, attention_block=16)
    parts = list(streamer.stream(model, PROMPTS, **SAMPLED_ARGS))
    all_steps = streamer.last_stats["decode_steps"]
    assert len(parts) > 1  # groups came back before the last one was done
    assert streamer.last_stats["decode_calls"] > len(parts) - 1
    seen = np.concatenate([p.prompt_index for p in parts])
    np.testing.assert_array_equal(np.sort(seen), np.repeat(np.arange(len(PROMPTS)), 3))
    for part in parts:
        assert part.n == 3 and part.num_prompts * 3 == part.num_rows
        rows = np.concatenate([np.arange(i * 3, i * 3 + 3) for i in part.prompt_index[::3]])
        for name in ("tokens", "lengths", "finished", "response_mask", "prompt_tokens"):
            np.testing.assert_array_equal(getattr(part, name), getattr(sampled, name)[rows], err_msg=name)
        np.testing.assert_allclose(part.logprobs, sampled.logprobs[rows], rtol=0, atol=1e-5)
    # the groups come out in the order they finished: the last one holds the longest row
    assert parts[-1].lengths.max() == sampled.lengths.max()
    # a caller that has enough groups stops iterating: the rows still decoding are dropped
    first = next(iter(streamer.stream(model, PROMPTS, **SAMPLED_ARGS)))
    np.testing.assert_array_equal(first.tokens, parts[0].tokens)
    assert streamer.last_stats["decode_steps"] < all_steps
    events, listener = _compile_events()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:  # generate and stream share the programs
        streamer.generate(model, PROMPTS, **SAMPLED_ARGS)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not events and streamer.num_compilations == 2


def test_decode_state_is_a_typed_pytree():
    fields = {f.name for f in dataclasses.fields(DecodeState)}
    assert set(DecodeState.LOGICAL_AXES) == fields - {"cache"}
    leaves = jax.tree.leaves(DecodeState(cache=KVCache(*range(5)), **{f: 0 for f in DecodeState.LOGICAL_AXES}))
    assert len(leaves) == len(fields) - 1 + 5


def test_sampler_argument_validation():
    with pytest.raises(ValueError, match="decode_slots"):
        Sampler(decode_slots=0)
    with pytest.raises(ValueError, match="refill"):
        Sampler(refill="sometimes")


def test_one_shot_generate_reuses_programs(model):
    call = lambda: generate(model, [[5, 6, 7], [9]], max_new_tokens=3, n=2, temperature=0.0, key=jax.random.key(0))
    first = call()
    events, listener = _compile_events()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        second = call()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not events, "the second one-shot generate compiled again"
    np.testing.assert_array_equal(first.tokens, second.tokens)
