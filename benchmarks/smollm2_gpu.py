"""PRIME and outcome-only RLOO from SmolLM2-135M-Instruct on one GPU, in about ten minutes.

    python benchmarks/smollm2_gpu.py --out=runs/smollm2_gpu        # on a machine with a GPU (or TPU)
    python benchmarks/smollm2_gpu.py --out=/tmp/smollm2_dry --dry_run   # the same steps, tiny, on CPU

One SFT stage (configs/smollm2_135m.py:gpu, `--sft_only`), then PRIME and outcome-only RLOO for
the same steps from that one SFT reference (`sft.reference_dir`), in OUT/prime_rloo_s0 and
OUT/outcome_rloo_s0, and `benchmarks/train_step.py` at SmolLM2's shape for the train step's MFU
against the matmul rate measured in the same run. It writes OUT/report.md (and prints it): the
device, rollout tokens/s (the runs' own `perf/tokens_per_s`), the train-step MFU, where a step's
time goes, and both curves (held-out accuracy per set, reward, the PRM's ranking), with
OUT/ablation.png from `benchmarks/ablation.py --report_only`. Paste report.md into
benchmarks/README.md. A rerun resumes finished parts (the runs from their checkpoints).

XLA's persistent compilation cache (OUT/jax_cache) lets the second run reuse the first one's
programs. `--dry_run` swaps the model for a 2-layer random Llama with SmolLM2's tokenizer and
cuts every size, so the whole script runs on a CPU in a few minutes: it checks the script, not
the numbers. The project never needs a GPU; this script is for when one is available.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prime_jax.train.metrics import read_metrics  # noqa: E402

CONFIG = "configs/smollm2_135m.py:gpu"
ESTIMATORS = ("prime_rloo", "outcome_rloo")
# SmolLM2-135M's shape for benchmarks/train_step.py (a batch of the :gpu preset's mini-batch).
TRAIN_STEP_SHAPE = ["--hidden=576", "--intermediate=1536", "--layers=30", "--heads=9", "--kv-heads=3",
                    "--vocab=49152", "--batch=64", "--prompt-len=128", "--response-len=256", "--steps=5"]
# --dry_run: a 2-layer Llama of width 128 with SmolLM2's tokenizer, 2 RL steps of 2 prompts, 16 new tokens.
DRY_RUN = ["--config.model.path=random", "--config.model.model_type=llama", "--config.model.hidden_size=128",
           "--config.model.intermediate_size=256", "--config.model.num_layers=2", "--config.model.num_heads=2",
           "--config.model.num_kv_heads=1", "--config.model.head_dim=64", "--config.tokenizer.path=smollm2-135m-instruct",
           "--config.total_steps=2", "--config.eval_every=1", "--config.sft.steps=2", "--config.sft.batch=2",
           "--config.sft.num_examples=16", "--config.data.eval_max_problems=4", "--config.rollout.eval_batch=4",
           "--config.rollout.max_new_tokens=16", "--config.rollout.eval_max_new_tokens=16",
           "--config.batch.prompts_per_step=2", "--config.batch.mini_batch=8", "--config.batch.prm_mini_batch=8",
           "--config.batch.score_batch=8", "--config.data.synthetic.num_train=64", "--config.rollout.max_refill=0",
           "--config.algo.filter=false"]
DRY_TRAIN_STEP = ["--hidden=128", "--intermediate=256", "--layers=2", "--heads=2", "--kv-heads=1", "--vocab=49152",
                  "--batch=8", "--prompt-len=64", "--response-len=16", "--steps=2", "--matmul-size=512"]


def run(cmd: list[str], log: Path, env: dict) -> float:
    """Runs `cmd` from the repository root, its output appended to `log`; returns its wall seconds."""
    start = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.time() - start


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return float(np.median(values)) if values else None


def run_summary(workdir: Path) -> dict:
    """Curves and step-time medians of one run's metrics.jsonl."""
    rows = read_metrics(workdir / "metrics.jsonl")
    train = [r for r in rows if "train/reward" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    sets = sorted({k.split("/")[1] for r in evals for k in r if k.startswith("eval/") and k.endswith("/accuracy")
                   and k.count("/") == 2})
    return {
        "steps": len(train),
        "eval": [{"step": r["step"], **{s: r.get(f"eval/{s}/accuracy") for s in sets}} for r in evals],
        "reward": [round(r["train/reward"], 4) for r in train],
        "dpo_accuracy": [r.get("prm/dpo_accuracy") for r in train],
        "kept_group_frac": [r.get("filter/kept_group_frac") for r in train],
        "rollout_tokens_per_s": median(train, "perf/tokens_per_s"),
        "time_s": {k.split("/")[1]: median(train, k) for k in
                   ("time/step_s", "time/sample_s", "time/grade_s", "time/score_s", "time/prm_s", "time/policy_s")},
    }


def report(out: Path, device: str, summaries: dict, train_step: dict, wall: dict) -> str:
    lines = [f"### SmolLM2-135M-Instruct, PRIME vs outcome-only on {device}", "",
             f"`python benchmarks/smollm2_gpu.py --out={out}` ({CONFIG}; wall seconds: "
             + ", ".join(f"{k} {v:.0f}" for k, v in wall.items()) + ").", "",
             f"Train step at SmolLM2's shape (`benchmarks/train_step.py`, {train_step.get('batch')}, "
             f"{train_step.get('dtype')}): {train_step.get('step_s_median')} s, MFU "
             f"{train_step.get('mfu_median_step_vs_median_matmul')} of the measured matmul rate "
             f"({train_step.get('matmul_peak_tflop_per_s')} TFLOP/s).", "",
             "| | " + " | ".join(summaries) + " |", "|---|" + "---|" * len(summaries)]
    first = next(iter(summaries.values()))
    lines.append("| RL steps | " + " | ".join(str(s["steps"]) for s in summaries.values()) + " |")
    lines.append("| rollout tokens/s (median) | " + " | ".join(f"{s['rollout_tokens_per_s'] or 0:.0f}"
                                                         for s in summaries.values()) + " |")
    for key in first["time_s"]:
        lines.append(f"| {key} median, s | " + " | ".join(
            "-" if s["time_s"][key] is None else f"{s['time_s'][key]:.2f}" for s in summaries.values()) + " |")
    lines += ["", "Held-out greedy accuracy per set (step: accuracies):", ""]
    for name, s in summaries.items():
        lines.append(f"- {name}: " + "; ".join(
            f"step {e['step']}: " + ", ".join(f"{k} {v:.3f}" for k, v in e.items() if k != "step" and v is not None)
            for e in s["eval"]))
    lines += ["", "Training reward per step:", ""]
    for name, s in summaries.items():
        lines.append(f"- {name}: " + " ".join(f"{v:.2f}" for v in s["reward"]))
    dpo = [v for v in summaries.get("prime_rloo", {}).get("dpo_accuracy", []) if v is not None]
    if dpo:
        lines += ["", "PRIME's PRM ranking of fresh samples (prm/dpo_accuracy) per step: "
                  + " ".join(f"{v:.2f}" for v in dpo)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/smollm2_gpu")
    parser.add_argument("--dry_run", action="store_true", help="tiny model and sizes (checks the script on a CPU)")
    args = parser.parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(out / "jax_cache"))
    extra = DRY_RUN if args.dry_run else []
    main_cmd = [sys.executable, "-m", "prime_jax.main", f"--config={CONFIG}"]
    wall = {}

    reference = out / "sft" / "reference"
    wall["sft"] = run([*main_cmd, f"--workdir={out / 'sft'}", "--sft_only", *extra], log, env)
    for estimator in ESTIMATORS:
        workdir = out / f"{estimator}_s0"  # benchmarks/ablation.py's layout
        wall[estimator] = run([*main_cmd, f"--workdir={workdir}", f"--config.algo.estimator={estimator}",
                               f"--config.sft.reference_dir={reference}", *extra], log, env)
    ablation = [sys.executable, "benchmarks/ablation.py", "--report_only", f"--config={CONFIG}", f"--out={out}",
                "--smooth=1"]
    wall["report"] = run(ablation, log, env)
    shape = DRY_TRAIN_STEP if args.dry_run else TRAIN_STEP_SHAPE
    start = time.time()
    proc = subprocess.run([sys.executable, "benchmarks/train_step.py", *shape], cwd=ROOT, capture_output=True,
                          text=True, env=env)
    wall["train_step"] = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"benchmarks/train_step.py failed: {proc.stderr[-2000:]}")
    train_step = json.loads(proc.stdout[proc.stdout.index("{"):])
    summaries = {e: run_summary(out / f"{e}_s0") for e in ESTIMATORS}
    (out / "summary.json").write_text(json.dumps({"train_step": train_step, "runs": summaries, "wall_s": wall},
                                                 indent=1))
    text = report(out, train_step["device"] + (" (dry run: tiny model)" if args.dry_run else ""), summaries,
                  train_step, wall)
    (out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
