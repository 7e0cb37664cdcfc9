"""PRIME vs the outcome-only RLOO baseline on the same task and seeds.

    python benchmarks/ablation.py                          # configs/tiny.py, seed 0, -> runs/ablation
    python benchmarks/ablation.py --seeds=0,1 --parallel   # both estimators at once (2+ cores)
    python benchmarks/ablation.py --out=runs/abl -- --config.total_steps=60   # extra overrides for both
    python benchmarks/ablation.py --seeds=0,1,2 --probe    # the README's figure: 3 seeds + PRM probes
    python benchmarks/ablation.py --config=configs/tiny_chains.py --prime_overrides=--config.algo.process_source=oracle
                                                           # a step-level verifier in the PRM's place

Each (estimator, seed) is one `python -m prime_jax.main` run in OUT/<estimator>_s<seed> (resumed if
it already holds checkpoints). Then it writes

* OUT/ablation.png: held-out accuracy, training reward (mean verifier score of the sampled
  responses, smoothed) and the PRM's ranking of fresh samples (prm/dpo_accuracy: its rewards
  before it trained on the batch) vs step; one line per estimator, the mean over seeds, with a
  min-max band over seeds;
* OUT/ablation.json and OUT/ablation.md: start and final held-out accuracy, the best one, the final
  training reward, the PRM's ranking accuracy averaged over the second half of each run, the step
  at which PRIME's mean held-out accuracy reaches outcome-only's final mean, PRIME's final minus
  outcome-only's per seed with its standard error, the mean and per-seed held-out curves (JSON),
  time per step and, with --probe, each PRIME run's best-of-8 pick by the PRM (benchmarks/prm_probe.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prime_jax.config import PRM_TRAINING_SOURCES  # noqa: E402
from prime_jax.train import checkpoint as ckpt  # noqa: E402
from prime_jax.train.metrics import read_metrics  # noqa: E402

ESTIMATORS = ("prime_rloo", "outcome_rloo")
LABELS = {"prime_rloo": "PRIME (implicit PRM + outcome, RLOO)", "outcome_rloo": "RLOO, outcome verifier only"}
BASELINE = "outcome_rloo"  # the run without process rewards; --prime_overrides and the probe skip it


def run_dir(out: Path, estimator: str, seed: int) -> Path:
    return out / f"{estimator}_s{seed}"


def command(config: str, workdir: Path, estimator: str, seed: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "prime_jax.main", f"--config={config}", f"--workdir={workdir}",
            f"--config.algo.estimator={estimator}", f"--config.seed={seed}", *extra]


def run_all(config: str, out: Path, seeds: list[int], extra: list[str], parallel: bool,
            estimators: tuple[str, ...] = ESTIMATORS, prime_extra: tuple[str, ...] = ()) -> dict:
    jobs = [(e, s) for s in seeds for e in estimators]
    wall = {}
    running = []
    for estimator, seed in jobs:
        workdir = run_dir(out, estimator, seed)
        workdir.mkdir(parents=True, exist_ok=True)
        _reuse_reference(out, workdir, seed)
        log = open(workdir / "stdout.log", "a")
        start = time.time()
        overrides = [*extra, *(prime_extra if estimator != BASELINE else ())]
        proc = subprocess.Popen(command(config, workdir, estimator, seed, overrides), cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env=dict(os.environ))
        print(f"started {estimator} seed {seed} -> {workdir}", flush=True)
        running.append((estimator, seed, proc, start))
        if not parallel:
            _wait(running, wall)
    _wait(running, wall)
    return wall


def _reuse_reference(out: Path, workdir: Path, seed: int) -> None:
    """The SFT warm start depends only on the config and seed: copy a finished one of this seed (both
    estimators start from the same weights; saves one SFT per seed)."""
    if (workdir / "reference").exists():
        return
    for estimator in ESTIMATORS:
        donor = run_dir(out, estimator, seed) / "reference"
        if donor != workdir / "reference" and ckpt.params_saved(donor):
            shutil.copytree(donor, workdir / "reference")
            return


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
    ranked = [r for r in train if r.get("prm/dpo_accuracy") is not None]
    return {
        "eval_steps": [r["step"] for r in evals], "eval_accuracy": [r["eval/accuracy"] for r in evals],
        "train_steps": [r["step"] for r in train], "train_reward": [r["train/reward"] for r in train],
        "dpo_steps": [r["step"] for r in ranked], "dpo_accuracy": [r["prm/dpo_accuracy"] for r in ranked],
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


def second_half_mean(steps: list[int], values: list[float]) -> float | None:
    """Mean of the values logged in the second half of the run's steps (None if there are none)."""
    if not steps:
        return None
    half = max(steps) / 2
    vals = [v for s, v in zip(steps, values) if s > half]
    return float(np.mean(vals)) if vals else None


