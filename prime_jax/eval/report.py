"""Benchmark evaluation output: the per-benchmark headline, averages, ``scores.md`` beside the
published PRIME results, ``scores.json`` and ``<benchmark>.jsonl`` (used by `prime_jax.evaluate`;
the metrics themselves are `prime_jax.eval.results`'). Host-side only (no jax)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from prime_jax.eval.results import BenchmarkResult, EvalSettings, k_values

#: Published greedy pass@1 (%) from PRIME_SPEC.md (Cui et al., 2025), by model and benchmark.
PUBLISHED: dict[str, dict[str, float]] = {
    "Eurus-2-7B-SFT (start, step 0)": {"aime24": 3.3, "amc23": 30.1, "math500": 66.2, "minerva_math": 32.7,
                                       "olympiadbench": 29.8, "leetcode": 21.7, "livecodebench": 17.8},
    "RLOO, outcome verifier only, 240 steps": {"aime24": 20.0, "amc23": 47.0, "math500": 73.2,
                                               "minerva_math": 36.4, "olympiadbench": 35.4, "leetcode": 28.3,
                                               "livecodebench": 26.7},
    "PRIME, 240 steps": {"aime24": 20.0, "amc23": 50.6, "math500": 78.2, "minerva_math": 39.3,
                         "olympiadbench": 40.3, "leetcode": 31.1, "livecodebench": 27.5},
    "Eurus-2-7B-PRIME, 592 steps": {"aime24": 26.7, "amc23": 57.8, "math500": 79.2, "minerva_math": 38.6,
                                    "olympiadbench": 42.1, "leetcode": 33.3, "livecodebench": 28.6},
    "Qwen2.5-Math-7B-Instruct": {"aime24": 13.3, "amc23": 50.6, "math500": 79.8, "minerva_math": 34.6,
                                 "olympiadbench": 40.7, "leetcode": 11.7, "livecodebench": 11.3},
}
#: Column titles of the published table, in its order.
PUBLISHED_COLUMNS: dict[str, str] = {
    "aime24": "AIME24", "amc23": "AMC", "math500": "MATH-500", "minerva_math": "Minerva",
    "olympiadbench": "OlympiadBench", "leetcode": "LeetCode", "livecodebench": "LiveCodeBench",
}
#: PRIME's five math benchmarks (the "math average" of the paper's README).
MATH_FIVE = ("aime24", "amc23", "math500", "minerva_math", "olympiadbench")


# ----------------------------------------------------------------------------------------------
# Output files
# ----------------------------------------------------------------------------------------------
def headline_metric(n: int) -> str:
    return "pass@1" if n == 1 else f"avg@{n}"


def all_dropped(metrics: Mapping[str, Any]) -> bool:
    """Every problem was dropped (prompt too long): there is no score, only a count."""
    return bool(metrics.get("num_problems")) and metrics.get("num_dropped") == metrics["num_problems"]


def headline(name: str, metrics: Mapping[str, Any], settings: EvalSettings, *, max_prompt_tokens: int) -> str:
    """The one line the CLI prints for a benchmark."""
    if all_dropped(metrics):
        return (f"{name}: all {metrics['num_problems']} problems dropped (prompts longer than "
                f"data.max_prompt_tokens={max_prompt_tokens}); no score")
    metric = headline_metric(settings.n)
    dropped = f", {metrics['num_dropped']} dropped as wrong" if metrics.get("num_dropped") else ""
    return (f"{name}: {metric} {100 * metrics[metric]:.1f}% ({metrics['num_problems']} problems{dropped}, "
            f"{metrics['time_total_s']:.1f}s)")


def summarize(results: Mapping[str, BenchmarkResult]) -> dict[str, Any]:
    """Averages over benchmarks of every metric all of them report, and PRIME's five-benchmark
    math average of pass@1 (%) when all five are present."""
    out: dict[str, Any] = {}
    if not results:
        return out
    metric_sets = [set(r.metrics) for r in results.values()]
    common = set.intersection(*metric_sets)
    skip = {"num_problems", "num_dropped", "n"}
    for k in sorted(common - skip):
        v = next(iter(results.values())).metrics[k]
        if not k.startswith("time_") and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(np.mean([r.metrics[k] for r in results.values()]))
    if all(b in results for b in MATH_FIVE):
        out["math5_pass@1_percent"] = float(np.mean([100 * results[b].metrics["pass@1"] for b in MATH_FIVE]))
    return out


def _fmt(x: Any, percent: bool = True) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if x != x:  # NaN: a metric this benchmark has not (maj@k, prm_vote@n of code problems)
        return "-"
    return f"{100 * x:.1f}" if percent else f"{x:.1f}"


def metrics_table(results: Mapping[str, BenchmarkResult], settings: EvalSettings, *, prm: bool = False) -> list[str]:
    """Our metrics per benchmark as markdown table lines (scores in %): pass@k, and with n > 1
    avg@n, maj@k (and best@n, prm_vote@n with a PRM); what `evaluate` prints and scores.md holds."""
    n = settings.n
    ks = k_values(n)
    cols = [f"pass@{k}" for k in ks]
    if n > 1:
        cols += [f"avg@{n}"] + [f"maj@{k}" for k in ks if k >= 2]
        if prm:
            cols += [f"best@{n}", f"prm_vote@{n}"]
    lines = []
    header = ["benchmark", "problems", *cols, "mean length", "truncated %", "no answer %"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for name, r in results.items():
        m = r.metrics
        problems = f"{m['num_problems']}" + (f" ({m['num_dropped']} dropped)" if m.get("num_dropped") else "")
        scores = (["all dropped"] * len(cols) if all_dropped(m) else [_fmt(m.get(c, float("nan"))) for c in cols])
        row = [name, problems, *scores,
               _fmt(m["response_length"], percent=False), _fmt(m["truncated_frac"]), _fmt(m["no_answer_frac"])]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def decoding_text(settings: EvalSettings) -> str:
    decoding = "greedy" if settings.temperature == 0 else (
        f"temperature {settings.temperature}, top_p {settings.top_p}, top_k {settings.top_k}")
    return f"{decoding}; n = {settings.n} sample(s) per problem; max {settings.max_new_tokens} new tokens"


def scores_markdown(results: Mapping[str, BenchmarkResult], settings: EvalSettings, *, title: str = "",
                    info: Mapping[str, Any] | None = None, prm: bool = False) -> str:
    """The scores as markdown: our metrics per benchmark, then the published table for comparison."""
    n = settings.n
    lines = [f"# {title or 'Evaluation'}", ""]
    lines.append(f"Decoding: {decoding_text(settings)}.")
    for k, v in (info or {}).items():
        lines.append(f"{k}: {v}")
    lines += ["", "Scores in %. Dropped problems (prompt too long) count as wrong.", ""]
    lines += metrics_table(results, settings, prm=prm)

    compare = [b for b in PUBLISHED_COLUMNS if b in results]
    if compare:
        metric = headline_metric(n)
        lines += ["", f"## Published results (greedy pass@1, %; PRIME_SPEC.md) beside this run ({metric})", ""]
        head = ["model", *[PUBLISHED_COLUMNS[b] for b in compare]]
        five = all(b in results for b in MATH_FIVE)
        if five:
            head.append("math avg (5)")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        ours = ["all dropped" if all_dropped(results[b].metrics) else _fmt(results[b].metrics[metric]) for b in compare]
        if five:
            ours.append(f"{np.mean([100 * results[b].metrics[metric] for b in MATH_FIVE]):.1f}")
        lines.append("| **this run** | " + " | ".join(ours) + " |")
        for model, scores in PUBLISHED.items():
            row = [f"{scores[b]:.1f}" for b in compare]
            if five:
                row.append(f"{np.mean([scores[b] for b in MATH_FIVE]):.1f}")
            lines.append(f"| {model} | " + " | ".join(row) + " |")
        limited = [b for b in compare if results[b].metrics.get("limited")]
        if limited:
            lines += ["", f"Note: only a subset of problems was evaluated for {', '.join(limited)} (--limit); "
                          "not comparable with the published numbers."]
    return "\n".join(lines) + "\n"


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def write_results(out_dir: str | os.PathLike, results: Mapping[str, BenchmarkResult], settings: EvalSettings, *,
                  info: Mapping[str, Any] | None = None, title: str = "", prm: bool = False) -> dict[str, Path]:
    """Writes ``<benchmark>.jsonl`` (one record per sample), ``scores.json`` and ``scores.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, r in results.items():
        if not r.records:  # a benchmark of an earlier evaluation (its metrics only): its file stays
            continue
        path = out / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in r.records:
                f.write(json.dumps(rec, ensure_ascii=False, default=_json_default) + "\n")
        os.replace(tmp, path)
        paths[name] = path
    scores = {
        "settings": settings.as_dict(),
        "info": dict(info or {}),
        "benchmarks": {name: r.metrics for name, r in results.items()},
        "average": summarize(results),
        "published": {m: {b: v for b, v in s.items() if b in results} for m, s in PUBLISHED.items()},
    }
    paths["scores.json"] = out / "scores.json"
    paths["scores.json"].write_text(json.dumps(scores, indent=2, default=_json_default) + "\n")
    paths["scores.md"] = out / "scores.md"
    paths["scores.md"].write_text(scores_markdown(results, settings, title=title, info=info, prm=prm))
    return paths


