"""Train state and jitted steps: sharding invariance, accumulation, gradients, PRM learning, NaN skip."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from prime_jax.models import Qwen2Config, Qwen2ForCausalLM
from prime_jax.parallel import make_mesh
from prime_jax.train import (
    create_train_state,
    make_optimizer,
    make_train_steps,
    merge_micro_batches,
    sequence_logprobs,
    split_micro_batches,
    split_params,
)
from prime_jax.train.batch import PrimeBatch

CFG = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
N, GROUPS, P, R = 2, 4, 5, 6
B = N * GROUPS
SGD = optax.sgd(1.0)  # new params = params - grad: compares gradients, not Adam's sign-like step
ADAM = make_optimizer(1e-3, weight_decay=0.0, clip_norm=10.0)  # a PRM optimizer with a test-sized lr
# Tests share compiled programs (same mesh, optimizer, micro-batches) to stay fast on 2 CPU cores.


@pytest.fixture(scope="module")
def model():
    return Qwen2ForCausalLM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def meshes():
    return {"8dev": make_mesh(2, 2, 2), "1dev": make_mesh(1, 1, 1, devices=jax.devices()[:1])}


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(2, P + 1, size=B)
    resp_len = rng.integers(1, R + 1, size=B)
    resp_len[0] = R
    prompt_mask = (np.arange(P)[None] >= P - prompt_len[:, None]).astype(np.int32)
    response_mask = (np.arange(R)[None] < resp_len[:, None]).astype(np.int32)
    outcome = np.tile([1.0, 0.0], GROUPS).astype(np.float32)
    outcome[2:4] = [0.0, 1.0]
    return {
        "prompt_ids": (rng.integers(0, CFG.vocab_size, (B, P)) * prompt_mask).astype(np.int32),
        "prompt_mask": prompt_mask,
        "response_ids": (rng.integers(0, CFG.vocab_size, (B, R)) * response_mask).astype(np.int32),
        "response_mask": response_mask,
        # random-init logits are ~0, so log-probs ~ -log(64); +-0.3 noise makes some ratios clip
        "old_logprobs": (-math.log(CFG.vocab_size) + 0.3 * rng.standard_normal((B, R))).astype(np.float32),
        "advantages": rng.standard_normal((B, R)).astype(np.float32),
        "ref_logprobs": (-math.log(CFG.vocab_size) + 0.1 * rng.standard_normal((B, R))).astype(np.float32),
        "outcome": outcome,
        "group_scores": rng.standard_normal(B).astype(np.float32),  # the dpo / bon_* losses' Q_bc
    }


_STEPS = {}


def steps_for(model, mesh, opt, k=1, **kw):
    kw = {"agg": "seq-mean-token-mean", "prm_loss_type": "ce", **kw}
    key = (id(mesh), id(opt), k, tuple(sorted(kw.items())))
    if key not in _STEPS:
        _STEPS[key] = make_train_steps(model, opt, opt, mesh, n=N, micro_batches=k, **kw)
    return _STEPS[key]


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_close(a, b, atol=1e-5):
    for x, y in zip(host(a), host(b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def run(model, mesh, step_name, opt=SGD, batch=None, k=1, **kw):
    steps = steps_for(model, mesh, opt, k, **kw)
    state = create_train_state(model, opt, mesh)
    state, metrics = getattr(steps, step_name)(state, PrimeBatch(**(make_batch() if batch is None else batch)))
    return state, jax.device_get(metrics)


def test_micro_batches_keep_groups_and_round_trip():
    x = np.arange(B * 3).reshape(B, 3)
    mbs = np.asarray(split_micro_batches(x, 2, N))
    assert mbs.shape == (2, B // 2, 3)
    group_of_row = mbs[..., 0] // 3 // N  # each micro-batch holds whole groups
    np.testing.assert_array_equal(group_of_row, [[0, 0, 2, 2], [1, 1, 3, 3]])
    np.testing.assert_array_equal(np.asarray(merge_micro_batches(mbs, 2, N)), x)


def test_state_is_sharded_by_logical_rules(model, meshes):
    state = create_train_state(model, ADAM, meshes["8dev"])
    q = state.params["layers"]["q_kernel"]
    mu = state.opt_state[1][0].mu["layers"]["q_kernel"]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    assert q.sharding.spec == mu.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert int(state.step) == 0 and int(state.nan_skips) == 0


@pytest.mark.parametrize("step_name", ["policy", "prm"])
def test_sharded_step_matches_single_device(model, meshes, step_name):
    state8, metrics8 = run(model, meshes["8dev"], step_name, k=2)
    state1, metrics1 = run(model, meshes["1dev"], step_name, k=2)
    assert_trees_close(state8.params, state1.params)
    assert_trees_close(metrics8, metrics1)
    assert state8.params["layers"]["gate_kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


@pytest.mark.parametrize("step_name,agg,prm_loss_type", [
    ("policy", "seq-mean-token-mean", "ce"), ("policy", "token-mean", "ce"), ("prm", "seq-mean-token-mean", "ce"),
    ("prm", "seq-mean-token-mean", "dpo"), ("prm", "seq-mean-token-mean", "bon_rm"),
    ("prm", "seq-mean-token-mean", "pairwise")])
def test_accumulation_equals_whole_mini_batch(model, meshes, step_name, agg, prm_loss_type):
    kw = {"agg": agg, "prm_loss_type": prm_loss_type}
    whole, m_whole = run(model, meshes["1dev"], step_name, k=1, **kw)
    accum, m_accum = run(model, meshes["1dev"], step_name, k=2, **kw)
    assert_trees_close(whole.params, accum.params)
    assert_trees_close(m_whole, m_accum)
    assert m_whole["grad_norm"] > 1e-3  # the comparison is not vacuous


def test_policy_gradient_at_ratio_one(model, meshes):
    mesh = meshes["8dev"]
    steps = steps_for(model, mesh, SGD, 2)
    graphdef, params = split_params(model)
    batch = make_batch()
    batch["old_logprobs"] = np.asarray(steps.score(params, None, None, PrimeBatch(**batch))["old_logprobs"])
    new_state, metrics = steps.policy(create_train_state(model, SGD, mesh), PrimeBatch(**batch))
    step_grad = jax.tree.map(lambda p, q: p - q, params, new_state.params)

    def explicit(p):  # -mean_b (1/|b|) sum_t A * log pi  (seq-mean-token-mean)
        lp = sequence_logprobs(graphdef, p, PrimeBatch(**batch), temperature=1.0, chunk_size=128)
        mask = batch["response_mask"]
        return -jnp.mean(jnp.sum(batch["advantages"] * lp * mask, -1) / jnp.sum(mask, -1))

    assert_trees_close(step_grad, jax.jit(jax.grad(explicit))(params))
    assert abs(float(metrics["ratio_max"]) - 1.0) < 1e-5
    assert float(metrics["clip_frac"]) == 0.0 and abs(float(metrics["approx_kl"])) < 1e-6


def test_score_matches_direct_logprobs(model, meshes):
    steps = steps_for(model, meshes["8dev"], SGD, 2)
    _, params = split_params(model)
    batch = make_batch()
    out = jax.device_get(steps.score(params, params, params, PrimeBatch(**batch)))
    direct = jax.jit(sequence_logprobs, static_argnums=(0, 4))(nnx.graphdef(model), params, PrimeBatch(**batch),
                                                               1.0, 128)
    direct = np.asarray(direct) * batch["response_mask"]
    for key in ("old_logprobs", "prm_logprobs", "ref_logprobs"):
        np.testing.assert_allclose(out[key], direct, atol=1e-5)


@pytest.mark.parametrize("prm_loss_type", ["ce", "dpo", "pairwise"])
def test_prm_learns_outcomes(model, meshes, prm_loss_type):
    mesh = meshes["8dev"]
    steps = steps_for(model, mesh, ADAM, 2, prm_loss_type=prm_loss_type)
    _, params = split_params(model)
    batch = make_batch()
    score = steps_for(model, mesh, SGD, 2).score
    batch["ref_logprobs"] = np.asarray(score(params, None, params, PrimeBatch(**batch))["ref_logprobs"])
    batch["group_scores"] = np.zeros(B, np.float32)  # the scoring pass of a PRM equal to its reference
    state = create_train_state(model, ADAM, mesh)  # PRM == reference: q = 0, loss = log 2
    losses, accs = [], []
    for _ in range(15):
        state, metrics = steps.prm(state, PrimeBatch(**batch))
        losses.append(float(metrics["loss"]))
        accs.append(float(metrics["dpo_accuracy"]))
    assert abs(losses[0] - math.log(2)) < 1e-5
    assert losses[-1] < losses[0] - 0.05, losses
    assert accs[-1] > 0.5, accs
    assert int(state.step) == 15 and int(state.nan_skips) == 0


def test_prm_and_reference_logprobs_ignore_the_temperature(model, meshes):
    """PRIME_SPEC: the policy's log-probs use logits / temperature, the PRM's and the reference's the raw
    logits; the PRM step's q are those of its forward before the update."""
    mesh = meshes["8dev"]
    hot = steps_for(model, mesh, SGD, 2, temperature=0.5)
    _, params = split_params(model)
    batch = PrimeBatch(**make_batch())
    raw = jax.device_get(steps_for(model, mesh, SGD, 2).score(params, None, None, batch))["old_logprobs"]
    out = jax.device_get(hot.score(params, params, params, batch))
    np.testing.assert_allclose(out["prm_logprobs"], raw, atol=1e-5)
    np.testing.assert_allclose(out["ref_logprobs"], raw, atol=1e-5)
    assert np.abs(out["old_logprobs"] - raw).max() > 1e-2  # the policy's do use it
    state, metrics = hot.prm(create_train_state(model, SGD, mesh), batch)
    np.testing.assert_allclose(np.asarray(metrics["q"]), (raw - batch.ref_logprobs) * batch.response_mask,
                               atol=1e-5)


