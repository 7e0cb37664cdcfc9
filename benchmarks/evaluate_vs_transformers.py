"""Greedy benchmark accuracy of a real model: `prime_jax.evaluate` vs transformers `generate`, same
prompts, same grader, timed side by side in one run.

    python benchmarks/evaluate_vs_transformers.py                          # SmolLM2-135M-Instruct, GSM8K, 100 problems
    python benchmarks/evaluate_vs_transformers.py --limit=8 --max-new-tokens=128   # a quick look
    # the 100 in two runs of 50 (each well inside a 15-minute slot on a 2-core box), then one report
    python benchmarks/evaluate_vs_transformers.py --start=0 --limit=50 --json-out=a.json
    python benchmarks/evaluate_vs_transformers.py --start=50 --limit=50 --json-out=b.json
    python benchmarks/evaluate_vs_transformers.py --report a.json b.json

Ours: `prime_jax.eval.run.evaluate` with `configs/smollm2_135m.py` (the model's chat template around
the problem and the paper's instruction "Please reason step by step, and put your final answer
within \\boxed{}.", greedy, `--max-new-tokens`, `--batch` prompts per generate call), exactly what
`python -m prime_jax.evaluate --config=configs/smollm2_135m.py --checkpoint=MODEL --benchmarks=gsm8k
--limit=N` runs. transformers: the same weights (the HF folder the model resolves to: for a GGUF the
converted one), `generate(do_sample=False)` on the same prompt ids in the same chunks (left-padded,
stopping at the same end-of-response ids), graded by the same `eval.lib.evaluate_benchmark`.

Prints pass@1 of both, how many responses are identical and where they first differ (character
offset), the time each side spent generating (ours includes compiling its programs) and
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

    from prime_jax.eval.lib import decode_responses
    from prime_jax.eval.results import Generation

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


def problem_file(benchmark: str, start: int, limit: int, folder: Path) -> str:
    """Problems [start, start + limit) of a packaged benchmark as a file of its own format, named
    like it (so that both sides, and `evaluate`'s records, see exactly these problems)."""
    from prime_jax.data.readers import benchmark_path

    rows = benchmark_path(benchmark).read_text().splitlines()[start:start + limit]
    path = folder / f"{benchmark}.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def compare(args) -> dict:
    """One side-by-side run (see the module docstring); returns its summary."""
    import jax
    import torch
    import transformers

    from configs.smollm2_135m import get_config
    from prime_jax.eval import lib as eval_lib
    from prime_jax.eval.results import settings_from_config
    from prime_jax.data import load_eval_sets
    from prime_jax.eval.run import evaluate
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
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="eval_parity_"))
    workdir.mkdir(parents=True, exist_ok=True)
    source = problem_file(args.benchmark, args.start, args.limit, workdir)

    # ---- ours, as the CLI runs it
    wall, cpu = time.perf_counter(), time.process_time()
    scores = evaluate(config, workdir, checkpoint=args.model, benchmarks=source, limit=0,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch, mesh=make_mesh(data=1))
    ours_wall, ours_cpu = time.perf_counter() - wall, time.process_time() - cpu
    ours_metrics = scores["benchmarks"][args.benchmark]
    ours_records = [json.loads(line) for line in
                    (Path(scores["output"]) / f"{args.benchmark}.jsonl").read_text().splitlines()]  # eval/<name>/

    # ---- transformers, same prompts in the same chunks, same grader
    wall, cpu = time.perf_counter(), time.process_time()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(folder)
    problems = load_eval_sets(config, [source], 0)[0][args.benchmark]
    settings = settings_from_config(config, max_new_tokens=args.max_new_tokens, batch_size=args.batch)
    stops = eos_token_ids(tokenizer)
    with RewardPool(1, math_timeout=config.reward.timeout_s, code_timeout=config.reward.timeout_s) as pool:
        theirs = eval_lib.evaluate_benchmark(args.benchmark, problems, tokenizer=tokenizer, pool=pool,
                                             settings=settings,
                                             generate=transformers_generate_fn(hf, tokenizer, settings, stops))
    hf_wall, hf_cpu = time.perf_counter() - wall, time.process_time() - cpu
    load_end = os.getloadavg()

    ours_by_id = {r["problem_id"]: r for r in ours_records}
    rows = [{"id": rec["problem_id"], "ours_correct": bool(ours_by_id[rec["problem_id"]]["correct"]),
             "hf_correct": bool(rec["correct"]), "ours_tokens": ours_by_id[rec["problem_id"]]["num_tokens"],
             "hf_tokens": rec["num_tokens"],
             "first_difference": None if ours_by_id[rec["problem_id"]]["response"] == rec["response"] else
             first_difference(ours_by_id[rec["problem_id"]]["response"] or "", rec["response"] or "")}
            for rec in theirs.records]
    return {
        "machine": f"{os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads), transformers {transformers.__version__}",
        "load_average": [list(load_start), list(load_end)],
        "model": f"{args.model} ({shape.model_type}, {shape.num_params() / 1e6:.1f} M params), float32",
        "settings": f"{args.benchmark} problems {args.start}-{args.start + len(rows) - 1}, greedy, max_new_tokens "
                    f"{args.max_new_tokens}, {args.batch} prompts per call",
        "rows": rows,
        "ours": {"generate_s": ours_metrics["time_generate_s"], "wall_s": ours_wall, "cpu_s": ours_cpu,
                 "truncated": ours_metrics["truncated_frac"]},
        "hf": {"generate_s": theirs.metrics["time_generate_s"], "wall_s": hf_wall, "cpu_s": hf_cpu,
               "truncated": theirs.metrics["truncated_frac"]},
    }


