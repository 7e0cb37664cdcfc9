"""Throughput and model-FLOPs utilisation (MFU) of `policy_step` against this machine's matmul rate.

    python benchmarks/train_step.py                # tiny-but-not-trivial Qwen2 on whatever jax sees
    python benchmarks/train_step.py --hidden 512 --layers 8 --dtype bfloat16
    python benchmarks/train_step.py --model=smollm2-135m-instruct   # a real model's shape (folder, .gguf or name)
    python benchmarks/train_step.py --model=smollm2-135m-instruct --batch=4 --prompt-len=128 --response-len=128 --steps=3

Model FLOPs per step (PaLM convention, what the model needs, not what XLA executes: remat and
the chunked log-prob recomputation are not counted):
    3 * [ 2 * body_params * B*S  +  2 * D*V * B*R  +  4 * L * N*H * S * B*S ]
          layer matmuls, all tokens   LM head, response    attention QK^T and AV (full S x S)
(forward + backward = 3 forwards; S = P + R; the LM head only runs on response positions.)
Peak = a large `jnp.dot` in the compute dtype, timed in the same run on the same device,
alternating with the train steps so both see the same load. MFU is reported best-vs-best and
median-vs-median in wall time, and (for CPU hosts shared with other work) in CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `python benchmarks/train_step.py`

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from prime_jax.models import Qwen2Config, Qwen2ForCausalLM, load_config  # noqa: E402
from prime_jax.parallel import make_mesh  # noqa: E402
from prime_jax.train import PrimeBatch, create_train_state, make_train_steps, policy_optimizer  # noqa: E402


def clock(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one blocking call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def model_flops(c: Qwen2Config, batch: int, prompt_len: int, response_len: int) -> float:
    d, h = c.hidden_size, c.head_size
    q, kv = c.num_attention_heads * h, c.num_key_value_heads * h
    body = c.num_hidden_layers * (d * q + 2 * d * kv + q * d + 3 * d * c.intermediate_size)
    seq = prompt_len + response_len
    tokens = batch * seq
    forward = 2 * body * tokens + 2 * d * c.vocab_size * batch * response_len
    forward += 4 * c.num_hidden_layers * q * seq * tokens
    return 3 * forward


def make_batch(c: Qwen2Config, batch: int, prompt_len: int, response_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        "prompt_ids": rng.integers(0, c.vocab_size, (batch, prompt_len)).astype(np.int32),
        "prompt_mask": np.ones((batch, prompt_len), np.int32),
        "response_ids": rng.integers(0, c.vocab_size, (batch, response_len)).astype(np.int32),
        "response_mask": np.ones((batch, response_len), np.int32),
        "old_logprobs": np.full((batch, response_len), -np.log(c.vocab_size), np.float32),
        "advantages": rng.standard_normal((batch, response_len)).astype(np.float32),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="take the architecture (shapes, tied head, biases) of this model: an "
                   "HF folder, a .gguf file or a packaged name such as smollm2-135m-instruct; overrides --hidden, "
                   "--intermediate, --layers, --heads, --kv-heads and --vocab (weights: random init, as they do not "
                   "change the timing)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8, help="responses per mini-batch (B): a multiple of --n x "
                   "--micro-batches")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=192)
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--dtype", default=None, help="compute dtype (default: float32 on CPU, else bfloat16)")
    p.add_argument("--remat", default="none")
    p.add_argument("--fused-mlp", type=int, default=1, help="gate and up as one product (model.fused_mlp): 1 or 0")
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--matmul-size", type=int, default=2048)
    args = p.parse_args()
    if args.batch % (args.n * args.micro_batches):
        p.error(f"--batch {args.batch} must be a multiple of --n {args.n} x --micro-batches {args.micro_batches} "
                "(each micro-batch holds whole prompt groups)")

    backend = jax.default_backend()
    dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    if args.model:
        config = load_config(args.model, dtype=dtype, param_dtype="float32", remat=args.remat,
                             fused_mlp=bool(args.fused_mlp))
    else:
        config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                             num_hidden_layers=args.layers, num_attention_heads=args.heads,
                             num_key_value_heads=args.kv_heads, dtype=dtype, param_dtype="float32", remat=args.remat,
                             fused_mlp=bool(args.fused_mlp))
    mesh = make_mesh(data=-1)
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
    optimizer = policy_optimizer()
    steps = make_train_steps(model, optimizer, None, mesh, n=args.n, micro_batches=args.micro_batches,
                             chunk_size=args.chunk_size)
    state = create_train_state(model, optimizer, mesh)
    batch = PrimeBatch(**jax.device_put(make_batch(config, args.batch, args.prompt_len, args.response_len),
                                        steps.batch_sharding))

    start = time.perf_counter()
    state, metrics = steps.policy(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start

    # Matmul and train step timed alternately, so both see the same load on a shared machine.
    size = args.matmul_size
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dtype))
    dot(a, b).block_until_ready()
    matmul_flops = 2 * size**3
    step_times, dot_times = [], []

    def one_step():
        nonlocal state, metrics
        state, metrics = steps.policy(state, batch)
        jax.block_until_ready((state, metrics))

    for _ in range(args.steps):
        dot_times.append(min((clock(lambda: dot(a, b).block_until_ready()) for _ in range(3)), key=lambda t: t[0]))
        step_times.append(clock(one_step))
    step_wall = np.array([t[0] for t in step_times])
    step_cpu = np.array([t[1] for t in step_times])
    dot_wall = np.array([t[0] for t in dot_times])
    dot_cpu = np.array([t[1] for t in dot_times])
    step_s, best_s = float(np.median(step_wall)), float(step_wall.min())
    peak = matmul_flops / dot_wall.min()
    flops = model_flops(config, args.batch, args.prompt_len, args.response_len)
    tokens = args.batch * (args.prompt_len + args.response_len)
    result = {
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()} ({backend})",
        "host": f"{platform.processor() or platform.machine()}, {jax.local_device_count()} local device(s)",
        "model": f"{args.model or 'random'} ({config.model_type}: {config.num_hidden_layers} layers, hidden "
                 f"{config.hidden_size}, {config.num_attention_heads}/{config.num_key_value_heads} heads, vocab "
                 f"{config.vocab_size}{', tied' if config.tie_word_embeddings else ''})",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "params": config.num_params(),
        "dtype": dtype,
        "remat": args.remat,
        "fused_mlp": bool(args.fused_mlp),
        "batch": f"B={args.batch} P={args.prompt_len} R={args.response_len} micro_batches={args.micro_batches}",
        "compile_s": round(compile_s, 2),
        "step_s_median": round(step_s, 4),
        "step_s_all": [round(float(t), 4) for t in step_wall],
        "tokens_per_s": round(tokens / step_s, 1),
        "response_tokens_per_s": round(args.batch * args.response_len / step_s, 1),
        "model_tflop_per_step": round(flops / 1e12, 4),
        "achieved_tflop_per_s": round(flops / step_s / 1e12, 4),
        "matmul_peak_tflop_per_s": round(peak / 1e12, 4),
        "mfu_best_step_vs_best_matmul": round(flops / best_s / peak, 3),
        "mfu_median_step_vs_median_matmul": round(flops / step_s / (matmul_flops / np.median(dot_wall)), 3),
        # CPU seconds spent (all threads): robust to other processes competing for the cores
        "mfu_cpu_time": round(float(np.median(flops / step_cpu) / np.median(matmul_flops / dot_cpu)), 3),
        "loss": float(metrics["loss"]),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
