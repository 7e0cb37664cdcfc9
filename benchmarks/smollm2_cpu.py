"""Issue 32's real-model run on a CPU, in resumable pieces: SFT of SmolLM2-135M-Instruct, the SFT
and raw models on the held-out sets, then PRIME and outcome-only RLOO from that one SFT reference,
kept at the same step count.

    python benchmarks/smollm2_cpu.py --out=runs/smollm2_cpu                 # everything, to the end (hours)
    python benchmarks/smollm2_cpu.py --out=runs/smollm2_cpu --next          # only the next piece of work
    python benchmarks/smollm2_cpu.py --out=runs/smollm2_cpu --report_only   # the numbers so far
    # a 12-minute slot: 2 PRIME + 2 outcome-only steps (~3 + ~1.9 min each on a 2-core CPU)
    timeout -s TERM -k 150 750 python benchmarks/smollm2_cpu.py --chunk=2 --pieces=2 --start_within=450

Pieces, in order (each one is skipped once done; a SIGTERM stops the one running at its next step
with its state saved, so `timeout -s TERM 900 python benchmarks/smollm2_cpu.py --next` repeated
makes the run continue in 15-minute slots on a shared box):

1. SFT (`main --sft_only`, its state saved every 5 steps) -> OUT/sft/reference;
2. the SFT model: `main --config.total_steps=0` (the in-run held-out eval of the start, the
   token-reward page, and the export OUT/sft/hf_export);
3. the raw model: `prime_jax.evaluate` on the same problems (`--raw_benchmarks`, default the three
   in-run sets) -> OUT/raw/eval;
4. for each seed, PRIME and outcome-only (OUT/<estimator>_s<seed>, benchmarks/ablation.py's
   layout, `--config.sft.reference_dir=OUT/sft/reference --config.eval_at_start=false`), `--chunk`
   steps at a time (`main --stop_after`), the run that is behind first and brought level with the
   other; the last piece of a run finishes it (the end eval and its export).

`--pieces=N` stops after N pieces, `--start_within=S` starts no piece once S seconds have passed,
`--skip=raw` leaves the raw model's eval for later. Every piece is logged in OUT/log.txt with the
load average at its start and end; the pieces share a compilation cache (OUT/jax_cache).

Prints (and writes OUT/report.md) each run's reward, PRM ranking (`prm/dpo_accuracy`), where a step's
time goes (medians, and a table of every step) and the held-out accuracies of the raw, SFT and RL models. Same config for every piece:
configs/smollm2_135m.py unless `--config`.
"""

from __future__ import annotations

import argparse
import json
import os
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
RAW_EVAL = ["--checkpoint=smollm2-135m-instruct", "--tag=greedy32", "--limit=32"]  # the in-run eval's problems:
# the first 32 of each set (data.eval_max_problems), greedy, rollout.eval_max_new_tokens


class Stopped(Exception):
    pass


STOP = {"requested": False}