def steps_to_reach(steps: list[int], values: np.ndarray, target: float) -> int | None:
    """First step whose value is >= target (None if never)."""
    for s, v in zip(steps, values):
        if v >= target - 1e-9:
            return int(s)
    return None


def _common(runs: list[dict], key_steps: str, key_values: str) -> tuple[list[int], np.ndarray]:
    """The steps every run logged and a [runs, steps] array of their values there."""
    common = sorted(set.intersection(*(set(r[key_steps]) for r in runs)))
    table = np.array([[dict(zip(r[key_steps], r[key_values]))[s] for s in common] for r in runs], float)
    return common, table


def summarize(out: Path, seeds: list[int], wall: dict, prime_label: str = "") -> dict:
    """prime_label: the PRIME runs' own overrides, shown beside their label."""
    summary = {}
    for estimator in ESTIMATORS:
        if not all((run_dir(out, estimator, s) / "metrics.jsonl").exists() for s in seeds):
            continue
        per_seed = [curves(run_dir(out, estimator, s)) for s in seeds]
        if not all(c["eval_accuracy"] for c in per_seed):
            continue
        start = [c["eval_accuracy"][0] for c in per_seed]
        final = [c["eval_accuracy"][-1] for c in per_seed]
        best = [max(c["eval_accuracy"]) for c in per_seed]
        last_reward = [float(np.mean(c["train_reward"][-10:])) for c in per_seed]
        dpo = [float(np.mean(c["dpo_accuracy"])) for c in per_seed if c["dpo_accuracy"]]
        dpo_half = [second_half_mean(c["dpo_steps"], c["dpo_accuracy"]) for c in per_seed if c["dpo_accuracy"]]
        # the probe ranks by the trained PRM: meaningless for outcome-only runs (their PRM never trains)
        probes = [_probe(run_dir(out, estimator, s)) if estimator != BASELINE else None for s in seeds]
        summary[estimator] = {
            "label": (f"process + outcome RLOO [{prime_label}]" if prime_label and estimator != BASELINE
                      else LABELS[estimator]),
            "seeds": seeds,
            "eval_accuracy_start": float(np.mean(start)),
            "eval_accuracy_final": float(np.mean(final)),
            "eval_accuracy_gain_points": 100 * float(np.mean(final) - np.mean(start)),
            "eval_accuracy_best": float(np.mean(best)),
            "train_reward_last10": float(np.mean(last_reward)),
            "prm_dpo_accuracy_mean": float(np.mean(dpo)) if dpo else None,
            "prm_dpo_accuracy_second_half_per_seed": dpo_half or None,
            "seconds_per_step": float(np.mean([np.mean(c["step_seconds"]) for c in per_seed])),
            "wall_seconds": [wall.get((estimator, s)) for s in seeds],
            "per_seed_start": start,
            "per_seed_final": final,
            "probe_per_seed": probes if any(probes) else None,
            "curves": per_seed,
        }
    if {"prime_rloo", "outcome_rloo"} <= set(summary):
        prime, base = summary["prime_rloo"], summary["outcome_rloo"]
        steps, acc = _common(prime["curves"], "eval_steps", "eval_accuracy")
        target = base["eval_accuracy_final"]
        reach = steps_to_reach(steps, acc.mean(0), target)
        prime["steps_to_outcome_final_mean"] = reach
        prime["fraction_of_steps_to_outcome_final_mean"] = None if reach is None else reach / max(steps)
        prime["final_minus_outcome_final_points"] = 100 * (prime["eval_accuracy_final"] - target)
        # paired by seed (same SFT start): the spread of the per-seed difference sets how far the mean can be trusted
        paired = 100 * (np.asarray(prime["per_seed_final"]) - np.asarray(base["per_seed_final"]))
        prime["final_minus_outcome_per_seed_points"] = paired.tolist()
        prime["final_minus_outcome_standard_error_points"] = (
            float(paired.std(ddof=1) / np.sqrt(len(paired))) if len(paired) > 1 else None)
    return summary