@pytest.mark.parametrize("step_name,key", [("policy", "advantages"), ("policy", "old_logprobs"),
                                           ("prm", "ref_logprobs")])
def test_nan_batch_is_skipped(model, meshes, step_name, key):
    mesh = meshes["8dev"]
    steps = steps_for(model, mesh, ADAM, 2)
    state = create_train_state(model, ADAM, mesh)
    before = host((state.params, state.opt_state))  # the step donates its input state
    bad = make_batch()
    bad[key] = bad[key].copy()
    bad[key][1, 0] = np.nan
    state, metrics = getattr(steps, step_name)(state, PrimeBatch(**bad))
    assert int(metrics["nan_skipped"]) == 1
    assert int(state.nan_skips) == 1 and int(state.step) == 0
    for x, y in zip(before, host((state.params, state.opt_state)), strict=True):
        np.testing.assert_array_equal(x, y)
    state, metrics = getattr(steps, step_name)(state, PrimeBatch(**make_batch()))  # a clean batch still trains
    assert int(metrics["nan_skipped"]) == 0 and int(state.step) == 1 and int(state.nan_skips) == 1
    assert not np.array_equal(host(state.params)[0], before[0])


def test_bf16_compute_keeps_fp32_master_params_and_remat(model, meshes):
    mesh = meshes["1dev"]
    bf16 = Qwen2ForCausalLM(CFG.replace(dtype="bfloat16", remat="full"), rngs=nnx.Rngs(0))  # same init
    _, params = split_params(model)
    fp32_state, fp32_metrics = run(model, mesh, "policy", k=2)
    state, metrics = run(bf16, mesh, "policy", k=2)
    assert all(x.dtype == np.float32 for x in host(state.params))
    assert abs(float(metrics["loss"]) - float(fp32_metrics["loss"])) < 2e-2
    step = np.concatenate([(p - q).ravel() for p, q in zip(host(params), host(state.params))])
    fp32_step = np.concatenate([(p - q).ravel() for p, q in zip(host(params), host(fp32_state.params))])
    assert np.dot(step, fp32_step) / (np.linalg.norm(step) * np.linalg.norm(fp32_step)) > 0.99


