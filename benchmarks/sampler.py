"""Sampler throughput: `prime_jax.sampling.Sampler` vs transformers' PyTorch `generate`, same weights.

    python benchmarks/sampler.py              # ~25 s on a quiet 2-core CPU
    python benchmarks/sampler.py --model=tiny # the CPU demo's model (configs/tiny.py)
    python benchmarks/sampler.py --workload=rl  # long-tailed lengths: static batch vs decode slots vs HF
    python benchmarks/sampler.py --model=smollm2-135m-instruct
        # a real model (an HF folder, a .gguf file or a packaged name): the RL workload on GSM8K chat prompts

`--workload=rl` (see `rl_workload`): 64 prompts x 4 samples, max_new_tokens=512, the same random
model with a set of stop tokens (`--stop-tokens`, default 40 of the 4,096 ids, so about 1% per step)
that makes response lengths long-tailed (geometric, capped at 512). One run times transformers
`generate` on the same batch, ours with one slot per row (static) and ours with `--slots` decode
slots, and prints the length distribution, tokens/s ratios and the slot utilisation.

With a real model (`--model=PATH-or-name`, see `real_workload`), both sides run its own weights
(ours from `from_pretrained`, transformers from the same HF folder: for a GGUF or the packaged
name, the converted one), on the first `--prompts` GSM8K problems in the model's chat template with
the paper's instruction, stopping at the tokenizer's end-of-response ids; transformers runs in a
child process (`--hf-child`, a fresh interpreter without jax), so neither side slows the other.

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


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def hf_generate(hf, prompts, n, **generate_kwargs):
    """transformers `generate` on the left-padded batch, `n` samples per prompt at temperature 1:
    (output ids `[B, width + new]`, width)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          num_return_sequences=n, pad_token_id=0, **generate_kwargs)
    return out, width


def hf_child(job_path: str, result_path: str):
    """`--hf-child JOB RESULT`: transformers `generate` timed in a fresh interpreter that never imports
    jax (the parent's XLA thread pools and allocations do not slow it, nor it ours). JOB (JSON):
    folder, dtype, threads, prompts (token ids), n, new_tokens, stop_ids. RESULT (JSON): lengths
    (up to and including the first stop id), wall/cpu seconds of the timed call, prefill seconds
    (one new token), steps, torch/transformers versions and the load average around the run."""
    import json

    import torch
    import transformers

    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    load_start = os.getloadavg()
    hf = transformers.AutoModelForCausalLM.from_pretrained(job["folder"], dtype=getattr(torch, job["dtype"])).eval()
    prompts, n, stop_ids = job["prompts"], job["n"], job["stop_ids"]
    hf_generate(hf, prompts[:2], n, max_new_tokens=2, eos_token_id=stop_ids)  # warm-up
    (ids, width), wall, cpu = timed(lambda: hf_generate(hf, prompts, n, max_new_tokens=job["new_tokens"],
                                                         eos_token_id=stop_ids))
    prefill = timed(lambda: hf_generate(hf, prompts, n, max_new_tokens=1, eos_token_id=stop_ids))[1]
    tokens = ids[:, width:].numpy()
    is_stop = np.isin(tokens, stop_ids)
    lengths = np.where(is_stop.any(axis=1), is_stop.argmax(axis=1) + 1, tokens.shape[1])
    Path(result_path).write_text(json.dumps(dict(
        lengths=lengths.tolist(), wall=wall, cpu=cpu, prefill=prefill, steps=int(tokens.shape[1]) - 1,
        threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers.__version__,
        jax_imported="jax" in sys.modules, load_start=load_start, load_end=os.getloadavg())))


if __name__ == "__main__" and sys.argv[1:2] == ["--hf-child"]:
    import numpy as np

    hf_child(*sys.argv[2:4])
    sys.exit(0)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from prime_jax.models import from_pretrained  # noqa: E402
from prime_jax.sampling import Sampler  # noqa: E402

from forward import cpu_model  # noqa: E402  (benchmarks/, the script's folder, is on sys.path)


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


