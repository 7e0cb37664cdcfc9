"""PRIME vs the outcome-only RLOO baseline on the same task and seeds.

    python benchmarks/ablation.py                          # configs/tiny.py, seed 0, -> runs/ablation
    python benchmarks/ablation.py --seeds=0,1 --parallel   # both estimators at once (2+ cores)
    python benchmarks/ablation.py --out=runs/abl -- --config.total_steps=60   # extra overrides for both

Each (estimator, seed) is one `python -m prime_jax.main` run in OUT/<estimator>_s<seed> (resumed if
it already holds checkpoints). Then it writes

* OUT/ablation.png: held-out accuracy and training reward (mean verifier score of the sampled
  responses, smoothed) vs step, one curve per estimator (mean over seeds);
* OUT/ablation.json and OUT/ablation.md: start and final held-out accuracy, the best one, the final
  training reward, the PRM's ranking accuracy (dpo_accuracy) and time per step.
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

ESTIMATORS = ("prime_rloo", "outcome_rloo")
LABELS = {"prime_rloo": "PRIME (implicit PRM + outcome, RLOO)", "outcome_rloo": "RLOO, outcome verifier only"}


def run_dir(out: Path, estimator: str, seed: int) -> Path:
    return out / f"{estimator}_s{seed}"


def command(config: str, workdir: Path, estimator: str, seed: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "prime_jax.main", f"--config={config}", f"--workdir={workdir}",
            f"--config.algo.estimator={estimator}", f"--config.seed={seed}", *extra]


def run_all(config: str, out: Path, seeds: list[int], extra: list[str], parallel: bool) -> dict:
    jobs = [(e, s) for s in seeds for e in ESTIMATORS]
    wall = {}
    running = []
    for estimator, seed in jobs:
        workdir = run_dir(out, estimator, seed)
        workdir.mkdir(parents=True, exist_ok=True)
        log = open(workdir / "stdout.log", "a")
        start = time.time()
        proc = subprocess.Popen(command(config, workdir, estimator, seed, extra), cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env=dict(os.environ))
        print(f"started {estimator} seed {seed} -> {workdir}", flush=True)
        running.append((estimator, seed, proc, start))
        if not parallel:
            _wait(running, wall)
    _wait(running, wall)
    return wall


def _wait(running, wall) -> None:
    while running:
        estimator, seed, proc, start = running.pop(0)
        if proc.wait() != 0:
            raise SystemExit(f"{estimator} seed {seed} failed (exit {proc.returncode}); see its stdout.log")
        wall[(estimator, seed)] = time.time() - start
        print(f"finished {estimator} seed {seed} in {wall[(estimator, seed)]:.0f}s", flush=True)


def curves(workdir: Path) -> dict:
    rows = read_metrics(workdir / "metrics.jsonl")
    evals = [r for r in rows if "eval/accuracy" in r]
    train = [r for r in rows if "train/reward" in r]
    return {
        "eval_steps": [r["step"] for r in evals], "eval_accuracy": [r["eval/accuracy"] for r in evals],
        "train_steps": [r["step"] for r in train], "train_reward": [r["train/reward"] for r in train],
        "dpo_accuracy": [r["prm/dpo_accuracy"] for r in train if r.get("prm/dpo_accuracy") is not None],
        "step_seconds": [r["time/step_s"] for r in train],
    }


def smooth(values: list[float], window: int) -> np.ndarray:
    v = np.asarray(values, float)
    if len(v) == 0 or window <= 1:
        return v
    out = np.empty_like(v)
    for i in range(len(v)):
        out[i] = v[max(0, i - window + 1): i + 1].mean()
    return out


def summarize(out: Path, seeds: list[int], wall: dict) -> dict:
    summary = {}
    for estimator in ESTIMATORS:
        per_seed = [curves(run_dir(out, estimator, s)) for s in seeds]
        if not all(c["eval_accuracy"] for c in per_seed):
            continue
        start = [c["eval_accuracy"][0] for c in per_seed]
        final = [c["eval_accuracy"][-1] for c in per_seed]
        best = [max(c["eval_accuracy"]) for c in per_seed]
        last_reward = [float(np.mean(c["train_reward"][-10:])) for c in per_seed]
        dpo = [float(np.mean(c["dpo_accuracy"])) for c in per_seed if c["dpo_accuracy"]]
        summary[estimator] = {
            "label": LABELS[estimator],
            "seeds": seeds,
            "eval_accuracy_start": float(np.mean(start)),
            "eval_accuracy_final": float(np.mean(final)),
            "eval_accuracy_gain_points": 100 * float(np.mean(final) - np.mean(start)),
            "eval_accuracy_best": float(np.mean(best)),
            "train_reward_last10": float(np.mean(last_reward)),
            "prm_dpo_accuracy_mean": float(np.mean(dpo)) if dpo else None,
            "seconds_per_step": float(np.mean([np.mean(c["step_seconds"]) for c in per_seed])),
            "wall_seconds": [wall.get((estimator, s)) for s in seeds],
            "per_seed_final": final,
            "curves": per_seed,
        }
    return summary


def plot(summary: dict, path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_eval, ax_train) = plt.subplots(1, 2, figsize=(12, 4.5))
    for estimator, s in summary.items():
        runs = s["curves"]
        steps = runs[0]["eval_steps"]
        acc = np.mean([r["eval_accuracy"][: len(steps)] for r in runs], axis=0)
        ax_eval.plot(steps, 100 * acc, marker="o", label=s["label"])
        tsteps = runs[0]["train_steps"]
        reward = np.mean([smooth(r["train_reward"][: len(tsteps)], window) for r in runs], axis=0)
        ax_train.plot(tsteps, 100 * reward, label=s["label"])
    ax_eval.set(xlabel="RL step", ylabel="held-out accuracy (greedy, %)", title="Held-out accuracy")
    ax_train.set(xlabel="RL step", ylabel=f"training reward (%, {window}-step mean)",
                 title="Training reward (verifier accuracy of samples)")
    for ax in (ax_eval, ax_train):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(summary: dict) -> str:
    lines = ["| estimator | held-out start | held-out final | gain (points) | best | train reward (last 10) | "
             "PRM dpo_accuracy | s/step |", "|---|---|---|---|---|---|---|---|"]
    for s in summary.values():
        dpo = "-" if s["prm_dpo_accuracy_mean"] is None else f"{s['prm_dpo_accuracy_mean']:.3f}"
        lines.append(f"| {s['label']} | {100 * s['eval_accuracy_start']:.1f}% | {100 * s['eval_accuracy_final']:.1f}% | "
                     f"{s['eval_accuracy_gain_points']:+.1f} | {100 * s['eval_accuracy_best']:.1f}% | "
                     f"{100 * s['train_reward_last10']:.1f}% | {dpo} | {s['seconds_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--seeds", default="0", help="comma list; every estimator runs with each")
    parser.add_argument("--parallel", action="store_true", help="run all jobs at once")
    parser.add_argument("--report_only", action="store_true", help="only re-read the runs and redraw")
    parser.add_argument("--smooth", type=int, default=10, help="training-reward moving-average window")
    parser.add_argument("extra", nargs="*", help="extra --config.x=y overrides (after --) for every run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    wall = {} if args.report_only else run_all(args.config, out, seeds, args.extra, args.parallel)
    summary = summarize(out, seeds, wall)
    if not summary:
        raise SystemExit("no finished runs to report")
    plot(summary, out / "ablation.png", args.smooth)
    slim = {e: {k: v for k, v in s.items() if k != "curves"} for e, s in summary.items()}
    for e, s in summary.items():
        slim[e]["eval_curve"] = list(zip(s["curves"][0]["eval_steps"], s["curves"][0]["eval_accuracy"]))
    (out / "ablation.json").write_text(json.dumps(slim, indent=2))
    table = markdown(summary)
    (out / "ablation.md").write_text(f"# PRIME vs outcome-only RLOO ({args.config}, seeds {seeds})\n\n{table}\n"
                                     "![curves](ablation.png)\n")
    print(table)
    print(f"wrote {out / 'ablation.png'}, {out / 'ablation.json'}, {out / 'ablation.md'}")


if __name__ == "__main__":
    main()
