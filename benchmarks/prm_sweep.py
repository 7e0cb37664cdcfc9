"""What makes the implicit PRM rank on the demo: short PRIME runs over PRM settings, one at a time.

    python benchmarks/prm_sweep.py --out=runs/sweep                      # every setting below, then the table
    python benchmarks/prm_sweep.py --out=runs/sweep --only=dpo,before    # some of them
    python benchmarks/prm_sweep.py --out=runs/sweep --report_only        # re-read the runs, print the table

Each setting is `python -m prime_jax.main --config=configs/tiny.py` with `--steps` PRIME steps
(default 150), evaluations every 50 steps, no intermediate checkpoints, plus the setting's
overrides (SETTINGS below: the sweep as it was run for benchmarks/README.md), in OUT/<setting>. The SFT warm start depends only on the seed, so the
first run's WORKDIR/reference is copied into the others. OUT/outcome is the outcome-only baseline
for the same steps. The table (printed and written to OUT/sweep.md):

* fresh ranking: `prm/dpo_accuracy` (the PRM's rewards on the batch before it trained on it),
  mean over the second half of the steps, and the fraction of those steps above 0.5;
* given ranking: `prm/dpo_accuracy_given` (the rewards the policy received);
* mean summed q of correct and wrong rows (second half, fresh);
* held-out greedy accuracy at the start and the end, and the difference to the outcome-only run at
  the same step;
* if benchmarks/prm_probe.py was run on the setting's workdir: the PRM's ranking of fresh held-out
  samples and its best-of-8 pick against a random pick.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prime_jax.train.metrics import read_metrics  # noqa: E402

# The base of every PRIME setting: the reference recipe's ratio on this model (PRM lr 2x the
# policy's 2e-4, no warm-up; ce, beta 0.05, q after the update, two PRM updates per step),
# process_coef 1.0. Each setting changes some of these (the names say which).
BASE = ["--config.algo.process_coef=1.0", "--config.prm_optim.lr=4e-4", "--config.prm_optim.warmup_steps=0",
        "--config.algo.prm_loss=ce", "--config.algo.prm_update=after", "--config.algo.beta=0.05",
        "--config.batch.prm_mini_batch=32"]  # explicit: configs/tiny.py now sets the sweep's choice
# dpo, beta 1 (~20x for ~18-token answers), one update. The benchmarks/README.md rows of these settings were run
# before issue 29 with prm_update "before" and a dpo whose group scores came from the update's own forward (rows
# without a contrast row skipped); dpo now reads them from the first scoring pass of "reverse", as in veRL, and
# counts every row, so a rerun of a comb_* setting gives the policy the update passes' q (before its one update).
COMBINED = ["--config.algo.prm_loss=dpo", "--config.algo.prm_update=reverse", "--config.algo.beta=1.0",
            "--config.batch.prm_mini_batch=64"]
PAIR = ["--config.algo.prm_loss=pairwise", "--config.algo.prm_update=before"] + COMBINED[2:]
SETTINGS: dict[str, list[str]] = {
    "outcome": ["--config.algo.estimator=outcome_rloo", "--config.batch.prm_mini_batch=32"],
    "comb_lr4e-4": BASE + COMBINED,
    "comb_lr2e-5": BASE + COMBINED + ["--config.prm_optim.lr=2e-5"],
    "comb_lr1e-4_eps1e-2": BASE + COMBINED + ["--config.prm_optim.lr=1e-4", "--config.prm_optim.eps=1e-2"],
    "pair_lr1e-4": BASE + PAIR + ["--config.prm_optim.lr=1e-4"],
    "pair_lr2e-5": BASE + PAIR + ["--config.prm_optim.lr=2e-5"],
    # the PRM as an observer: trained as above, but the policy gets no process rewards
    "comb_lr2e-5_coef0": BASE + COMBINED + ["--config.prm_optim.lr=2e-5", "--config.algo.process_coef=0.0"],
}


def run(out: Path, name: str, overrides: list[str], steps: int, seed: int) -> None:
    workdir = out / name
    donor = next((d / "reference" for d in out.iterdir() if (d / "reference").is_dir() and d != workdir
                  and json.loads((d / "config.json").read_text()).get("seed") == seed), None) if out.is_dir() else None
    if donor is not None and not (workdir / "reference").exists():
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(donor, workdir / "reference")
    cmd = [sys.executable, "-m", "prime_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
           f"--config.total_steps={steps}", "--config.eval_every=50", "--config.checkpoint_every=0",
           "--config.logging.progress_bar=False", f"--config.seed={seed}", *overrides]
    print(" ".join(cmd), flush=True)
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)


def second_half(rows: list[dict], key: str) -> list[float]:
    last = max(r["step"] for r in rows)
    return [r[key] for r in rows if r["step"] > last / 2 and r.get(key) is not None]


def summarize(workdir: Path) -> dict | None:
    if not (workdir / "metrics.jsonl").exists():
        return None
    rows = read_metrics(workdir / "metrics.jsonl")
    train = [r for r in rows if "train/reward" in r]
    if not train:
        return None
    out = {"steps": max(r["step"] for r in train), "eval": [(r["step"], r["eval/accuracy"]) for r in rows
                                                           if "eval/accuracy" in r],
           "seconds_per_step": float(np.mean([r["time/step_s"] for r in train]))}
    fresh = second_half(train, "prm/dpo_accuracy")
    if fresh:
        out.update({"fresh": float(np.mean(fresh)), "fresh_above_half": float(np.mean(np.asarray(fresh) > 0.5)),
                    "given": float(np.mean(second_half(train, "prm/dpo_accuracy_given") or [np.nan])),
                    "q_correct": float(np.mean(second_half(train, "prm/q_sum_correct"))),
                    "q_wrong": float(np.mean(second_half(train, "prm/q_sum_wrong")))})
    probe = workdir / "prm_probe.json"
    if probe.exists():
        p = next(iter(json.loads(probe.read_text())["benchmarks"].values()))
        n = json.loads(probe.read_text())["n"]
        out["probe"] = (p["signals"]["prm"]["ranking_accuracy"], p["signals"]["prm"][f"best_of_{n}"],
                        p[f"random_pick (avg@{n})"])
    return out


def table(out: Path, names: list[str]) -> str:
    base = summarize(out / "outcome")
    base_eval = dict(base["eval"]) if base else {}
    lines = ["| setting | steps | fresh dpo_accuracy (2nd half) | steps > 0.5 | given dpo_accuracy | Σq correct / wrong | "
             "held-out start -> end | vs outcome-only at that step | probe: PRM ranking, best-of-8 vs random | s/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        s = summarize(out / name)
        if s is None:
            continue
        cells = ["-"] * 4
        if "fresh" in s:
            cells = [f"{s['fresh']:.3f}", f"{100 * s['fresh_above_half']:.0f}%", f"{s['given']:.3f}",
                     f"{s['q_correct']:.2f} / {s['q_wrong']:.2f}"]
        held, vs = "-", "-"
        if len(s["eval"]) >= 2:
            (_, start), (last, end) = s["eval"][0], s["eval"][-1]
            held = f"{100 * start:.1f}% -> {100 * end:.1f}% (step {last})"
            if name != "outcome" and last in base_eval:
                vs = f"{100 * (end - base_eval[last]):+.1f}"
        probe = "-" if "probe" not in s or name == "outcome" else (f"{s['probe'][0]:.3f}, {100 * s['probe'][1]:.1f}% vs "
                                              f"{100 * s['probe'][2]:.1f}%")
        lines.append(f"| {name} | {s['steps']} | " + " | ".join(cells) + f" | {held} | {vs} | {probe} | "
                     f"{s['seconds_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--only", default="", help="comma list of settings (default: all)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=--config.x=y,--config.z=w",
                        help="an extra setting on top of the base (repeatable)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(SETTINGS)
    for spec in args.extra:
        name, _, flags = spec.partition("=")
        settings[name] = BASE + [f for f in flags.split(",") if f]
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(settings)
    unknown = [n for n in names if n not in settings]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; known: {sorted(settings)}")
    if not args.report_only:
        for name in names:
            if summarize(out / name) is None:
                run(out, name, settings[name], args.steps, args.seed)
    text = table(out, [n for n in settings if n in names or args.report_only])
    (out / "sweep.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
