"""The plan's rollout cost model: its schedule against a step-by-step simulation of the sampler's
slots, its length distribution, and the roofline arithmetic of one step by hand."""

import numpy as np
import pytest

from prime_jax.plan import rollout_cost as rc
from prime_jax.models.config import Qwen2Config

MODEL = rc.ModelShape(params=1_000_000, layers=2, kv_heads=2, head_size=8, query_heads=4, bytes_per_value=2)
ACCEL = rc.Accelerator("test", bf16_flops=1e12, hbm_bytes_per_s=1e11)


def simulate_slots(lengths, slots, prompt_tokens):
    """Step by step, as sampling/decode.py runs it: idle slots take the next queued row before a
    step; every live slot makes one token; a slot idles once its row has all its tokens."""
    remaining = np.zeros(slots, int)
    made = np.zeros(slots, int)
    queue = list(lengths)
    context, live_positions = [], []
    while True:
        for s in range(slots):
            if remaining[s] == 0 and queue:
                remaining[s], made[s] = queue.pop(0), 0
        live = remaining > 0
        if not live.any():
            return np.array(context), np.array(live_positions)
        made[live] += 1
        remaining[live] -= 1
        context.append(prompt_tokens + made[live].max())
        live_positions.append(int((prompt_tokens + made[live]).sum()))


@pytest.mark.parametrize("slots", [1, 3, 8, 40])
def test_slot_trace_matches_a_step_by_step_simulation(slots):
    lengths = np.random.default_rng(slots).integers(1, 50, size=40)
    trace = rc.slot_trace(lengths, slots, prompt_tokens=5)
    context, live_positions = simulate_slots(lengths, slots, 5)
    np.testing.assert_array_equal(trace.context, context)
    np.testing.assert_array_equal(trace.live_positions, live_positions)
    assert (trace.rows == slots).all()
    # Every token is made once: utilisation is tokens / (steps * slots).
    assert rc.utilisation([trace], lengths) == pytest.approx(lengths.sum() / (len(context) * slots))


def test_one_slot_per_row_is_the_static_batch():
    lengths = np.array([3, 9, 1, 4])
    static, slotted = rc.static_trace(lengths, 7), rc.slot_trace(lengths, 4, 7)
    for field in ("rows", "context", "live_positions"):
        np.testing.assert_array_equal(getattr(static, field), getattr(slotted, field))
    assert static.steps == 9 and rc.utilisation([static], lengths) == pytest.approx(17 / 36)


def test_response_lengths_have_the_asked_percentiles_and_cap():
    lengths = rc.response_lengths(p50=200, p90=800, cap=1000, count=40_000, seed=1)
    assert np.percentile(lengths, 50) == pytest.approx(200, rel=0.03)
    assert np.percentile(lengths, 90) == pytest.approx(800, rel=0.03)
    assert lengths.max() == 1000 and lengths.min() >= 1
    np.testing.assert_array_equal(lengths, rc.response_lengths(200, 800, 1000, 40_000, seed=1))
    with pytest.raises(ValueError, match="p50 <= p90"):
        rc.response_lengths(900, 800, 1000, 10)


def test_step_seconds_by_hand():
    trace = rc.ShardTrace(rows=np.array([4]), context=np.array([100]), live_positions=np.array([250]))
    weights = MODEL.params * 2
    kv_per_position = 2 * 2 * 2 * 8 * 2
    # Memory bound here: weights + 4 rows x 100 positions of cache against the bandwidth.
    read = (weights + 4 * 100 * kv_per_position) / 1e11
    flops = (4 * 2 * MODEL.params + 4 * 100 * 4 * 2 * 4 * 8) / 1e12
    assert rc.trace_seconds(trace, MODEL, ACCEL, tensor=1) == pytest.approx(max(read, flops))
    paged = (weights + 250 * kv_per_position) / 1e11
    assert rc.trace_seconds(trace, MODEL, ACCEL, tensor=1, paged=True) == pytest.approx(paged)
    assert rc.trace_seconds(trace, MODEL, ACCEL, tensor=2) == pytest.approx(max(read, flops) / 2)


def test_slots_win_when_the_cache_read_dominates_and_lose_when_weights_do():
    lengths = rc.response_lengths(100, 600, 1024, 64 * 4, seed=0)
    common = dict(prompts=64, n=4, prompt_tokens=256, shards=2, tensor=1, accel=ACCEL)
    long_kv = rc.ModelShape(params=1_000, layers=8, kv_heads=8, head_size=64, query_heads=8, bytes_per_value=2)
    static = rc.estimate_rollout(lengths, model=long_kv, **common)
    slots = rc.estimate_rollout(lengths, model=long_kv, slots=64, **common)
    assert slots.utilisation > 2 * static.utilisation and slots.seconds < static.seconds
    heavy = rc.ModelShape(params=10**10, layers=1, kv_heads=1, head_size=8, query_heads=1, bytes_per_value=2)
    # Bound by reading the weights: every step costs the same, so fewer rows per step only adds steps.
    common["accel"] = rc.Accelerator("fast-compute", bf16_flops=1e18, hbm_bytes_per_s=1e11)
    assert rc.estimate_rollout(lengths, model=heavy, slots=16, **common).seconds > \
        rc.estimate_rollout(lengths, model=heavy, **common).seconds


def test_model_shape_counts_qwen2_weights():
    mcfg = Qwen2Config(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    shape = rc.ModelShape.from_qwen2(mcfg)
    per_layer = 16 * (16 + 2 * 8) + 16 * 16 + 3 * 16 * 32
    assert shape.params == 2 * per_layer + 16 * 100
    assert shape.kv_bytes_per_position == 2 * 2 * 2 * 4 * 2


def test_table_is_labelled_an_estimate_and_names_every_accelerator():
    lines = rc.rollout_table(MODEL, prompts=8, n=4, prompt_tokens=64, max_new_tokens=256, shards=2, tensor=1,
                             slots=0, accelerators=["v5p", "h100"], p50=40, p90=150)
    text = "\n".join(lines)
    assert "ESTIMATE" in text and "docs/scale_out.md" in text and "16 slots" in text
    assert any(line.strip().startswith("v5p") for line in lines) and any(l.strip().startswith("h100") for l in lines)
    with pytest.raises(ValueError, match="no peak numbers"):
        rc.Accelerator.named("cpu")