def real_model(args):
    """(ours, the HF folder transformers loads, GSM8K chat prompts, end-of-response ids) of `--model`."""
    from prime_jax.data import instruction_suffix, load_benchmark
    from prime_jax.models.packaged import resolve_model_folder
    from prime_jax.models.tokenizer import encode_chat, eos_token_ids, load_tokenizer

    folder = str(resolve_model_folder(args.model) or args.model)  # a GGUF: the converted HF folder
    model = from_pretrained(folder, dtype=args.dtype, param_dtype=args.dtype)
    tokenizer = load_tokenizer(folder)
    problems, _ = load_benchmark("gsm8k", task_suffix=instruction_suffix("step_by_step"))
    prompts = [encode_chat(tokenizer, p.messages) for p in problems[:args.prompts]]
    return model, folder, prompts, eos_token_ids(tokenizer)


def hf_in_child(folder, prompts, n: int, new_tokens: int, stop_ids, dtype: str = "float32", threads: int = 2) -> dict:
    """`hf_child`'s result for this job, run as `python benchmarks/sampler.py --hf-child` in a fresh
    interpreter (this process waits; nothing else of ours runs meanwhile)."""
    import json
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps(dict(folder=str(folder), dtype=dtype, threads=threads, prompts=prompts, n=n,
                                       new_tokens=new_tokens, stop_ids=list(stop_ids))))
        proc = subprocess.run([sys.executable, __file__, "--hf-child", str(job), str(result)], capture_output=True, check=False,
                              text=True)
        if proc.returncode != 0:
            raise SystemExit(f"transformers child process failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        return json.loads(result.read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=0, help="default 16 (rl workload: 64)")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128; rl workload 512; a real model 256")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--mlp", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=0, help="query heads (default hidden / 64)")
    parser.add_argument("--kv-heads", type=int, default=0, help="kv heads (default hidden / 128, at least 1)")
    parser.add_argument("--tied", action="store_true", help="tie the LM head to the embedding")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and compute on both sides")
    parser.add_argument("--model", default="default",
                        help="default: the random Qwen2 above; tiny: the shapes of configs/tiny.py's model (the CPU "
                             "demo's policy) and its tokenizer's vocabulary. Else a real model: an HF folder, a .gguf "
                             "file or a packaged name (smollm2-135m-instruct), run on the RL workload of GSM8K chat "
                             "prompts (`real_workload`; --prompts/--n/--new-tokens/--slots/--no-hf apply)")
    parser.add_argument("--workload", choices=("default", "rl"), default="default",
                        help="rl: 64 prompts x 4 samples x 512 new tokens (unless --prompts/--new-tokens say "
                             "otherwise) with long-tailed lengths, static vs decode slots vs transformers")
    parser.add_argument("--slots", default=None,
                        help="decode slots of the rl workload (comma list: each timed; default 64) or of a real "
                             "model's (default 16; 0: the static batch only)")
    parser.add_argument("--no-hf", action="store_true", help="rl workload or a real model: skip transformers")
    parser.add_argument("--hf-threads", type=int, default=0,
                        help="a real model: torch threads of the transformers child process (default: usable cores)")
    parser.add_argument("--stop-tokens", type=int, default=40, help="stop token ids of the rl workload")
    parser.add_argument("--refill", choices=("loop", "chunks", "both"), default="loop",
                        help="rl workload: how slots are refilled (both: time the two side by side)")
    parser.add_argument("--stop-after", type=int, default=43,
                        help="rl workload: also stream with each slot setting and stop once this many groups are "
                             "back, as the trainer does with decode slots (43 = 64 / rollout.oversample 1.5); 0: off")
    args = parser.parse_args()
    if args.model not in ("default", "tiny"):
        args.prompts = args.prompts or 16
        return real_workload(args)
    rl = args.workload == "rl"
    args.prompts, args.new_tokens = args.prompts or (64 if rl else 16), args.new_tokens or (512 if rl else 128)
    args.slots = args.slots or "64"
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
    if args.workload == "rl":
        return rl_workload(args, model, hf, prompts)

    # ---- ours: compile with a warm-up call on the same shapes, then time two calls around HF's
    sampler = Sampler()
    kwargs = dict(max_new_tokens=new, n=args.n, temperature=1.0)
    _, first_wall, _ = timed(lambda: sampler.generate(model, prompts, key=jax.random.key(0), **kwargs))
    ours = []
    out, wall, cpu = timed(lambda: sampler.generate(model, prompts, key=jax.random.key(1), **kwargs))
    ours.append((wall, cpu))
    assert out.lengths.sum() == rows * new and sampler.last_stats["decode_steps"] == new - 1

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


