"""Issue 32's real-model run on a CPU, in resumable pieces: SFT of SmolLM2-135M-Instruct, the SFT
and raw models on the held-out sets, then PRIME and outcome-only RLOO from that one SFT reference,
kept at the same step count.

    python benchmarks/smollm2_cpu.py --out=runs/smollm2_cpu                 # everything, to the end (hours)
    python benchmarks/smollm2_cpu.py --out=runs/smollm2_cpu --next          # only the next piece of work
    python benchmarks/smollm2_cpu.py --out=runs/smollm2_cpu --report_only   # the numbers so far

Pieces, in order (each one is skipped once done; a SIGTERM stops the one running at its next step
with its state saved, so `timeout -s TERM 900 python benchmarks/smollm2_cpu.py --next` repeated
makes the run continue in 15-minute slots on a shared box):

1. SFT (`main --sft_only`, its state saved every 5 steps) -> OUT/sft/reference;
2. the SFT model: `main --config.total_steps=0` (the in-run held-out eval of the start, the
   token-reward page, and the export OUT/sft/hf_export);
3. the raw model: `prime_jax.evaluate` on the same GSM8K problems (heldout, gsm8k) -> OUT/raw/eval;
4. for each seed, PRIME and outcome-only (OUT/<estimator>_s<seed>, benchmarks/ablation.py's
   layout, `--config.sft.reference_dir=OUT/sft/reference --config.eval_at_start=false`), `--chunk`
   steps at a time (`main --stop_after`), the run that is behind first; the last piece of a run
   finishes it (the end eval and its export).

Prints (and writes OUT/report.md) each run's reward, PRM ranking (`prm/dpo_accuracy`), where a step's
time goes and the held-out accuracies of the raw, SFT and RL models. Same config for every piece:
configs/smollm2_135m.py unless `--config`.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.smollm2_gpu import run_summary  # noqa: E402
from prime_jax.train.metrics import read_metrics  # noqa: E402

ESTIMATORS = ("prime_rloo", "outcome_rloo")
RAW_EVAL = ["--checkpoint=smollm2-135m-instruct", "--tag=greedy32", "--benchmarks=heldout,gsm8k",
            "--limit=32"]  # the first 32 of the in-run eval's GSM8K sets


class Stopped(Exception):
    pass


STOP = {"requested": False}


def _on_term(signum, frame):  # the child got the same signal (timeout signals the process group): let it save
    STOP["requested"] = True


def run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"\n[{time.strftime('%H:%M:%S')}] $ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd)}; see {log}")
    if STOP["requested"]:
        raise Stopped


def steps_done(workdir: Path) -> int:
    folder = workdir / "checkpoints"
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
    return max(steps, default=0)


def finished(workdir: Path, total: int) -> bool:
    rows = read_metrics(workdir / "metrics.jsonl") if (workdir / "metrics.jsonl").exists() else []
    return any(r.get("step") == total and "eval/accuracy" in r for r in rows)


def pieces(args, out: Path):
    """The remaining pieces of work, in order: (name, command)."""
    main = [sys.executable, "-m", "prime_jax.main", f"--config={args.config}", "--config.logging.progress_bar=false"]
    if not (out / "sft" / "reference" / "_CHECKPOINT_METADATA").exists():
        yield "sft", [*main, f"--workdir={out / 'sft'}", "--sft_only", "--config.sft.checkpoint_every=5"]
    if not (out / "sft" / "hf_export" / "config.json").exists():
        yield "sft eval + export", [*main, f"--workdir={out / 'sft'}", "--config.total_steps=0"]
    if not any((out / "raw" / "eval").rglob("scores.json")):
        yield "raw eval", [sys.executable, "-m", "prime_jax.evaluate", f"--config={args.config}",
                           f"--workdir={out / 'raw'}", *RAW_EVAL]
    while True:
        runs = [(steps_done(out / f"{e}_s{s}"), s, i) for s in args.seeds for i, e in enumerate(ESTIMATORS)
                if not finished(out / f"{e}_s{s}", args.steps)]
        if not runs:
            return
        done, seed, index = min(runs)  # the run furthest behind; PRIME first
        estimator = ESTIMATORS[index]
        target = min(args.steps, (done // args.chunk + 1) * args.chunk)
        workdir = out / f"{estimator}_s{seed}"
        yield f"{workdir.name} to step {target}", [
            *main, f"--workdir={workdir}", f"--config.algo.estimator={estimator}", f"--config.seed={seed}",
            f"--config.total_steps={args.steps}", f"--config.sft.reference_dir={out / 'sft' / 'reference'}",
            "--config.eval_at_start=false", *([f"--stop_after={target}"] if target < args.steps else [])]


def report(out: Path, args) -> str:
    lines = [f"### {out}", ""]
    for f in sorted((out / "raw" / "eval").rglob("scores.json")):
        s = json.loads(f.read_text())
        lines.append("- raw model, greedy: " + ", ".join(
            f"{k} {b.get('avg@1', float('nan')):.3f}" for k, b in s["benchmarks"].items()))
    sft = read_metrics(out / "sft" / "metrics.jsonl") if (out / "sft" / "metrics.jsonl").exists() else []
    for r in sft:
        if "eval/accuracy" in r:
            lines.append("- SFT model, greedy: " + ", ".join(
                f"{k.split('/')[1]} {v:.3f}" for k, v in r.items() if k.count("/") == 2 and k.endswith("/accuracy")))
    for seed in args.seeds:
        for e in ESTIMATORS:
            workdir = out / f"{e}_s{seed}"
            if (workdir / "metrics.jsonl").exists():
                s = run_summary(workdir)
                lines.append(f"- {workdir.name}: {s['steps']} steps; reward {s['reward']}; kept groups "
                             f"{s['kept_group_frac']}; dpo_accuracy {s['dpo_accuracy']}; median s {s['time_s']}; "
                             f"rollout tokens/s {s['rollout_tokens_per_s']}; eval {s['eval']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/smollm2_cpu")
    parser.add_argument("--config", default="configs/smollm2_135m.py")
    parser.add_argument("--steps", type=int, default=30, help="RL steps per run")
    parser.add_argument("--chunk", type=int, default=5, help="RL steps per piece (runs kept level)")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    parser.add_argument("--next", action="store_true", help="do only the next piece of work, then exit")
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        signal.signal(signal.SIGTERM, _on_term)
        try:
            last = None
            for name, cmd in pieces(args, out):
                if name == last:
                    raise SystemExit(f"{name}: made no progress; see {out / 'log.txt'}")
                last = name
                print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
                run(cmd, out / "log.txt")
                if args.next:
                    break
            else:
                print("all done", flush=True)
        except Stopped:
            print("stopped by SIGTERM with the piece's state saved; rerun to continue", flush=True)
    text = report(out, args)
    (out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