def _probe(workdir: Path) -> dict | None:
    """The PRM probe's headline numbers for a run, if benchmarks/prm_probe.py was run on it."""
    path = workdir / "prm_probe.json"
    if not path.exists():
        return None
    out = json.loads(path.read_text())
    n = out["n"]
    r = next(iter(out["benchmarks"].values()))
    prm = r["signals"]["prm"]
    return {"prm_ranking": prm["ranking_accuracy"], "prm_best_of_n": prm[f"best_of_{n}"],
            "prm_weighted_vote": r.get(f"prm_weighted_vote@{n}"),  # probes before 2026-12-03 lack it
            "random_pick": r[f"random_pick (avg@{n})"], "majority": r[f"maj@{n}"], "pass_at_n": r[f"pass@{n}"], "n": n}


def _band(ax, steps, table, label, scale=100.0):
    """Mean line and min-max band over the rows (seeds) of `table`."""
    line, = ax.plot(steps, scale * table.mean(0), label=label, marker="o" if len(steps) < 3 else None)  # one eval: a dot
    if len(table) > 1:
        ax.fill_between(steps, scale * table.min(0), scale * table.max(0), color=line.get_color(), alpha=0.2)


def plot(summary: dict, path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_eval, ax_train, ax_dpo) = plt.subplots(1, 3, figsize=(17, 4.6))
    seeds = next(iter(summary.values()))["seeds"]
    for estimator, s in summary.items():
        runs = s["curves"]
        steps, acc = _common(runs, "eval_steps", "eval_accuracy")
        _band(ax_eval, steps, acc, s["label"])
        tsteps, reward = _common(runs, "train_steps", "train_reward")
        _band(ax_train, tsteps, np.array([smooth(r, window) for r in reward]), s["label"])
        if all(r["dpo_accuracy"] for r in runs):
            dsteps, dpo = _common(runs, "dpo_steps", "dpo_accuracy")
            _band(ax_dpo, dsteps, np.array([smooth(r, window) for r in dpo]), s["label"], scale=1.0)
    ax_dpo.axhline(0.5, color="grey", ls="--", lw=1, label="chance")
    band = f"mean of seeds {seeds}, band: min-max" if len(seeds) > 1 else f"seed {seeds[0]}"
    ax_eval.set(xlabel="RL step", ylabel="held-out accuracy (greedy, %)", title=f"Held-out accuracy ({band})")
    ax_train.set(xlabel="RL step", ylabel=f"training reward (%, {window}-step mean)",
                 title="Training reward (verifier accuracy of samples)")
    ax_dpo.set(xlabel="RL step", ylabel=f"prm/dpo_accuracy ({window}-step mean)", ylim=(0.0, 1.0),
               title="PRM ranking of fresh samples (before its update)")
    for ax in (ax_eval, ax_train, ax_dpo):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(summary: dict) -> str:
    lines = ["| estimator | held-out start | held-out final | gain (points) | best | train reward (last 10) | "
             "PRM dpo_accuracy, 2nd half (per seed) | "
             "PRM best-of-n / PRM-weighted vote / random / maj (per seed) | s/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary.values():
        half = s["prm_dpo_accuracy_second_half_per_seed"]
        dpo = "-" if not half else ", ".join(f"{v:.3f}" for v in half)
        probes = s["probe_per_seed"]
        bon = "-" if not probes else "; ".join(
            "-" if p is None else f"{100 * p['prm_best_of_n']:.1f} / {_pct(p.get('prm_weighted_vote'))} / "
                                  f"{100 * p['random_pick']:.1f} / {100 * p['majority']:.1f}"
            for p in probes)
        lines.append(f"| {s['label']} | {100 * s['eval_accuracy_start']:.1f}% | "
                     f"{100 * s['eval_accuracy_final']:.1f}% | {s['eval_accuracy_gain_points']:+.1f} | "
                     f"{100 * s['eval_accuracy_best']:.1f}% | "
                     f"{100 * s['train_reward_last10']:.1f}% | {dpo} | {bon} | {s['seconds_per_step']:.2f} |")
    prime = summary.get("prime_rloo", {})
    if "steps_to_outcome_final_mean" in prime:
        reach = prime["steps_to_outcome_final_mean"]
        name = "PRIME" if prime["label"] == LABELS["prime_rloo"] else prime["label"]
        when = ("never" if reach is None else
                "at step 0: outcome-only ends no higher than it starts" if reach == 0 else
                f"at step {reach} ({100 * prime['fraction_of_steps_to_outcome_final_mean']:.0f}% of the steps)")
        lines += ["", f"{name}'s mean held-out accuracy reaches outcome-only's final mean "
                      f"({100 * summary['outcome_rloo']['eval_accuracy_final']:.1f}%) " + when
                      + f"; final difference {prime['final_minus_outcome_final_points']:+.1f} points"
                      + _standard_error(prime.get("final_minus_outcome_standard_error_points")) + "."]
    return "\n".join(lines) + "\n"


def _standard_error(se: float | None) -> str:
    return "" if se is None else f" (standard error {se:.1f}, paired by seed)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--seeds", default="0", help="comma list; every estimator runs with each")
    parser.add_argument("--parallel", action="store_true", help="run all jobs at once")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS), help="comma list of the estimators to run")
    parser.add_argument("--report_only", action="store_true", help="only re-read the runs and redraw")
    parser.add_argument("--smooth", type=int, default=10, help="training-reward moving-average window")
    parser.add_argument("--probe", action="store_true",
                        help="run benchmarks/prm_probe.py on every finished PRIME run (best-of-8 by the PRM)")
    parser.add_argument("--prime_overrides", default="",
                        help="space-separated --config.x=y overrides for the PRIME runs only (the outcome-only "
                             "baseline stays as it is), e.g. --config.algo.process_source=oracle")
    parser.add_argument("extra", nargs="*", help="extra --config.x=y overrides (after --) for every run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    estimators = tuple(e.strip() for e in args.estimators.split(",") if e.strip())
    unknown = set(estimators) - set(ESTIMATORS)
    if unknown:
        raise SystemExit(f"unknown estimators {sorted(unknown)}; expected some of {ESTIMATORS}")
    prime_extra = tuple(args.prime_overrides.split())
    untrained = [o for o in prime_extra
                 if "algo.process_source=" in o and o.split("=")[-1] not in PRM_TRAINING_SOURCES]
    if args.probe and untrained:
        raise SystemExit(f"--probe probes the implicit PRM, and runs with {untrained[0]} do not train one")
    wall = {} if args.report_only else run_all(args.config, out, seeds, args.extra, args.parallel, estimators,
                                               prime_extra)
    if args.probe:
        for seed in seeds:
            workdir = run_dir(out, "prime_rloo", seed)
            if not (workdir / "prm_probe.json").exists():
                subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prm_probe.py"), f"--workdir={workdir}",
                                f"--config={args.config}"], cwd=ROOT, check=True)
    summary = summarize(out, seeds, wall, prime_label=" ".join(prime_extra))
    if not summary:
        raise SystemExit("no finished runs to report")
    plot(summary, out / "ablation.png", args.smooth)
    slim = {e: {k: v for k, v in s.items() if k != "curves"} for e, s in summary.items()}
    for e, s in summary.items():
        steps, acc = _common(s["curves"], "eval_steps", "eval_accuracy")
        slim[e]["eval_curve_mean"] = list(zip(steps, acc.mean(0).tolist()))
        slim[e]["eval_curve_per_seed"] = {seed: list(zip(c["eval_steps"], c["eval_accuracy"]))
                                          for seed, c in zip(s["seeds"], s["curves"])}
    (out / "ablation.json").write_text(json.dumps(slim, indent=2))
    table = markdown(summary)
    (out / "ablation.md").write_text(f"# PRIME vs outcome-only RLOO ({args.config}, seeds {seeds})\n\n{table}\n"
                                     "![curves](ablation.png)\n")
    print(table)
    print(f"wrote {out / 'ablation.png'}, {out / 'ablation.json'}, {out / 'ablation.md'}")


if __name__ == "__main__":
    main()
