"""A run's problem sets from its config: the training pool, the held-out eval sets and the SFT
demonstrations. Training, the SFT stage and `prime_jax.evaluate` all load them here, so they
agree on the system prompt, the synthetic task and its knobs and the problems held out from training."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from . import chains
from .formats import worked_solution
from .problems import EURUS2_SYSTEM_PROMPT, DataError, Problem, SkipStats, instruction_suffix
from .readers import read_problems
from .sources import eval_source_names, is_messages_file, read_sft_pairs, source_format
from .synthetic_tasks import make_task_problems, task_demonstration

SYNTHETIC = "synthetic"  # the data source name of the synthetic task
HELDOUT = "heldout"  # the eval source of data.holdout's problems


def system_prompt(config) -> str | None:
    """data.system_prompt as `apply_system_prompt` takes it (None: keep the rows' own)."""
    return {"keep": None, "none": "", "eurus2": EURUS2_SYSTEM_PROMPT}[config.data.system_prompt]


def task_suffix(config) -> str:
    """data.instruction's text: what follows a math problem in its user message."""
    return instruction_suffix(config.data.instruction)


def source_list(sources: str) -> list[str]:
    """A comma list of data sources (data.train, data.eval, sft.data) as a list."""
    return [s.strip() for s in sources.split(",") if s.strip()]


def _synthetic_problems(config, n: int, seed: int, stream: int, **kwargs) -> list[Problem]:
    return make_task_problems(config.data.synthetic, n, seed, stream=stream, system_prompt=system_prompt(config),
                              task_suffix=task_suffix(config), **kwargs)


def _read(config, source: str, split: str, what: str) -> list[Problem]:
    """The problems of one data source (a file, folder, packaged benchmark or HF dataset); none
    usable raises DataError starting with `what` (the config field)."""
    problems, stats = read_problems(source, split=split, system_prompt=system_prompt(config),
                                    task_suffix=task_suffix(config), fmt=source_format(config.data.format, source))
    if not problems:
        raise DataError(f"{what}: no usable problems in {source!r} ({stats.summary()})")
    return problems


def _holdout_split(config, source: str) -> tuple[list[Problem], list[Problem]]:
    """(training part, held-out part) of a data.train source: its last data.holdout problems are held out."""
    problems = _read(config, source, config.data.train_split, "data.train")
    k = config.data.holdout
    if k and k >= len(problems):
        raise DataError(f"data.holdout: {k} held-out problems leave none of the {len(problems)} of {source!r} to train on")
    return (problems[:-k], problems[-k:]) if k else (problems, [])


def holdout_problems(config) -> list[Problem]:
    """The last data.holdout problems of every non-synthetic data.train source (never trained or
    SFT'd on; the eval source "heldout")."""
    return [p for source in source_list(config.data.train) if source != SYNTHETIC
            for p in _holdout_split(config, source)[1]]


def load_eval_sets(config, names: Sequence[str] | None = None, limit: int | None = None
                   ) -> tuple[dict[str, list[Problem]], dict[str, bool]]:
    """({name: problems}, {name: whether `limit` cut it}) of the eval sources `names` (default
    data.eval), the first `limit` problems of each (default data.eval_max_problems; 0: all).
    The synthetic set is fixed by data.synthetic.eval_seed, "heldout" is data.holdout's problems;
    names as `eval_source_names` gives them. A source without a usable problem raises DataError."""
    names = source_list(config.data.eval) if names is None else names
    limit = config.data.eval_max_problems if limit is None else limit
    sets, limited = {}, {}
    for name, source in eval_source_names(names, (SYNTHETIC, HELDOUT)).items():
        if source == SYNTHETIC:
            s = config.data.synthetic
            problems = _synthetic_problems(config, s.num_eval, s.eval_seed, 1, unique=True)
        elif source == HELDOUT:
            problems = holdout_problems(config)
            if not problems:
                raise DataError("eval source 'heldout': data.holdout is 0 or data.train has no file source to hold "
                                "problems out of")
        else:
            problems = _read(config, source, "test", "data.eval")
        limited[name] = bool(limit) and len(problems) > limit
        sets[name] = problems[:limit] if limit else problems
    return sets, limited


def held_out(eval_sets: dict[str, list[Problem]]) -> set[str]:
    """What training and SFT must not see: the eval problems' user messages, and the synthetic ones'
    expressions (which their generators skip)."""
    keys = set()
    for problems in eval_sets.values():
        for p in problems:
            keys.add(p.user_content)
            if "expression" in p.meta:
                keys.add(p.meta["expression"])
    return keys


def load_train_problems(config, exclude: set[str]) -> list[Problem]:
    """The training pool of data.train, its sources one after another: synthetic ones seeded by
    config.seed (`exclude`d expressions left out), the others without their held-out part (data.holdout)."""
    pool = []
    for source in source_list(config.data.train):
        if source == SYNTHETIC:
            pool += _synthetic_problems(config, config.data.synthetic.num_train, config.seed, 0, exclude=exclude)
        else:
            pool += _holdout_split(config, source)[0]
    return pool


def sft_pairs(config, exclude: set[str]) -> list[tuple[list[dict], str]]:
    """(prompt messages, demonstration) pairs for the SFT warm start, up to sft.num_examples from each
    sft.data source: "synthetic" (the task's demonstrations), a JSONL of chat messages, or problems
    with worked solutions (GSM8K, MATH: a packaged benchmark or a file), rewritten to end with
    `\\boxed{}` and left out when `exclude` (held_out of the eval sets) or data.holdout holds them.
    Bad rows and problems without a usable solution are counted and skipped."""
    pairs = []
    for source in source_list(config.sft.data):
        if source == SYNTHETIC:
            pairs += _synthetic_pairs(config, exclude)
        elif is_messages_file(source):
            pairs += read_sft_pairs(source, config.sft.num_examples)[0]
        else:
            pairs += _solution_pairs(config, source, exclude | {p.user_content for p in holdout_problems(config)})
    return pairs


def _synthetic_pairs(config, exclude: set[str]) -> list[tuple[list[dict], str]]:
    problems = _synthetic_problems(config, config.sft.num_examples, config.seed, 2, exclude=exclude)
    if config.sft.flawed_steps:  # chains with systematic slips (validated: the chains task)
        flawed = chains.flawed_step_types(config.sft.flawed_steps, config.sft.flaw_seed)
        rng = np.random.default_rng([config.seed, 77])
        return [(p.messages, chains.flawed_demonstration(p, flawed, config.sft.flaw_prob, rng,
                                                       config.sft.flaw_direction)) for p in problems]
    return [(p.messages, task_demonstration(p)) for p in problems]


def _solution_pairs(config, source: str, exclude: set[str]) -> list[tuple[list[dict], str]]:
    problems = _read(config, source, config.data.train_split, "sft.data")
    stats = SkipStats(source=f"sft.data {source}")
    pairs = []
    for p in problems:
        if len(pairs) >= config.sft.num_examples:
            break
        demonstration = worked_solution(p)
        if p.user_content in exclude:
            stats.skip("held_out")
        elif demonstration is None:
            stats.skip("no_worked_solution", p.id)
        else:
            pairs.append((p.messages, demonstration))
            stats.keep()
    stats.log()
    if not pairs:
        raise DataError(f"sft.data {source!r}: no problem with a usable worked solution ({stats.summary()})")
    return pairs
