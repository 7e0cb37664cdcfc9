"""One evaluation (`prime_jax.evaluate`'s body): load the checkpoint and tokenizer, sample and grade
every benchmark (resumably), and write WORKDIR/eval/<name>/ and the workdir's index (see the
`prime_jax.evaluate` docstring for the files)."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

import jax

from prime_jax import cli
from prime_jax.data import load_eval_sets, render_prompts, task_suffix
from prime_jax.eval import lib as eval_lib
from prime_jax.eval import report as eval_report
from prime_jax.eval.checkpoints import (CheckpointSpec, load_model, load_reference, resolve_checkpoint,
                                        resolve_tokenizer_path, run_builder, run_config)
from prime_jax.eval.prm_scorer import PRMScorer
from prime_jax.eval.progress import ProgressFile
from prime_jax.eval.results import BenchmarkResult, settings_from_config
from prime_jax.models.tokenizer import eos_token_ids, load_tokenizer
from prime_jax.parallel import is_logging_process, mesh_from_config
from prime_jax.rewards import RewardPool
from prime_jax.train.builder import RunLayout

logger = logging.getLogger("prime_jax.evaluate")


def _prm_scorer(prm: str, reference: str, config, mesh, settings, *, vocab_size: int):
    """(PRMScorer, info) of --prm / --reference for best-of-n, or (None, {}) without --prm."""
    if not prm:
        return None, {}
    if settings.n < 2:
        raise ValueError("--prm (best-of-n) needs --n >= 2")
    prm_spec = resolve_checkpoint(prm)
    if prm_spec.kind == "hf" and Path(prm_spec.path).name == "hf_export":
        raise ValueError(f"--prm={prm}: {prm_spec.path} is the exported policy, not a PRM (pass a workdir "
                         "with checkpoints/, or an HF PRM folder)")
    prm_model = load_model(prm_spec, config, mesh, vocab_size=vocab_size, which="prm")
    ref_model = load_reference(resolve_checkpoint(reference), prm_spec, config, mesh, vocab_size=vocab_size)
    # raw logits, as the trainer scores the PRM and its reference (PRIME_SPEC: no temperature)
    # the β the PRM was trained with (its run's config), for its P(correct) = sigmoid(β Σq) in prm_vote@n
    beta = float(run_config(prm_spec.run_dir).get("algo", {}).get("beta", config.algo.beta)
                 if prm_spec.kind == "run" else config.algo.beta)
    scorer = PRMScorer(prm_model, ref_model, mesh=mesh, chunk_size=config.model.logprob_chunk,
                                batch_size=max(1, min(config.batch.score_batch, 256)), beta=beta)
    return scorer, {"prm": prm_spec.describe(), "reference": reference or "(default)",
                    "prm_logprobs": "raw logits (temperature 1)", "prm_beta": beta}


def evaluate(config, workdir: str | Path, *, checkpoint: str = "", benchmarks: str | Sequence[str] = "",
             limit: int | None = None, n: int = 1, temperature: float | None = None, top_p: float | None = None,
             max_new_tokens: int | None = None, batch_size: int | None = None, seed: int | None = None,
             tokenizer_path: str = "", prm: str = "", reference: str = "", tag: str = "", mesh=None) -> dict:
    """Runs the evaluation (see `prime_jax.evaluate`'s docstring); returns the scores.json content."""
    t0 = time.perf_counter()
    workdir = Path(workdir)
    eval_root = workdir / "eval"
    if is_logging_process():  # before hours of work, not after
        cli.ensure_writable(eval_root, "evaluation output folder")
    mesh = mesh if mesh is not None else mesh_from_config(config)
    settings = settings_from_config(config, n=n, temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    if isinstance(benchmarks, str):
        benchmarks = [b.strip() for b in (benchmarks or config.data.eval).split(",") if b.strip()]
    if not benchmarks:
        raise ValueError("no benchmarks: pass --benchmarks or set config.data.eval")
    limit = config.data.eval_max_problems if limit is None else limit
    problem_sets, limited = load_eval_sets(config, benchmarks, limit)
    if set(benchmarks) != {"synthetic"}:
        _say_instruction(config)

    layout = RunLayout(workdir)
    if not checkpoint and (layout.checkpoint_steps() or (layout.hf_export / "config.json").exists()):
        checkpoint = str(workdir)  # the workdir is a training run: evaluate its latest policy
    spec = resolve_checkpoint(checkpoint)
    identity = _identity(config, spec, settings, limit, prm, reference)
    name = tag or eval_report.evaluation_name(_checkpoint_tag(spec, config), settings, prm=bool(prm))
    out_dir = eval_report.evaluation_folder(eval_root, name, identity, exact=bool(tag))
    tok_path = resolve_tokenizer_path(config, spec, workdir, tokenizer_path)
    tokenizer, model = _load_policy(config, spec, tok_path, mesh)
    logger.info("model %s, tokenizer %s, mesh %s, %s", spec.describe(), tok_path, dict(mesh.shape), settings)
    prm_scorer, prm_info = _prm_scorer(prm, reference, config, mesh, settings, vocab_size=len(tokenizer))

    earlier = eval_report.earlier_results(out_dir, identity)
    if is_logging_process():
        eval_report.write_identity(out_dir, identity)
    header = {"settings": settings.as_dict(), "checkpoint": spec.describe(), "prm": prm_info}
    results, progress = _run_benchmarks(config, problem_sets, limited, settings, model, tokenizer, mesh,
                                        prm_scorer, out_dir, header)
    info = {"config": config.name, "checkpoint": spec.describe(), "tokenizer": tok_path,
            "benchmarks": ",".join(results), "limit": limit or "all", "devices": f"{jax.device_count()} x "
            f"{jax.devices()[0].device_kind}", "model dtype": f"{config.model.dtype} (params {config.model.param_dtype})",
            "system prompt": config.data.system_prompt, "instruction": config.data.instruction, **prm_info,
            "wall time (s)": round(time.perf_counter() - t0, 1)}
    if all(eval_report.all_dropped(r.metrics) for r in results.values()):  # no score to write: say why
        if is_logging_process() and not earlier:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise ValueError(f"nothing was scored: {_dropped_reason(config, problem_sets, tokenizer)}")
    table = {**earlier, **results}  # benchmarks evaluated earlier with the same settings stay in the table
    scores = {"settings": settings.as_dict(), "info": info, "output": str(out_dir),
              "benchmarks": {k: r.metrics for k, r in table.items()}, "average": eval_report.summarize(table)}
    if is_logging_process():
        _write(config, workdir, out_dir, table, settings, info, prm=prm_scorer is not None, title=spec.describe())
        for done in progress.values():
            done.remove()
    return scores


def _load_policy(config, spec: CheckpointSpec, tok_path: str, mesh):
    """(tokenizer, model) of the evaluated checkpoint; a model smaller than its tokenizer is refused."""
    tokenizer = load_tokenizer(tok_path)
    model = load_model(spec, config, mesh, vocab_size=len(tokenizer))
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"the model's vocab_size {model.config.vocab_size} is smaller than the tokenizer's "
                         f"{len(tokenizer)} tokens ({tok_path})")
    return tokenizer, model


def _run_benchmarks(config, problem_sets: dict, limited: dict, settings, model, tokenizer, mesh, prm_scorer,
                    out_dir: Path, header: dict) -> tuple[dict[str, BenchmarkResult], dict[str, ProgressFile]]:
    """Samples, grades and scores every benchmark, each chunk kept in out_dir/progress/ as it is
    graded (process 0); prints each benchmark's headline. Ctrl-C raises `Interrupted`."""
    sampler = run_builder(config, mesh).sampler()  # the trainer's sampler, as its held-out eval uses
    stop_ids = eos_token_ids(tokenizer)
    key = jax.random.PRNGKey(settings.seed)
    results: dict[str, BenchmarkResult] = {}
    progress: dict[str, ProgressFile] = {}
    try:
        with RewardPool(config.reward.workers, math_timeout=config.reward.timeout_s,
                        code_timeout=config.reward.timeout_s) as pool:
            for name, problems in problem_sets.items():
                generate = eval_lib.sampler_generate_fn(sampler, model, tokenizer, settings, stop_token_ids=stop_ids,
                                                        key=eval_lib.benchmark_key(key, name))
                progress[name] = ProgressFile(out_dir / "progress" / f"{name}.jsonl", {
                    "benchmark": name, **header, "problems": [p.id for p in problems]}) if is_logging_process() else None
                result = eval_lib.evaluate_benchmark(name, problems, tokenizer=tokenizer, pool=pool, settings=settings,
                                                     generate=generate, prm_scorer=prm_scorer,
                                                     progress=progress.get(name))
                result.metrics["limited"] = limited[name]
                results[name] = result
                print(eval_report.headline(name, result.metrics, settings,
                                           max_prompt_tokens=config.data.max_prompt_tokens), flush=True)
    except KeyboardInterrupt:
        raise Interrupted(f"the graded chunks are kept in {out_dir / 'progress'}: rerun the same command to resume "
                          "from them") from None
    return results, progress


def _write(config, workdir: Path, out_dir: Path, table: dict, settings, info: dict, *, prm: bool, title: str) -> None:
    """The evaluation's files, the workdir's index, and the table on the console (process 0)."""
    eval_root = workdir / "eval"
    paths = eval_report.write_results(out_dir, table, settings, info=info, prm=prm, title=f"{config.name}: {title}")
    eval_report.write_index(eval_root)
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    print("\n".join(["", f"{out_dir.name} ({eval_report.decoding_text(settings)}; scores in %):",
                     *eval_report.metrics_table(table, settings, prm=prm), "",
                     f"wrote {out_dir}/scores.md, scores.json and <benchmark>.jsonl; every evaluation of "
                     f"{workdir}: {eval_root / 'scores.md'}"]), flush=True)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during an evaluation; `str(error)` says what is kept and how to resume."""


def _say_instruction(config) -> None:
    """The line that says what follows each math problem of a benchmark-format file."""
    text = task_suffix(config).strip()
    shown = text.replace("\n", "\\n")
    said = f'adds "{shown}" after each math problem' if text else "adds nothing after the problems"
    print(f"data.instruction={config.data.instruction}: {said} (benchmark-format rows; veRL rows keep their own "
          "prompt); --config.data.instruction=none | eurus2 | step_by_step | 'your own sentence' changes it",
          flush=True)


def _dropped_reason(config, problem_sets, tokenizer) -> str:
    """Why every problem was dropped: how long the prompts are against data.max_prompt_tokens."""
    lengths = [len(ids) for problems in problem_sets.values() for ids in render_prompts(problems, tokenizer, None)[0]]
    limit = config.data.max_prompt_tokens
    span = f"{min(lengths)}-{max(lengths)}" if lengths and min(lengths) != max(lengths) else str(max(lengths, default=0))
    return (f"every prompt ({sum(map(len, problem_sets.values()))} problems) is longer than data.max_prompt_tokens="
            f"{limit} (they are {span} tokens); raise it, e.g. --config.data.max_prompt_tokens={max(lengths, default=0)}")


def _checkpoint_tag(spec: CheckpointSpec, config) -> str:
    """The checkpoint's part of an evaluation's folder name: step<k> for a run checkpoint, the
    folder's name for an HF one, the model path's last part for the config's model."""
    if spec.kind == "run":
        return f"step{spec.step}"
    if spec.kind == "sft":
        return "sft"
    if spec.kind == "hf":
        return Path(spec.path).name
    return Path(config.model.path).name or "model"


def _identity(config, spec: CheckpointSpec, settings, limit, prm: str, reference: str) -> dict:
    """What makes two evaluations the same one (eval_report.evaluation_folder): checkpoint,
    decoding settings, the prompts' construction, the problems' limit, the PRM."""
    local = lambda p: str(Path(p).expanduser().resolve()) if p and Path(p).expanduser().exists() else p  # noqa: E731
    what = {"kind": spec.kind, "path": local(spec.path), "step": spec.step}
    if spec.kind == "config":
        what["path"] = local(config.model.path)
    return {"checkpoint": what, "settings": settings.as_dict(), "limit": limit or 0,
            "data": {k: config.data[k] for k in ("instruction", "system_prompt", "format")},
            "prm": {"prm": local(prm), "reference": local(reference)} if prm else None}
