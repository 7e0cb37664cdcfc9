"""Forward-pass throughput of a small Qwen2, next to this machine's measured matmul rate.

    python benchmarks/forward.py                   # defaults: the shape reported in README.md
    python benchmarks/forward.py --write-readme    # also rewrite `## Forward pass` in benchmarks/README.md

Model: Qwen2 with hidden 256, 4 layers, 4 query heads / 2 kv heads of size 64, MLP 1024, vocab
8192, untied head; batch 8 x 256 tokens (all real, no padding); float32; `model(ids, mask)` ->
`[B, T, V]` logits, jitted, timed warm (compile excluded).

FLOPs of one forward (multiply-add = 2), what XLA executes:
    2 * body_params * B*T          layer matmuls (q, k, v, o, gate, up, down)
  + 4 * L * N*H * T * B*T          attention QK^T and AV over the full T x T (the causal mask is
                                   applied to dense scores, so masked half is computed too)
  + 2 * D*V * B*T                  LM head
Reference: a square `jnp.dot` of the same dtype (default 2048), timed in the same run on the
same device, each call right after a forward call; the ratio is taken per (forward, matmul) pair.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `python benchmarks/forward.py`

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from prime_jax.models import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

README = Path(__file__).with_name("README.md")
SECTION = "## Forward pass"


def time_calls(fn, reps: int) -> list[float]:
    """Seconds per call for `reps` calls (fn must block until its result is ready)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def square_matmul(size: int, dtype):
    """A warm, blocking `size x size @ size x size` call and its FLOPs."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((size, size)), dtype)
    b = jnp.asarray(rng.standard_normal((size, size)), dtype)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dtype))
    dot(a, b).block_until_ready()
    return (lambda: dot(a, b).block_until_ready()), 2 * size**3


def forward_flops(c: Qwen2Config, batch: int, length: int) -> int:
    d, h = c.hidden_size, c.head_size
    q, kv = c.num_attention_heads * h, c.num_key_value_heads * h
    body = c.num_hidden_layers * (d * q + 2 * d * kv + q * d + 3 * d * c.intermediate_size)
    tokens = batch * length
    return 2 * body * tokens + 4 * c.num_hidden_layers * q * length * tokens + 2 * d * c.vocab_size * tokens


def random_model(config: Qwen2Config, seed: int = 0) -> Qwen2ForCausalLM:
    """Random weights from numpy (no per-op compiles of eager jax.random)."""
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    flat = {
        path: v.replace(jnp.asarray(0.02 * rng.standard_normal(v.shape), config.weight_dtype))
        for path, v in nnx.to_flat_state(state)
    }
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = jax.devices()[0]
    return {
        "cpu": cpu_model(),
        "nproc": usable,
        "device": f"{device.platform}: {device.device_kind} (x{jax.device_count()})",
        "jax": jax.__version__,
        "load": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def write_readme(text: str) -> None:
    """Replace (or append) only the `## Forward pass` section of benchmarks/README.md."""
    body = text.rstrip() + "\n"
    if not README.exists():
        README.write_text("# Benchmarks\n\n" + body)
        return
    current = README.read_text()
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(current):
        updated = pattern.sub(lambda _: body + "\n", current, count=1).rstrip() + "\n"
    else:
        updated = current.rstrip() + "\n\n" + body
    README.write_text(updated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--mlp", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()

    config = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, tie_word_embeddings=False,
        dtype=args.dtype, param_dtype="float32",
    )
    model = random_model(config)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.length)), jnp.int32)
    mask = jnp.ones((args.batch, args.length), jnp.int32)

    start = time.perf_counter()
    forward(state, ids, mask).block_until_ready()
    compile_s = time.perf_counter() - start
    forward(state, ids, mask).block_until_ready()  # warm
    matmul, matmul_flops = square_matmul(args.matmul_size, jnp.dtype(args.dtype))
    # Interleaved: each forward is timed next to a matmul, so a change in the machine's load hits
    # both sides of a pair and the per-pair ratio stays comparable.
    times, matmul_times = [], []
    for _ in range(args.reps):
        times += time_calls(lambda: forward(state, ids, mask).block_until_ready(), 1)
        matmul_times += time_calls(matmul, 1)

    flops = forward_flops(config, args.batch, args.length)
    tokens = args.batch * args.length
    best, median = min(times), statistics.median(times)
    peak_best, peak_median = matmul_flops / min(matmul_times), matmul_flops / statistics.median(matmul_times)
    pair_ratios = [(flops / t) / (matmul_flops / m) for t, m in zip(times, matmul_times)]
    info = machine()
    rows = [
        ("forward time, median / best", f"{median * 1e3:.1f} ms / {best * 1e3:.1f} ms"),
        ("tokens/s, median / best", f"{tokens / median:,.0f} / {tokens / best:,.0f}"),
        ("FLOPs per forward", f"{flops / 1e9:.2f} GFLOP"),
        ("achieved FLOP/s, median / best", f"{flops / median / 1e9:.1f} / {flops / best / 1e9:.1f} GFLOP/s"),
        (f"matmul {args.matmul_size}^3 {args.dtype}, median / best",
         f"{peak_median / 1e9:.1f} / {peak_best / 1e9:.1f} GFLOP/s"),
        ("ratio forward / matmul FLOP/s (median of pairs; min-max)",
         f"{statistics.median(pair_ratios):.2f}; {min(pair_ratios):.2f}-{max(pair_ratios):.2f}"),
        ("first call (trace + compile + run)", f"{compile_s:.1f} s"),
    ]
    shape = (
        f"Qwen2 hidden {args.hidden}, {args.layers} layers, {args.heads} query / {args.kv_heads} kv heads of "
        f"{config.head_size}, MLP {args.mlp}, vocab {args.vocab} (untied), {config.num_params() / 1e6:.1f} M params; "
        f"batch {args.batch} x {args.length} tokens; {args.dtype}; jitted, warm, {args.reps} timed calls "
        "interleaved with the matmul"
    )
    load = info["load"]
    machine_line = (
        f"{info['cpu']}, nproc {info['nproc']}, {info['device']}, jax {info['jax']}"
        + (f"; load average at the run {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)" if load else "")
    )
    print(shape)
    print(machine_line)
    for name, value in rows:
        print(f"{name:42s} {value}")

    if args.write_readme:
        table = "\n".join(f"| {name} | {value} |" for name, value in rows)
        write_readme(
            f"{SECTION}\n\n"
            "`python benchmarks/forward.py --write-readme` (this section is rewritten by it).\n\n"
            f"- Model and input: {shape}.\n"
            f"- Machine: {machine_line}.\n"
            "- FLOPs count dense attention over the full T x T (as executed), see the script's docstring.\n"
            "  The matmul reference is a square `jnp.dot` timed in the same run.\n\n"
            "| measure | value |\n| --- | --- |\n"
            f"{table}\n\n"
            "The box is a shared 2-core CPU, and other jobs were running during this measurement (see the "
            "load average above), so the absolute numbers move with its load. Each forward call is "
            "timed next to a matmul call, and the ratio is taken per pair, so it is the figure to "
            "compare between runs. It is still only as good as the load was steady within a pair. "
            "The softmax, RMSNorm and RoPE work adds time but no counted FLOPs.\n"
        )
        print(f"wrote {SECTION!r} in {README}")


if __name__ == "__main__":
    main()