def length_summary(lengths) -> str:
    lengths = np.asarray(lengths)
    return (f"mean {lengths.mean():.0f}, p50 {np.percentile(lengths, 50):.0f}, p90 {np.percentile(lengths, 90):.0f}, "
            f"max {lengths.max()} ({(lengths >= lengths.max()).sum()} rows at the max)")


def rl_workload(args, model, hf, prompts):
    """Long-tailed lengths: ours static, ours with decode slots, transformers, all in one run.

    Both of ours run with the same key, so they sample the same tokens (a row's tokens do not
    depend on its slot; log-probs agree to float rounding): the ratio is a pure time ratio. HF samples its own tokens from the same
    distribution; its tokens/s counts its own response lengths (up to and including the stop).
    Order: compile both (warm-up calls, other key), then ours x2, HF, ours x2 (best of two each).
    """
    import torch
    import transformers

    load_start = os.getloadavg()
    new, rows = args.new_tokens, args.prompts * args.n
    stop_ids = list(range(args.vocab - args.stop_tokens, args.vocab))  # the last ids: never a prompt's pad
    kwargs = dict(max_new_tokens=new, n=args.n, temperature=1.0, stop_token_ids=stop_ids)
    samplers = {"static": Sampler()}
    refills = ("loop", "chunks") if args.refill == "both" else (args.refill,)
    for slots in (int(k) for k in str(args.slots).split(",")):
        for refill in refills:
            samplers[f"{slots} slots/{refill}"] = Sampler(decode_slots=slots, refill=refill)
    first = {name: timed(lambda: s.generate(model, prompts, key=jax.random.key(0), **kwargs))[1]
             for name, s in samplers.items()}
    times: dict[str, list] = {name: [] for name in samplers}
    results, stats = {}, {}

    def run_ours():
        for name, sampler in samplers.items():
            out, wall, cpu = timed(lambda: sampler.generate(model, prompts, key=jax.random.key(1), **kwargs))
            times[name].append((wall, cpu))
            results[name], stats[name] = out, dict(sampler.last_stats)

    run_ours()
    if not args.no_hf:
        hf_out, hf_wall, hf_cpu = timed(lambda: hf_generate(hf, prompts, args.n, max_new_tokens=new,
                                                            eos_token_id=stop_ids))
    run_ours()
    load_end = os.getloadavg()

    reference = results["static"]
    for name, out in results.items():  # the determinism claim, checked on the benchmark's own output
        # (log-probs to rounding: XLA:CPU's matmuls may round differently for another number of rows)
        assert np.array_equal(out.tokens, reference.tokens), name
        assert np.abs(out.logprobs - reference.logprobs).max() <= 1e-5, name
    tokens = int(reference.lengths.sum())
    best = {name: (min(w for w, _ in t), min(c for _, c in t)) for name, t in times.items()}

    print(f"machine: {cpu_model()}, nproc {os.cpu_count()}, jax {jax.__version__} ({jax.default_backend()}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print(f"load average at start {load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f}, "
          f"at end {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f} (1/5/15 min)")
    config = model.config
    print(f"model: hidden {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads}/"
          f"{config.num_key_value_heads} heads, MLP {config.intermediate_size}, vocab {config.vocab_size}, "
          f"{config.num_params() / 1e6:.2f} M params, {args.dtype}; {len(stop_ids)} stop ids")
    print(f"work: {args.prompts} prompts x {args.n} samples = {rows} rows, max_new_tokens {new}")
    print(f"lengths, ours: {length_summary(reference.lengths)}; {tokens} tokens")
    decoded = tokens - len(reference.lengths)  # the first tokens come from prefill
    for name in samplers:
        wall, cpu = best[name]
        st = stats[name]
        # steps beyond decoded / K: the tail, when the queue is empty and slots fall idle
        ideal = -(-decoded // st["decode_slots"])
        print(f"ours {name:16s}: {tokens / wall:8,.0f} tokens/s wall ({wall:.2f} s; calls "
              f"{', '.join(f'{w:.2f}' for w, _ in times[name])} s), {tokens / cpu:8,.0f} per CPU-s; "
              f"{st['decode_slots']} slots, {st['decode_steps']} steps ({ideal} if every slot were always busy), "
              f"{st['decode_calls']} calls, utilisation {st['slot_utilisation']:.2f}; first call {first[name]:.1f} s")
    static_wall, static_cpu = best["static"]
    for name in samplers:
        if name != "static":
            wall, cpu = best[name]
            print(f"RATIO {name} / static: {static_wall / wall:.2f}x wall, {static_cpu / cpu:.2f}x CPU")
    if not args.no_hf:
        print_hf_comparison(hf_out, hf_wall, hf_cpu, stop_ids, tokens, best)
    if args.stop_after:
        for name, sampler in samplers.items():
            if name != "static":
                print_streamed_until(sampler, name, model, prompts, kwargs, args.n, args.stop_after, reference)


def real_workload(args):
    """The RL workload on a real checkpoint: GSM8K questions in the model's chat template, n samples.

    `--prompts` (16) GSM8K test questions with the paper's instruction (`data.instruction=
    step_by_step`), rendered with the checkpoint's own chat template; `--n` (4) samples each at
    temperature 1 with no top-k/top-p, stopping at the tokenizer's end-of-response ids, at most
    `--new-tokens` (256). In one run: ours with one slot per row (static) and with `--slots` decode
    slots (16), same key, so the script asserts identical tokens; then transformers `generate` on the
    left-padded batch, credited with its own lengths, in a child process (`hf_in_child`: a fresh
    interpreter that never imports jax, `--hf-threads` torch threads, default one per usable core;
    in the same process it ran ~1.5x slower after ours). Each side is timed once warm
    (ours compiled ahead with `Sampler.compile`, HF after a 2-token warm-up), and once with one new
    token (its prefill), so a decode step's time is (whole call - prefill) / steps. The step is
    compared with its matmul FLOPs at the 2048^3 float32 matmul rate measured in the same run.
    Lines are printed as each part is measured, so a run cut short still reports what it timed.
    """
    from importlib.metadata import version

    load_start = os.getloadavg()
    threads = args.hf_threads or len(os.sched_getaffinity(0))
    new, n = args.new_tokens or 256, args.n
    model, folder, prompts, stop_ids = real_model(args)
    config, rows = model.config, len(prompts) * n
    print(f"machine: {cpu_model()}, nproc {os.cpu_count()}, jax {jax.__version__} ({jax.default_backend()}), "
          f"torch {version('torch')} ({threads} threads, in a child process), transformers {version('transformers')}")
    print(f"load average at start {load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f} (1/5/15 min)")
    d, head = config.hidden_size, config.num_attention_heads * config.head_size
    print(f"model: {args.model}: {config.model_type}, hidden {d}, {config.num_hidden_layers} layers, "
          f"{config.num_attention_heads}/{config.num_key_value_heads} heads of {config.head_size}, MLP "
          f"{config.intermediate_size}, vocab {config.vocab_size}{' (tied)' if config.tie_word_embeddings else ''}, "
          f"{config.num_params() / 1e6:.1f} M params, {args.dtype}")
    gflops = matmul_gflops()
    print(f"matmul 2048^3 float32: {gflops:.1f} GFLOP/s", flush=True)

    kwargs = dict(max_new_tokens=new, n=n, temperature=1.0, stop_token_ids=stop_ids)
    one_token = dict(kwargs, max_new_tokens=1)  # prefill (and its one sampled token)
    slots = int(str(16 if args.slots is None else args.slots).split(",")[0])
    samplers = {"static": Sampler(), **({f"{slots} slots": Sampler(decode_slots=slots)} if slots > 0 else {})}
    key, width = jax.random.key(1), max(map(len, prompts))
    compile_s = {name: timed(lambda: s.compile(model, num_prompts=len(prompts), prompt_len=width, key=key, **kwargs))[1]
                 for name, s in samplers.items()}
    samplers["static"].compile(model, num_prompts=len(prompts), prompt_len=width, key=key, **one_token)
    prefill_s = timed(lambda: samplers["static"].generate(model, prompts, key=key, **one_token))[1]
    print(f"work: {len(prompts)} GSM8K prompts ({min(map(len, prompts))}-{width} tokens, bucket "
          f"{samplers['static'].last_stats['prompt_len_bucket']}) x {n} samples, temperature 1, stop ids {stop_ids}, "
          f"<= {new} new tokens; ours: prefill {prefill_s:.1f} s, compile "
          f"{', '.join(f'{k} {v:.0f} s' for k, v in compile_s.items())}", flush=True)

    def step_bound_ms(lengths):
        """Matmul FLOPs of one decode step of all rows (at the run's mean cache length) at the measured rate."""
        matmul_params = config.num_params() - (0 if config.tie_word_embeddings else config.vocab_size * d)
        mean_columns = np.mean([len(p) for p in prompts]) + np.mean(lengths) / 2
        flops = rows * (2 * matmul_params + 4 * config.num_hidden_layers * head * mean_columns)
        return flops / (gflops * 1e9) * 1e3, flops

    results, times = {}, {}
    for name, sampler in samplers.items():
        results[name], *times[name] = timed(lambda: sampler.generate(model, prompts, key=key, **kwargs))
        st, out, (wall, cpu) = sampler.last_stats, results[name], times[name]
        tokens = int(out.lengths.sum())
        if name == "static":
            bound_ms, flops = step_bound_ms(out.lengths)
            print(f"lengths, ours: {length_summary(out.lengths)}; {tokens} tokens")
            print(f"a decode step of {rows} rows: {flops / 1e9:.1f} GFLOP of matmuls = {bound_ms:.0f} ms at the "
                  "matmul rate")
        # a step of K slots does K / rows of the all-rows step's matmul work
        step_ms = (wall - prefill_s) / max(1, st["decode_steps"]) * 1e3
        slot_bound = bound_ms * st["decode_slots"] / rows
        print(f"ours {name:9s}: {tokens / wall:6.1f} tokens/s ({wall:.1f} s, {cpu:.1f} CPU s; {st['decode_steps']} "
              f"steps of {st['decode_slots']} slots, {step_ms:.0f} ms/step = {slot_bound / step_ms:.0%} of the matmul "
              f"rate bound ({slot_bound:.0f} ms); utilisation {st['slot_utilisation']:.2f})", flush=True)
    reference = results["static"]
    for name, out in results.items():  # static and slots: the same tokens, log-probs to rounding
        assert np.array_equal(out.tokens, reference.tokens) and np.array_equal(out.lengths, reference.lengths), name
        assert np.abs(out.logprobs - reference.logprobs).max() <= 1e-4, name
    if len(results) > 1:
        print("static and slot tokens identical: yes", flush=True)
    tokens = int(reference.lengths.sum())
    if args.no_hf:
        return
    hf = hf_in_child(folder, prompts, n, new, stop_ids, args.dtype, threads=threads)
    hf_lengths = np.asarray(hf["lengths"])
    hf_rate = hf_lengths.sum() / hf["wall"]
    hf_step_ms = (hf["wall"] - hf["prefill"]) / max(1, hf["steps"]) * 1e3
    print(f"lengths, HF:   {length_summary(hf_lengths)}; {int(hf_lengths.sum())} tokens")
    print(f"HF generate   : {hf_rate:6.1f} tokens/s ({hf['wall']:.1f} s, {hf['cpu']:.1f} CPU s; prefill "
          f"{hf['prefill']:.1f} s, {hf['steps']} steps, {hf_step_ms:.0f} ms/step = {bound_ms / hf_step_ms:.0%} of the "
          f"matmul rate bound); in a child process (fresh interpreter, jax not imported: "
          f"{not hf['jax_imported']}), {hf['threads']} torch threads, load average "
          f"{hf['load_start'][0]:.1f} -> {hf['load_end'][0]:.1f}")
    for name, (wall, _) in times.items():
        print(f"RATIO ours {name} / HF: {tokens / wall / hf_rate:.2f}x tokens/s")
    load_end = os.getloadavg()
    print(f"load average at end {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f} (1/5/15 min)")


def print_streamed_until(sampler, name, model, prompts, kwargs, n, stop_after, reference):
    """The trainer's streamed path: `stream()` until `stop_after` groups are back, the rest cut.
    Its tokens are the full run's (same key), so the kept rows' lengths show the bias of keeping
    the first-finished groups, against all rows and against the groups that started first."""
    parts, start, cpu_start = [], time.perf_counter(), time.process_time()
    for part in sampler.stream(model, prompts, key=jax.random.key(1), **kwargs):
        parts.append(part)
        if sum(p.num_prompts for p in parts) >= stop_after:
            break
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    st = sampler.last_stats
    kept = np.concatenate([p.prompt_index for p in parts])
    lengths = np.concatenate([p.lengths for p in parts])
    all_groups = reference.lengths.reshape(-1, n)
    first_started = all_groups[: len(kept) // n]  # the same number of groups, taken in queue order
    wasted = 1 - (lengths.sum() - len(lengths)) / max(1, st["decoded_tokens"])
    print(f"ours {name:16s} streamed until {len(kept) // n} of {len(prompts)} groups: utilisation "
          f"{st['slot_utilisation']:.2f} over {st['decode_steps']} steps, {lengths.sum() / wall:,.0f} kept tokens/s "
          f"wall ({wall:.2f} s), {lengths.sum() / cpu:,.0f} per CPU-s; decoded tokens of cut rows {wasted:.0%}; "
          f"kept rows' lengths mean {lengths.mean():.0f} / p90 {np.percentile(lengths, 90):.0f} / max {lengths.max()} "
          f"vs all rows {reference.lengths.mean():.0f} / {np.percentile(reference.lengths, 90):.0f} / "
          f"{reference.lengths.max()} vs the first {len(kept) // n} groups in queue order "
          f"{first_started.mean():.0f} / {np.percentile(first_started, 90):.0f} / {first_started.max()}")


def print_hf_comparison(hf_out, hf_wall, hf_cpu, stop_ids, tokens, best):
    """HF's lengths (up to and including its first stop token) and tokens/s, and ours / HF."""
    ids, width = hf_out
    hf_tokens = ids[:, width:].numpy()
    is_stop = np.isin(hf_tokens, stop_ids)
    hf_lengths = np.where(is_stop.any(axis=1), is_stop.argmax(axis=1) + 1, hf_tokens.shape[1])
    hf_rate, hf_cpu_rate = hf_lengths.sum() / hf_wall, hf_lengths.sum() / hf_cpu
    print(f"lengths, HF:   {length_summary(hf_lengths)}; {int(hf_lengths.sum())} tokens, {hf_tokens.shape[1]} steps")
    print(f"HF: {hf_rate:8,.0f} tokens/s wall ({hf_wall:.1f} s), {hf_cpu_rate:8,.0f} per CPU-s")
    for name, (wall, cpu) in best.items():
        print(f"RATIO {name} / HF: {tokens / wall / hf_rate:.2f}x wall, {tokens / cpu / hf_cpu_rate:.2f}x CPU")


if __name__ == "__main__":
    main()
