"""Greedy benchmark accuracy of a real model: `prime_jax.evaluate` vs transformers `generate`, same
prompts, same grader, timed side by side in one run.

    python benchmarks/evaluate_vs_transformers.py                          # SmolLM2-135M-Instruct, GSM8K, 100 problems
    python benchmarks/evaluate_vs_transformers.py --limit=8 --max-new-tokens=128   # a quick look

Ours: `prime_jax.evaluate.evaluate` with `configs/smollm2_135m.py` (the model's chat template around
the problem and the paper's instruction "Please reason step by step, and put your final answer
within \\boxed{}.", greedy, `--max-new-tokens`, `--batch` prompts per generate call), exactly what
`python -m prime_jax.evaluate --config=configs/smollm2_135m.py --checkpoint=MODEL --benchmarks=gsm8k
--limit=N` runs. transformers: the same weights (the HF folder the model resolves to: for a GGUF the
converted one), `generate(do_sample=False)` on the same prompt ids in the same chunks (left-padded,
stopping at the same end-of-response ids), graded by the same `eval_lib.evaluate_benchmark`.

Prints pass@1 of both, how many responses are token-for-token identical and where they first
differ (character offset), the time each side spent generating (ours includes its compilations; printed apart) and
in total with loading, and the load average. Both sides use float32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def transformers_generate_fn(hf, tokenizer, settings, stop_ids):
    """`generate(prompt_ids, chunk) -> Generation` for `evaluate_benchmark`, through transformers."""
    import numpy as np
    import torch

    from prime_jax.eval_lib import Generation, decode_responses

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]

    def generate(prompt_ids, chunk=0):
        width = max(map(len, prompt_ids))
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompt_ids])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=settings.max_new_tokens,
                              eos_token_id=list(stop_ids), pad_token_id=pad)
        tokens = out[:, width:].numpy()
        is_stop = np.isin(tokens, stop_ids)
        finished = is_stop.any(axis=1)
        lengths = np.where(finished, is_stop.argmax(axis=1) + 1, tokens.shape[1])
        texts = decode_responses(tokenizer, tokens, lengths, finished)
        return Generation(texts=texts, response_ids=[row[:n].tolist() for row, n in zip(tokens, lengths)],
                          finished=finished.tolist())

    return generate


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="HF folder, .gguf file or packaged name")
    p.add_argument("--benchmark", default="gsm8k")
    p.add_argument("--limit", type=int, default=100, help="the first N problems")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=64, help="prompts per generate call (both sides)")
    p.add_argument("--workdir", default="", help="where ours writes eval/ (default: a temporary folder)")
    args = p.parse_args()

    import jax
    import torch
    import transformers

    from configs.smollm2_135m import get_config
    from prime_jax import eval_lib
    from prime_jax.data import load_eval_sets
    from prime_jax.evaluate import evaluate
    from prime_jax.models import load_config
    from prime_jax.models.packaged import resolve_model_folder
    from prime_jax.models.tokenizer import eos_token_ids, load_tokenizer
    from prime_jax.parallel import make_mesh
    from prime_jax.rewards import RewardPool

    load_start = os.getloadavg()
    config = get_config()
    config.reward.workers = 1
    folder = resolve_model_folder(args.model) or Path(args.model)  # fetched / converted here, outside the timings
    shape = load_config(folder)

    # ---- ours, as the CLI runs it
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="eval_parity_"))
    wall, cpu = time.perf_counter(), time.process_time()
    scores = evaluate(config, workdir, checkpoint=args.model, benchmarks=args.benchmark, limit=args.limit,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch, mesh=make_mesh(data=1))
    ours_wall, ours_cpu = time.perf_counter() - wall, time.process_time() - cpu
    ours_metrics = scores["benchmarks"][args.benchmark]
    ours_records = [json.loads(line) for line in
                    (workdir / "eval" / f"{args.benchmark}.jsonl").read_text().splitlines()]

    # ---- transformers, same prompts in the same chunks, same grader
    wall, cpu = time.perf_counter(), time.process_time()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(folder)
    problems = load_eval_sets(config, [args.benchmark], args.limit)[0][args.benchmark]
    settings = eval_lib.settings_from_config(config, max_new_tokens=args.max_new_tokens, batch_size=args.batch)
    stops = eos_token_ids(tokenizer)
    with RewardPool(1, math_timeout=config.reward.timeout_s, code_timeout=config.reward.timeout_s) as pool:
        theirs = eval_lib.evaluate_benchmark(args.benchmark, problems, tokenizer=tokenizer, pool=pool,
                                             settings=settings,
                                             generate=transformers_generate_fn(hf, tokenizer, settings, stops))
    hf_wall, hf_cpu = time.perf_counter() - wall, time.process_time() - cpu
    load_end = os.getloadavg()

    # ---- side by side
    ours_by_id = {r["problem_id"]: r for r in ours_records}
    same, diverged, disagree = 0, [], 0
    for rec in theirs.records:
        mine = ours_by_id[rec["problem_id"]]
        if mine["response"] == rec["response"]:
            same += 1
        else:
            diverged.append(first_difference(mine["response"] or "", rec["response"] or ""))
        disagree += mine["correct"] != rec["correct"]
    num = len(theirs.records)
    ours_acc, hf_acc = ours_metrics["pass@1"], theirs.metrics["pass@1"]
    print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print(f"load average at start {load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f}, at end "
          f"{load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f} (1/5/15 min)")
    print(f"model: {args.model} ({shape.model_type}, {shape.num_params() / 1e6:.1f} M params), float32; "
          f"{args.benchmark} first {num} problems, greedy, max_new_tokens {args.max_new_tokens}, {args.batch} per call")
    for name, m, total_wall, total_cpu in (("ours", ours_metrics, ours_wall, ours_cpu),
                                           ("HF  ", theirs.metrics, hf_wall, hf_cpu)):
        print(f"{name}: pass@1 {m['pass@1']:.3f} ({round(m['pass@1'] * num)}/{num}), mean length "
              f"{m['response_length']:.0f} tokens, truncated {m['truncated_frac']:.0%}; generate {m['time_generate_s']:.1f} s"
              f", total {total_wall:.1f} s wall / {total_cpu:.1f} s CPU (with loading, grading)")
    print(f"identical responses {same}/{num}; the others first differ at character "
          f"{sorted(diverged)}; problems graded differently {disagree}")
    print(f"ACCURACY ours - HF: {round((ours_acc - hf_acc) * num):+d} problems of {num}; "
          f"generate time ratio HF / ours: {theirs.metrics['time_generate_s'] / ours_metrics['time_generate_s']:.2f}x")


if __name__ == "__main__":
    main()