def report(runs: list[dict]) -> None:
    """The side-by-side numbers of one run or of several runs over consecutive problems."""
    rows = [r for run in runs for r in run["rows"]]
    num = len(rows)
    print(f"machine: {runs[0]['machine']}")
    for run in runs:
        (a1, a5, a15), (b1, b5, b15) = run["load_average"]
        print(f"run: {run['settings']}; load average at start {a1:.2f}/{a5:.2f}/{a15:.2f}, at end "
              f"{b1:.2f}/{b5:.2f}/{b15:.2f} (1/5/15 min)")
    print(f"model: {runs[0]['model']}")
    for side in ("ours", "hf"):
        correct = sum(r[f"{side}_correct"] for r in rows)
        tokens = sum(r[f"{side}_tokens"] for r in rows)
        gen, wall, cpu = (sum(run[side][k] for run in runs) for k in ("generate_s", "wall_s", "cpu_s"))
        truncated = sum(run[side]["truncated"] * len(run["rows"]) for run in runs) / num
        print(f"{'ours' if side == 'ours' else 'HF  '}: pass@1 {correct}/{num} = {correct / num:.3f}; {tokens} tokens "
              f"(mean {tokens / num:.0f}), truncated {truncated:.0%}; generate {gen:.1f} s ({tokens / gen:.1f} "
              f"tokens/s), total {wall:.1f} s wall / {cpu:.1f} s CPU (loading, compiling, grading included)")
    same = [r for r in rows if r["first_difference"] is None]
    print(f"identical responses {len(same)}/{num}; the others first differ at character "
          f"{sorted(r['first_difference'] for r in rows if r['first_difference'] is not None)}; graded differently "
          f"{sum(r['ours_correct'] != r['hf_correct'] for r in rows)}")
    ours_gen = sum(run["ours"]["generate_s"] for run in runs)
    hf_gen = sum(run["hf"]["generate_s"] for run in runs)
    print(f"ACCURACY ours - HF: {sum(r['ours_correct'] for r in rows) - sum(r['hf_correct'] for r in rows):+d} "
          f"problems of {num}; generate time HF / ours: {hf_gen / ours_gen:.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="HF folder, .gguf file or packaged name")
    p.add_argument("--benchmark", default="gsm8k", help="a packaged benchmark")
    p.add_argument("--start", type=int, default=0, help="the first problem (0-based)")
    p.add_argument("--limit", type=int, default=100, help="how many problems from --start")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=64, help="prompts per generate call (both sides)")
    p.add_argument("--workdir", default="", help="where ours writes eval/ (default: a temporary folder)")
    p.add_argument("--json-out", default="", help="also write this run's summary (per-problem results) here")
    p.add_argument("--report", nargs="+", default=None, metavar="JSON",
                   help="no run: the combined report of runs' --json-out files (e.g. problems 0-49 and 50-99)")
    args = p.parse_args()
    if args.report:
        report([json.loads(Path(f).read_text()) for f in args.report])
        return
    run = compare(args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(run, indent=1))
    report([run])


if __name__ == "__main__":
    main()
