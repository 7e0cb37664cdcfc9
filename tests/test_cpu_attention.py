"""The CPU decode-attention kernel (`prime_jax.kernels.cpu_attention`) against the XLA path it
replaces (`qwen2.decode_attention` with `PRIME_CPU_ATTENTION=0`) and against one softmax over the
whole cache: same attention to float rounding, same cache writes bit for bit."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prime_jax.kernels import cpu_attention
from prime_jax.models.qwen2 import cached_attention, decode_attention

def test_the_kernel_builds_where_there_is_a_compiler():
    """Where a C++ compiler exists (CI, this box) the kernel must build: a silent fallback would hide
    a broken kernel behind the XLA path."""
    if cpu_attention._compiler() is None:
        pytest.skip("no C++ compiler")
    assert cpu_attention.available()


def _inputs(rng, B, K, G, H, S, P=0, prefix_len=0):
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    arrays = dict(q=normal(B, K * G, H), k=normal(B, K, H, S), v=normal(B, K, S, H), k_new=normal(B, K, H),
                  v_new=normal(B, K, H))
    if P:
        prefix_valid = np.ones((P, prefix_len), bool)
        prefix_valid[0, :5] = False  # left padding
        arrays["prefix"] = (normal(P, K, H, prefix_len), normal(P, K, prefix_len, H), jnp.asarray(prefix_valid))
    return arrays


def _attend(monkeypatch, kernel: bool, a, columns, valid, num_columns, scale, block):
    """decode_attention through a fresh jit (the path is chosen at trace time)."""
    monkeypatch.setenv("PRIME_CPU_ATTENTION", "1" if kernel else "0")
    blocks = lambda x, axis: tuple(jax.lax.slice_in_dim(x, i, i + block, axis=axis)  # noqa: E731
                                   for i in range(0, x.shape[axis], block))
    fn = jax.jit(lambda *args: decode_attention(*args[:8], scale, *args[8:]))
    out, k_blocks, v_blocks = fn(a["q"], a["k_new"], a["v_new"], blocks(a["k"], 3), blocks(a["v"], 2),
                                 jnp.asarray(columns, jnp.int32), jnp.asarray(valid), jnp.int32(num_columns),
                                 *((a["prefix"],) if "prefix" in a else ()))
    return np.asarray(out), np.concatenate(k_blocks, axis=3), np.concatenate(v_blocks, axis=2)


@pytest.mark.parametrize("scale", [0.125, 0.3])  # exact power of two (q pre-scaled in XLA's path) or not
def test_kernel_matches_xla_and_one_softmax(monkeypatch, scale):
    """Rows at different columns (decode slots), a row whose first block is all padding, a row that
    starts inside a block, blocks past the longest row; G = 2 query heads per kv head, H = 32."""
    if not cpu_attention.available():
        pytest.skip("kernel not built")
    rng = np.random.default_rng(0)
    B, K, G, S, H, block = 4, 2, 2, 64, 32, 16
    a = _inputs(rng, B, K, G, H, S)
    columns = np.array([29, 20, 44, 3])
    valid = np.zeros((B, S), bool)
    valid[0, 10:30] = True
    valid[1, 20:21] = True
    valid[2, :45] = True
    valid[3, :4] = True
    k_written, v_written = np.asarray(a["k"]).copy(), np.asarray(a["v"]).copy()
    k_written[np.arange(B), :, :, columns] = a["k_new"]
    v_written[np.arange(B), :, columns, :] = a["v_new"]
    expected = np.asarray(cached_attention(a["q"][:, None], jnp.asarray(k_written), jnp.asarray(v_written),
                                           jnp.asarray(valid)[:, None, None], scale)[:, 0])
    reference, *_ = _attend(monkeypatch, False, a, columns, valid, 45, scale, block)
    results = []
    for num_columns in (45, 48, 64):
        out, k_blocks, v_blocks = _attend(monkeypatch, True, a, columns, valid, num_columns, scale, block)
        np.testing.assert_array_equal(k_blocks, k_written)
        np.testing.assert_array_equal(v_blocks, v_written)
        results.append(out)
    np.testing.assert_allclose(results[0], expected, atol=2e-6)
    np.testing.assert_allclose(results[0], reference, atol=2e-6)
    for other in results[1:]:  # blocks past the longest row change nothing, bit for bit
        np.testing.assert_array_equal(other, results[0])


@pytest.mark.parametrize("G", [3, 1])  # SmolLM2's 9/3 heads (4 x 3 = 12 query rows per prefix task); MHA
def test_kernel_with_a_shared_prefix_matches_xla(monkeypatch, G):
    if not cpu_attention.available():
        pytest.skip("kernel not built")
    rng = np.random.default_rng(1)
    P, n, K, S, H, block, prefix_len = 2, 4, 3, 32, 64, 16, 40
    B = P * n
    a = _inputs(rng, B, K, G, H, S, P, prefix_len)
    columns = np.array([0, 3, 20, 7, 1, 17, 31, 9])
    valid = np.arange(S)[None, :] <= columns[:, None]
    kernel, k_kernel, v_kernel = _attend(monkeypatch, True, a, columns, valid, 32, 0.125, block)
    xla, k_xla, v_xla = _attend(monkeypatch, False, a, columns, valid, 32, 0.125, block)
    np.testing.assert_allclose(kernel, xla, atol=2e-6)
    np.testing.assert_array_equal(k_kernel, k_xla)
    np.testing.assert_array_equal(v_kernel, v_xla)
    rows = np.arange(B) // n  # and against one softmax over prefix + own columns
    full_k = jnp.concatenate([a["prefix"][0][rows], jnp.asarray(k_kernel)], axis=3)
    full_v = jnp.concatenate([a["prefix"][1][rows], jnp.asarray(v_kernel)], axis=2)
    full_valid = jnp.concatenate([a["prefix"][2][rows], jnp.asarray(valid)], axis=1)
    expected = cached_attention(a["q"][:, None], full_k, full_v, full_valid[:, None, None], 0.125)[:, 0]
    np.testing.assert_allclose(kernel, np.asarray(expected), atol=2e-6)


def test_a_row_with_nothing_to_read_gets_zeros(monkeypatch):
    """A free decode slot (no valid column, its write column past the cache) gives zeros, never NaN."""
    if not cpu_attention.available():
        pytest.skip("kernel not built")
    rng = np.random.default_rng(2)
    a = _inputs(rng, 2, 1, 2, 16, 16)
    valid = np.zeros((2, 16), bool)
    valid[0, :3] = True
    out, k_blocks, _ = _attend(monkeypatch, True, a, np.array([2, 16]), valid, 3, 0.25, 16)
    assert np.isfinite(out).all() and (out[1] == 0).all()
    np.testing.assert_array_equal(k_blocks[1], np.asarray(a["k"])[1])  # nothing written for the free slot


def test_without_a_compiler_the_xla_path_runs(monkeypatch, tmp_path):
    """No compiler: not available (the model keeps XLA's attention); a failing build says why."""
    monkeypatch.setattr(cpu_attention, "_compiler", lambda: None)
    assert not cpu_attention.available.__wrapped__()
    with pytest.raises(RuntimeError, match="failed"):
        cpu_attention.build(shutil.which("false") or "/bin/false", tmp_path)


def test_disabled_by_the_environment_or_a_larger_mesh(monkeypatch):
    from prime_jax.parallel import make_mesh, under_mesh

    q, k_blocks = jnp.zeros((2, 4, 32)), (jnp.zeros((2, 2, 32, 16)),)
    if cpu_attention.available():
        assert cpu_attention.applies(q, k_blocks, None)
    monkeypatch.setenv("PRIME_CPU_ATTENTION", "0")
    assert not cpu_attention.applies(q, k_blocks, None)
    monkeypatch.setenv("PRIME_CPU_ATTENTION", "1")
    if jax.device_count() > 1:  # the tests' 8 fake devices: a mesh over them keeps XLA's (sharded) path
        assert not under_mesh(lambda: cpu_attention.applies(q, k_blocks, None), make_mesh())()