@pytest.mark.parametrize("mode", ["after", "before", "reverse", "none"])
def test_prm_phase_modes(model, meshes, mode):
    """prm_phase.run_prm_phase: which q the policy gets (and which are 'fresh') in each algo.prm_update mode,
    two PRM mini-batches per phase."""
    from prime_jax import algo
    from prime_jax.train.prm_phase import run_prm_phase

    mesh = meshes["8dev"]
    steps = steps_for(model, mesh, ADAM, 2)
    batch = make_batch()
    prime_batch = PrimeBatch(**batch)
    take_rows = lambda rows: prime_batch.rows(rows).to_device(mesh)
    state = create_train_state(model, ADAM, mesh)
    start = host(state.params)
    q_of = lambda params: (np.asarray(steps.score(None, params, None, prime_batch)["prm_logprobs"])
                           - batch["ref_logprobs"]) * batch["response_mask"]
    q_start = q_of(state.params)
    state, q_given, metrics = run_prm_phase(steps, state, prime_batch, mode=mode, mini_batch=B // 2, n=N,
                                            take_rows=take_rows)
    updates = 0 if mode == "none" else 2
    assert int(state.step) == updates
    moved = any(np.abs(a - b).max() > 0 for a, b in zip(host(state.params), start))
    assert moved == (mode != "none")
    if mode == "none":  # one scoring pass, no update
        np.testing.assert_allclose(q_given, q_start, atol=1e-5)
    elif mode == "before":  # scored by the updated PRM
        np.testing.assert_allclose(q_given, q_of(state.params), atol=1e-5)
    else:  # after / reverse (veRL: update_rm's scores): each mini-batch's own forward; the first is the start PRM's
        np.testing.assert_allclose(q_given[: B // 2], q_start[: B // 2], atol=1e-5)
        assert np.abs(q_given[B // 2:] - q_start[B // 2:]).max() > 1e-6
    acc = lambda q: float(algo.dpo_accuracy(q, batch["response_mask"], batch["outcome"], N))
    # fresh: the first scoring pass (reverse, none), else the updates' own forwards (the first one the start PRM's)
    fresh = q_start if mode in ("reverse", "none") else q_given if mode == "after" else None
    if fresh is not None:
        assert metrics["prm/dpo_accuracy"] == pytest.approx(acc(fresh), abs=1e-6)
    assert metrics["prm/dpo_accuracy_given"] == pytest.approx(acc(q_given), abs=1e-6)
    for key in ("prm/dpo_abs_accuracy", "prm/q_sum_correct", "prm/q_sum_wrong", "time/prm_s"):
        assert key in metrics
    assert ("prm/loss" in metrics) == (mode != "none")
    with pytest.raises(ValueError, match="unknown PRM update mode"):
        run_prm_phase(steps, state, prime_batch, mode="double", mini_batch=B // 2, n=N, take_rows=take_rows)


def test_reverse_gives_dpo_the_first_pass_group_scores(model, meshes):
    """algo.prm_update "reverse" as veRL's compute_reward runs it: a scoring pass whose sums of q per row are the dpo
    loss's group scores (Q_bc) for every update, then update_rm's passes, whose q the policy gets; the first update's
    loss is the numpy twin of veRL's loss on those scores (one row per micro-batch)."""
    from test_algo import np_prm_dpo_loss

    from prime_jax.train.prm_phase import run_prm_phase

    mesh = meshes["1dev"]
    steps = steps_for(model, mesh, ADAM, 1, prm_loss_type="dpo")
    batch = make_batch()
    del batch["group_scores"]
    prime_batch = PrimeBatch(**batch)
    take_rows = lambda rows: prime_batch.rows(rows).to_device(mesh)
    state = create_train_state(model, ADAM, mesh)
    prm_lp = np.asarray(steps.score(None, state.params, None, prime_batch)["prm_logprobs"])
    q_start = (prm_lp - batch["ref_logprobs"]) * batch["response_mask"]
    state, q_given, metrics = run_prm_phase(steps, state, prime_batch, mode="reverse", mini_batch=B // 2, n=N,
                                            take_rows=take_rows, group_scores=True)
    # the twin: the same updates, each mini-batch with the first pass's scores
    twin = create_train_state(model, ADAM, mesh)
    scores = q_start.sum(1)
    twin_q, losses = [], []
    for rows in (np.arange(B // 2), np.arange(B // 2, B)):
        twin, m = steps.prm(twin, prime_batch.rows(rows).replace(group_scores=scores[rows]))
        twin_q.append(np.asarray(m["q"]))
        losses.append(float(m["loss"]))
    assert_trees_close(state.params, twin.params)
    np.testing.assert_allclose(q_given, np.concatenate(twin_q), atol=1e-5)
    assert metrics["prm/loss"] == pytest.approx(np.mean(losses), abs=1e-6)
    rows = np.arange(B // 2)
    want = np_prm_dpo_loss(prm_lp[rows], batch["ref_logprobs"][rows], batch["response_mask"][rows],
                           batch["outcome"][rows], scores[rows], N, beta=0.05)
    assert losses[0] == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="only mode 'reverse'"):
        run_prm_phase(steps, state, prime_batch, mode="after", mini_batch=B // 2, n=N, take_rows=take_rows,
                      group_scores=True)
