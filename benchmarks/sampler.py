"""Sampler throughput: `prime_jax.sampling.Sampler` vs transformers' PyTorch `generate`, same weights.

    python benchmarks/sampler.py              # ~25 s on a quiet 2-core CPU
    python benchmarks/sampler.py --model=tiny # the CPU demo's model (configs/tiny.py)

Model: a random Qwen2 built with transformers (hidden 256, 4 layers, 4 query / 2 kv heads of 64,
MLP 1024, vocab 4096, untied; q/k/v biases randomised), saved with `save_pretrained` and loaded
with `prime_jax.models.from_pretrained`, float32 on both sides (`--dtype=bfloat16`: weights and
compute in bfloat16 on both sides; ours keeps softmax, sampling and log-probs in float32).
Work: 16 prompts (lengths 8-24) x 4 samples x 128 new tokens, temperature 1 (no top-k/top-p),
no stop token, so both run all 128 steps for all 64 rows (8,192 new tokens).
HF: `generate(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=4)` on
the left-padded batch; ours: one `Sampler`, compiled by a warm-up call on the same shapes.

Each side is timed in wall seconds and in process CPU seconds (user + system of all threads),
the latter being less sensitive to other jobs on a shared box. Order: ours, HF, ours (best of the
two ours). The same run measures the machine's memory bandwidth (numpy copy, jax reduction) and
matmul rate, and reports decode tokens/s against the memory-bandwidth roofline
`rows x bandwidth / (param bytes + KV-cache bytes read per step)` and the compute roofline.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from prime_jax.models import from_pretrained  # noqa: E402
from prime_jax.sampling import Sampler  # noqa: E402

from forward import cpu_model  # noqa: E402  (benchmarks/, the script's folder, is on sys.path)


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def memory_bandwidth(num_bytes: int = 256 * 2**20, reps: int = 5) -> dict[str, float]:
    """Best-of-`reps` GB/s: numpy copy (read + write counted) and a jax sum (read only)."""
    a = np.ones(num_bytes // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)  # first touch of b's pages is slow on this VM; not timed
    copy = min(timed(lambda: np.copyto(b, a))[1] for _ in range(reps))
    x = jnp.asarray(a)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    read = min(timed(lambda: total(x).block_until_ready())[1] for _ in range(reps))
    return {"copy_gbs": 2 * num_bytes / copy / 1e9, "read_gbs": num_bytes / read / 1e9}


def matmul_gflops(n: int = 2048, reps: int = 3) -> float:
    x = jnp.ones((n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(x, x).block_until_ready()
    best = min(timed(lambda: dot(x, x).block_until_ready())[1] for _ in range(reps))
    return 2 * n**3 / best / 1e9


def build_model(path: Path, args):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=args.tied)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.02)
    hf.save_pretrained(path)
    return hf


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--mlp", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=0, help="query heads (default hidden / 64)")
    parser.add_argument("--kv-heads", type=int, default=0, help="kv heads (default hidden / 128, at least 1)")
    parser.add_argument("--tied", action="store_true", help="tie the LM head to the embedding")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and compute on both sides")
    parser.add_argument("--model", choices=("default", "tiny"), default="default",
                        help="tiny: the shapes of configs/tiny.py's model (the CPU demo's policy) and its "
                             "tokenizer's vocabulary; overrides --hidden/--layers/--mlp/--vocab/--heads")
    args = parser.parse_args()
    if args.model == "tiny":
        from configs.tiny import get_config
        from prime_jax.data.tiny_tokenizer import tiny_vocab

        m = get_config().model
        args.hidden, args.layers, args.mlp = m.hidden_size, m.num_layers, m.intermediate_size
        args.heads, args.kv_heads, args.tied = m.num_heads, m.num_kv_heads, m.tie_word_embeddings
        args.vocab = len(tiny_vocab())
    args.heads = args.heads or args.hidden // 64
    args.kv_heads = args.kv_heads or max(1, args.hidden // 128)

    import torch
    import transformers

    load_start = os.getloadavg()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, args.vocab, size=int(rng.integers(8, 25))).tolist() for _ in range(args.prompts)]
    rows, new = args.prompts * args.n, args.new_tokens

    with tempfile.TemporaryDirectory() as tmp:
        hf = build_model(Path(tmp), args)
        model = from_pretrained(tmp, dtype=args.dtype, param_dtype=args.dtype)
    if args.dtype == "bfloat16":
        hf = hf.to(torch.bfloat16)
    config = model.config
    num_params = config.num_params()

    # ---- ours: compile with a warm-up call on the same shapes, then time two calls around HF's
    sampler = Sampler()
    kwargs = dict(max_new_tokens=new, n=args.n, temperature=1.0)
    _, first_wall, _ = timed(lambda: sampler.generate(model, prompts, key=jax.random.key(0), **kwargs))
    ours = []
    out, wall, cpu = timed(lambda: sampler.generate(model, prompts, key=jax.random.key(1), **kwargs))
    ours.append((wall, cpu))
    assert out.lengths.sum() == rows * new and sampler.last_stats["decode_steps"] == new

    # ---- transformers: left-padded batch, n samples per prompt via num_return_sequences
    width = max(len(p) for p in prompts)
    ids = torch.zeros((args.prompts, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    hf_kwargs = dict(attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                     num_return_sequences=args.n, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=4, **hf_kwargs)  # warm-up
        hf_out, hf_wall, hf_cpu = timed(lambda: hf.generate(ids, max_new_tokens=new, **hf_kwargs))
    assert tuple(hf_out.shape) == (rows, width + new)

    out, wall, cpu = timed(lambda: sampler.generate(model, prompts, key=jax.random.key(2), **kwargs))
    ours.append((wall, cpu))
    our_wall, our_cpu = min(w for w, _ in ours), min(c for _, c in ours)

    # ---- the machine, in the same run
    bandwidth = memory_bandwidth()
    gflops = matmul_gflops()
    load_end = os.getloadavg()

    tokens = rows * new
    width = 2 if args.dtype == "bfloat16" else 4
    param_bytes = num_params * width
    slots = sampler.last_stats["prompt_len_bucket"] + new
    kv_bytes = 2 * config.num_hidden_layers * rows * slots * config.num_key_value_heads * config.head_size * width
    bw = max(bandwidth["copy_gbs"], bandwidth["read_gbs"]) * 1e9
    roofline_mem = rows * bw / (param_bytes + kv_bytes)
    embed = config.vocab_size * config.hidden_size
    flops_per_token = 2 * (num_params - embed) + 4 * config.num_hidden_layers * config.num_attention_heads * config.head_size * slots
    roofline_compute = gflops * 1e9 / flops_per_token

    print(f"machine: {cpu_model()}, nproc {os.cpu_count()}, jax {jax.__version__} ({jax.default_backend()}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print(f"load average at start {load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f}, "
          f"at end {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f} (1/5/15 min)")
    print(f"model: hidden {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads}/"
          f"{config.num_key_value_heads} heads of {config.head_size}, MLP {config.intermediate_size}, vocab "
          f"{config.vocab_size}, {num_params / 1e6:.2f} M params ({param_bytes / 2**20:.1f} MiB {args.dtype})")
    print(f"work: {args.prompts} prompts x {args.n} samples x {new} new tokens = {tokens} tokens; "
          f"KV cache {rows} rows x {slots} slots = {kv_bytes / 2**20:.1f} MiB")
    print(f"ours: first call (compile + run) {first_wall:.1f} s; timed calls wall "
          f"{', '.join(f'{w:.2f}' for w, _ in ours)} s, CPU {', '.join(f'{c:.2f}' for _, c in ours)} s; "
          f"{sampler.num_compilations} programs")
    print(f"ours: {tokens / our_wall:,.0f} tokens/s wall ({our_wall / new * 1e3:.1f} ms/step), "
          f"{tokens / our_cpu:,.0f} tokens per CPU-second")
    print(f"HF:   {tokens / hf_wall:,.0f} tokens/s wall ({hf_wall / new * 1e3:.1f} ms/step, {hf_wall:.1f} s), "
          f"{tokens / hf_cpu:,.0f} tokens per CPU-second ({hf_cpu:.1f} CPU s)")
    print(f"RATIO ours / HF: {hf_wall / our_wall:.1f}x wall, {hf_cpu / our_cpu:.1f}x CPU time")
    print(f"memory bandwidth: copy {bandwidth['copy_gbs']:.1f} GB/s (read+write), read {bandwidth['read_gbs']:.1f} GB/s; "
          f"matmul 2048^3 f32 {gflops:.1f} GFLOP/s")
    print(f"bandwidth roofline: {roofline_mem:,.0f} tokens/s ({(param_bytes + kv_bytes) / 2**20:.1f} MiB read per "
          f"step at {bw / 1e9:.1f} GB/s); ours reaches {tokens / our_wall / roofline_mem:.1%}")
    print(f"compute roofline (matmul rate, {flops_per_token / 1e6:.1f} MFLOP/token): {roofline_compute:,.0f} "
          f"tokens/s; ours reaches {tokens / our_wall / roofline_compute:.1%}")


if __name__ == "__main__":
    main()