# ----------------------------------------------------------------------------------------------
# One folder per evaluation, and the workdir's index of them
# ----------------------------------------------------------------------------------------------
IDENTITY_FILE = "evaluation.json"  # what an evaluation folder holds: checkpoint, settings, data, PRM


def evaluation_name(checkpoint: str, settings: EvalSettings, *, prm: bool = False) -> str:
    """A folder name that says what was evaluated and how: ``<checkpoint>_<decoding>``, e.g.
    ``step300_greedy``, ``step300_n4_t1``, ``Eurus-2-7B-PRIME_n8_t1_p0.95_prm``."""
    s = settings
    decoding = "greedy" if s.temperature == 0 else f"t{s.temperature:g}"
    decoding += "".join(part for part, on in ((f"_p{s.top_p:g}", s.top_p < 1), (f"_k{s.top_k}", s.top_k > 0)) if on)
    name = f"{checkpoint}_{'' if s.n == 1 else f'n{s.n}_'}{decoding}{'_prm' if prm else ''}"
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", name).strip("-") or "eval"


def evaluation_folder(root: str | os.PathLike, name: str, identity: Mapping[str, Any], *, exact: bool = False) -> Path:
    """The folder under `root` for an evaluation: `name`, or `name-2`, `name-3`, ... when a folder of
    that name holds an evaluation of other settings (its IDENTITY_FILE differs), so results of
    different settings never overwrite each other; a rerun of the same evaluation gets its own
    folder back (and resumes there). exact: `name` itself whatever it holds (--tag)."""
    root = Path(root)
    want = json.loads(json.dumps(identity, default=str))
    for k in range(1, 1000):
        folder = root / (name if k == 1 else f"{name}-{k}")
        if exact or not (folder / IDENTITY_FILE).exists():
            return folder
        try:
            if json.loads((folder / IDENTITY_FILE).read_text()) == want:
                return folder
        except ValueError:
            return folder  # unreadable: an evaluation interrupted while starting
    raise RuntimeError(f"{root}: too many evaluations named {name}")


