"""The decode step's attention on CPU as an XLA FFI custom call (`decode_attention_cpu.cc`).

XLA:CPU runs a decode step's attention as batched dots of a row's few query heads against its own
cache block, reading the cache at about a third of the memory bandwidth; at SmolLM2's shape that is
a third of the step. The kernel streams each block once for all of a row's query heads (and a shared
prompt once for its n samples), so the step reads the cache about as fast as memory allows.

It is compiled from its C++ source on first use with the machine's C++ compiler (`c++`, `g++` or
`$CXX`) against jaxlib's FFI headers, cached under the project's cache (`~/.cache/prime_jax/kernels`;
`$PRIME_JAX_CACHE` moves it), and used only when the program runs on one CPU device (no mesh, or a
mesh of one). Without a compiler, or with `PRIME_CPU_ATTENTION=0`, `qwen2.decode_attention` keeps
its XLA path, which is also the reference the tests compare the kernel with (equal to float rounding).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from prime_jax.cache import cache_root

SOURCE = Path(__file__).with_name("decode_attention_cpu.cc")
TARGET = "prime_decode_attention"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp-simd", "-shared", "-fPIC", "-w")
# The kernel's limits (decode_attention_cpu.cc): query rows per task, columns per block or prefix.
MAX_QUERIES, MAX_COLUMNS, MAX_HEAD = 64, 512, 256

log = logging.getLogger(__name__)


def enabled() -> bool:
    """False when `PRIME_CPU_ATTENTION=0` (read at trace time: set it before the program compiles)."""
    return os.environ.get("PRIME_CPU_ATTENTION", "1") != "0"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(compiler: str, cache_dir: Path) -> Path:
    """The kernel's shared library, compiled into `cache_dir` unless a build of the same source,
    flags, jaxlib and CPU is there (written to a temporary name, then renamed: concurrent processes
    never load a half-written file)."""
    import jaxlib

    cpu = Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0] if Path(
        "/proc/cpuinfo").exists() else os.uname().machine
    key = hashlib.sha256("\0".join((SOURCE.read_text(), " ".join(FLAGS), compiler, jaxlib.__version__, cpu)).encode())
    library = cache_dir / f"decode_attention_cpu-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        partial = Path(scratch) / library.name
        command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(partial, library)
    return library


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with XLA in this process (once per process)."""
    compiler = _compiler()
    if compiler is None:
        log.info("no C++ compiler: the decode attention runs as XLA ops")
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build(compiler, cache_root() / "kernels")))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.PrimeDecodeAttention), platform="cpu")
    except (OSError, RuntimeError) as error:
        log.warning("the CPU decode-attention kernel did not build; XLA ops instead: %s", error)
        return False
    return True


def one_device() -> bool:
    """Whether the program being traced runs on one device: under a mesh (`parallel.under_mesh`, as
    the sampler and trainer trace), a mesh of one; without one, plain `jit` on one device's arrays.
    A custom call has no sharding rule, so on a larger mesh the XLA path (which GSPMD splits) runs."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def applies(q: jax.Array, k_blocks, prefix) -> bool:
    """Whether `decode_attention` can run this call: enabled, on CPU, one device (`one_device`),
    float32, shapes within the kernel's limits, and the kernel built."""
    kv_heads, head_size, block = k_blocks[0].shape[1:]
    rows_per_prefix = q.shape[0] // prefix[0].shape[0] if prefix is not None else 1
    arrays = (q, *k_blocks) + (tuple(prefix[:2]) if prefix is not None else ())
    return (enabled() and jax.default_backend() == "cpu" and one_device()
            and all(a.dtype == jnp.float32 for a in arrays)
            and head_size % 16 == 0 and head_size <= MAX_HEAD and block <= MAX_COLUMNS
            and (prefix is None or prefix[0].shape[3] <= MAX_COLUMNS)
            and rows_per_prefix * (q.shape[1] // kv_heads) <= MAX_QUERIES
            and available())


def decode_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, k_blocks, v_blocks, columns: jax.Array,
                     valid: jax.Array, num_columns, prefix=None) -> tuple[jax.Array, tuple, tuple]:
    """`qwen2.decode_attention` on the kernel: q `[B, K, G, H]` already scaled, k_new and v_new
    `[B, K, H]`, k_blocks `[B, K, H, C]` and v_blocks `[B, K, C, H]` (updated in place: aliased to
    the outputs), columns `[B]`, valid `[B, S]`, num_columns `[]`, prefix (keys `[P, K, H, C']`,
    values `[P, K, C', H]`, valid `[P, C']`) or None. Returns (attention `[B, K, G, H]` float32,
    key blocks, value blocks)."""
    kv_heads, head_size = q.shape[1], q.shape[3]
    if prefix is None:  # no prefix: empty arrays (P = 0)
        prefix = (jnp.zeros((0, kv_heads, head_size, 1), q.dtype), jnp.zeros((0, kv_heads, 1, head_size), q.dtype),
                  jnp.zeros((0, 1), bool))
    blocks = (*k_blocks, *v_blocks)
    operands = (q, k_new.astype(q.dtype), v_new.astype(q.dtype), columns.astype(jnp.int32), valid.astype(bool),
                jnp.asarray(num_columns, jnp.int32).reshape(1), prefix[0], prefix[1], prefix[2].astype(bool))
    outputs = [jax.ShapeDtypeStruct(q.shape, jnp.float32), *(jax.ShapeDtypeStruct(b.shape, b.dtype) for b in blocks)]
    # Block i among the operands is output 1 + i: written in place.
    aliases = {len(operands) + i: 1 + i for i in range(len(blocks))}
    attention, *new_blocks = jax.ffi.ffi_call(TARGET, outputs, input_output_aliases=aliases)(*operands, *blocks)
    return attention, tuple(new_blocks[:len(k_blocks)]), tuple(new_blocks[len(k_blocks):])