def _on_term(signum, frame):  # the child got the same signal (timeout signals the process group): let it save
    STOP["requested"] = True


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def run(cmd: list[str], log: Path, env: dict) -> None:
    with open(log, "a") as f:
        f.write(f"\n[{time.strftime('%H:%M:%S')} load {load_average()}] $ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        f.write(f"[{time.strftime('%H:%M:%S')} load {load_average()}] exit {proc.returncode}\n")
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
    if not any((out / "raw" / "eval").rglob("scores.json")) and "raw" not in args.skip:
        yield "raw eval", [sys.executable, "-m", "prime_jax.evaluate", f"--config={args.config}",
                           f"--workdir={out / 'raw'}", *RAW_EVAL, f"--benchmarks={args.raw_benchmarks}"]
    if "rl" in args.skip:
        return
    while True:
        runs = [(steps_done(out / f"{e}_s{s}"), s, i) for s in args.seeds for i, e in enumerate(ESTIMATORS)
                if not finished(out / f"{e}_s{s}", args.steps)]
        if not runs:
            return
        done, seed, index = min(runs)  # the run furthest behind; PRIME first
        estimator = ESTIMATORS[index]
        # up to the leader (a piece stopped early by SIGTERM is caught up), else `chunk` more steps
        leader = max(steps_done(out / f"{e}_s{seed}") for e in ESTIMATORS)
        target = min(args.steps, leader if leader > done else done + args.chunk)
        workdir = out / f"{estimator}_s{seed}"
        yield f"{workdir.name} to step {target}", [
            *main, f"--workdir={workdir}", f"--config.algo.estimator={estimator}", f"--config.seed={seed}",
            f"--config.total_steps={args.steps}", f"--config.sft.reference_dir={out / 'sft' / 'reference'}",
            "--config.eval_at_start=false", *([f"--stop_after={target}"] if target < args.steps else [])]


def report(out: Path, args) -> str:
    lines = [f"### {out}", ""]
    index = out / "raw" / "eval" / "scores.json"  # prime_jax.evaluate's index of every evaluation in the folder
    for tag, s in (json.loads(index.read_text())["evaluations"].items() if index.exists() else []):
        lines.append(f"- raw model ({tag}), greedy: " + ", ".join(
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
    lines += step_table(out, args)
    return "\n".join(lines) + "\n"


STEP_COLUMNS = (("reward", "train/reward", "{:.3f}"), ("kept", "filter/kept_group_frac", "{:.2f}"),
                ("trained", "filter/groups_trained", "{:.0f}"), ("attempts", "filter/attempts", "{:.0f}"),
                ("dpo_acc", "prm/dpo_accuracy", "{:.2f}"), ("len", "response/length_kept_mean", "{:.0f}"),
                ("step s", "time/step_s", "{:.0f}"), ("sample s", "time/sample_s", "{:.0f}"),
                ("grade s", "time/grade_s", "{:.1f}"), ("score s", "time/score_s", "{:.0f}"),
                ("prm s", "time/prm_s", "{:.0f}"), ("policy s", "time/policy_s", "{:.0f}"))


def step_table(out: Path, args) -> list[str]:
    """One row per RL step of every run: reward, filter, PRM ranking and where the step's time went."""
    lines = ["", "| run | step | " + " | ".join(c[0] for c in STEP_COLUMNS) + " |",
             "|---|---|" + "---|" * len(STEP_COLUMNS)]
    for seed in args.seeds:
        for e in ESTIMATORS:
            path = out / f"{e}_s{seed}" / "metrics.jsonl"
            for r in (read_metrics(path) if path.exists() else []):
                if "train/reward" in r:
                    cells = [f.format(r[k]) if isinstance(r.get(k), (int, float)) else "-" for _, k, f in STEP_COLUMNS]
                    lines.append(f"| {e}_s{seed} | {r['step']} | " + " | ".join(cells) + " |")
    return lines if len(lines) > 3 else []


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/smollm2_cpu")
    parser.add_argument("--config", default="configs/smollm2_135m.py")
    parser.add_argument("--steps", type=int, default=30, help="RL steps per run")
    parser.add_argument("--chunk", type=int, default=5,
                        help="RL steps per piece when the runs are level (a run behind is brought level first)")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    parser.add_argument("--next", action="store_true", help="do only the next piece of work, then exit (--pieces=1)")
    parser.add_argument("--pieces", type=int, default=0, help="do at most this many pieces, then exit (0: all)")
    parser.add_argument("--start_within", type=float, default=0.0,
                        help="start no new piece once this many seconds have passed since the start (0: no limit); "
                             "with a time slot of T, T minus the longest piece")
    parser.add_argument("--skip", type=lambda s: set(s.split(",")) - {""}, default=set(),
                        help="pieces to leave for a later invocation: raw (the raw model's eval), rl")
    parser.add_argument("--raw_benchmarks", default="heldout,synthetic,gsm8k",
                        help="the sets the raw model is evaluated on (the SFT model's in-run eval: data.eval)")
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args(argv)
    if args.next:
        args.pieces = 1
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    # Every piece is a new process: the persistent compilation cache spares each one the compiles of the last
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.environ.get("JAX_COMPILATION_CACHE_DIR", str(out / "jax_cache")))
    if not args.report_only:
        signal.signal(signal.SIGTERM, _on_term)
        t0, done, last = time.monotonic(), 0, None
        try:
            for name, cmd in pieces(args, out):
                if name == last:
                    raise SystemExit(f"{name}: made no progress; see {out / 'log.txt'}")
                if args.start_within and done and time.monotonic() - t0 > args.start_within:
                    print(f"[{time.strftime('%H:%M:%S')}] {args.start_within:.0f} s passed: not starting {name}",
                          flush=True)
                    break
                last = name
                print(f"[{time.strftime('%H:%M:%S')} load {load_average()}] {name}", flush=True)
                run(cmd, out / "log.txt", env)
                done += 1
                if args.pieces and done >= args.pieces:
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