def write_identity(folder: Path, identity: Mapping[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / IDENTITY_FILE).write_text(json.dumps(identity, indent=2, default=str) + "\n")


def earlier_results(folder: Path, identity: Mapping[str, Any]) -> dict[str, BenchmarkResult]:
    """The benchmarks an earlier evaluation with the same identity wrote to `folder` (their metrics),
    so a later one on other benchmarks adds to its table instead of replacing it; {} otherwise."""
    try:
        same = json.loads((folder / IDENTITY_FILE).read_text()) == json.loads(json.dumps(identity, default=str))
        saved = json.loads((folder / "scores.json").read_text())["benchmarks"] if same else {}
    except (OSError, ValueError, KeyError):
        return {}
    return {name: BenchmarkResult(name=name, metrics=m, records=[]) for name, m in saved.items()}


def _keep_a_single_evaluation(root: Path) -> None:
    """A workdir evaluated before evaluations had folders holds its results in eval/ itself: they
    move to eval/earlier/ (listed in the index like the others) instead of being overwritten."""
    try:
        legacy = "evaluations" not in json.loads((root / "scores.json").read_text())
    except (OSError, ValueError):
        return
    if legacy:
        (root / "earlier").mkdir(exist_ok=True)
        for f in [root / "scores.json", root / "scores.md", *root.glob("*.jsonl")]:
            if f.is_file():
                os.replace(f, root / "earlier" / f.name)


def write_index(root: str | os.PathLike) -> Path:
    """``root/scores.md`` and ``scores.json``: every evaluation folder under `root` side by side (one
    row per evaluation and benchmark: what was evaluated, how, and its headline scores)."""
    root = Path(root)
    _keep_a_single_evaluation(root)
    rows, entries = [], {}
    for folder in sorted(p for p in root.iterdir() if (p / "scores.json").is_file()):
        try:
            scores = json.loads((folder / "scores.json").read_text())
        except ValueError:
            continue
        settings = scores.get("settings", {})
        n = settings.get("n", 1)
        metric = headline_metric(n)
        entries[folder.name] = {"checkpoint": scores.get("info", {}).get("checkpoint"), "settings": settings,
                                "benchmarks": scores.get("benchmarks", {}), "average": scores.get("average", {})}
        decoding = ("greedy" if not settings.get("temperature") else f"T={settings.get('temperature')}") + f", n={n}"
        decoding += f", {settings.get('max_new_tokens')} tokens"
        prompts = f"{scores.get('info', {}).get('instruction', '?')}, <= {settings.get('max_prompt_tokens')} tokens"
        for bench, m in scores.get("benchmarks", {}).items():
            score = "all dropped" if all_dropped(m) else f"{metric} {_fmt(m.get(metric, float('nan')))}"
            extra = ", ".join(f"{k} {_fmt(m[k])}" for k in (f"pass@{n}", f"maj@{n}", f"best@{n}") if n > 1 and k in m)
            rows.append(f"| [{folder.name}]({folder.name}/scores.md) | {entries[folder.name]['checkpoint']} | "
                        f"{decoding} | {prompts} | {bench} | {m.get('num_problems')} | {score} | {extra} |")
    lines = ["# Evaluations in this folder", "",
             "One row per evaluation and benchmark; each folder's scores.md (and evaluation.json) has every metric "
             "and setting. Scores in %; prompts: data.instruction and data.max_prompt_tokens.", "",
             "| evaluation | checkpoint | decoding | prompts | benchmark | problems | score | more |",
             "|---|---|---|---|---|---|---|---|", *rows]
    (root / "scores.md").write_text("\n".join(lines) + "\n")
    (root / "scores.json").write_text(json.dumps({"evaluations": entries}, indent=2, default=_json_default) + "\n")
    return root / "scores.md"
