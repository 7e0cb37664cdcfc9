"""A run's problem sets from its config: the training pool, the held-out eval sets and the SFT
demonstrations. Training, the SFT stage and `prime_jax.evaluate` all load them here, so they
agree on the system prompt, the synthetic task and its knobs and the problems held out from training."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from . import chains
from .problems import EURUS2_SYSTEM_PROMPT, DataError, Problem, instruction_suffix
from .readers import read_problems
from .sources import eval_source_names, read_sft_pairs, source_format
from .synthetic_tasks import make_task_problems, task_demonstration

SYNTHETIC = "synthetic"  # the data source name of the synthetic task (prime_jax.config.SYNTHETIC)


def system_prompt(config) -> str | None:
    """data.system_prompt as `apply_system_prompt` takes it (None: keep the rows' own)."""
    return {"keep": None, "none": "", "eurus2": EURUS2_SYSTEM_PROMPT}[config.data.system_prompt]


def task_suffix(config) -> str:
    """data.instruction's text: what follows a math problem in its user message."""
    return instruction_suffix(config.data.instruction)


def load_eval_sets(config, names: Sequence[str] | None = None, limit: int | None = None
                   ) -> tuple[dict[str, list[Problem]], dict[str, bool]]:
    """({name: problems}, {name: whether `limit` cut it}) of the eval sources `names` (default
    data.eval), the first `limit` problems of each (default data.eval_max_problems; 0: all).
    The synthetic set is fixed by data.synthetic.eval_seed; names as `eval_source_names` gives
    them. A source without a usable problem raises DataError."""
    names = [s.strip() for s in config.data.eval.split(",") if s.strip()] if names is None else names
    limit = config.data.eval_max_problems if limit is None else limit
    sets, limited = {}, {}
    for name, source in eval_source_names(names, SYNTHETIC).items():
        if source == SYNTHETIC:
            s = config.data.synthetic
            problems = make_task_problems(s, s.num_eval, s.eval_seed, stream=1, unique=True,
                                          system_prompt=system_prompt(config))
        else:
            problems, stats = read_problems(source, split="test", system_prompt=system_prompt(config),
                                            task_suffix=task_suffix(config), fmt=source_format(config.data.format, source))
            if not problems:
                raise DataError(f"eval source {source!r}: no usable problems ({stats.summary()})")
        limited[name] = bool(limit) and len(problems) > limit
        sets[name] = problems[:limit] if limit else problems
    return sets, limited


def held_out(eval_sets: dict[str, list[Problem]]) -> set[str]:
    """The synthetic eval problems' expressions: excluded from the synthetic training pool and SFT."""
    return {p.meta["expression"] for problems in eval_sets.values() for p in problems if "expression" in p.meta}


def load_train_problems(config, exclude: set[str]) -> list[Problem]:
    """The training pool of data.train (synthetic: seeded by config.seed, `exclude`d expressions left out)."""
    if config.data.train == SYNTHETIC:
        return make_task_problems(config.data.synthetic, config.data.synthetic.num_train, config.seed, stream=0,
                                  exclude=exclude, system_prompt=system_prompt(config))
    problems, stats = read_problems(config.data.train, split=config.data.train_split,
                                    system_prompt=system_prompt(config), task_suffix=task_suffix(config),
                                    fmt=source_format(config.data.format, config.data.train))
    if not problems:
        raise DataError(f"data.train: no usable problems in {config.data.train!r} ({stats.summary()})")
    return problems


def sft_pairs(config, exclude: set[str]) -> list[tuple[list[dict], str]]:
    """(prompt messages, demonstration) pairs for the SFT warm start (bad file rows counted and skipped)."""
    if config.sft.data == SYNTHETIC:
        problems = make_task_problems(config.data.synthetic, config.sft.num_examples, config.seed, stream=2,
                                      exclude=exclude, system_prompt=system_prompt(config))
        if config.sft.flawed_steps:  # chains with systematic slips (validated: the chains task)
            flawed = chains.flawed_step_types(config.sft.flawed_steps, config.sft.flaw_seed)
            rng = np.random.default_rng([config.seed, 77])
            return [(p.messages, chains.flawed_demonstration(p, flawed, config.sft.flaw_prob, rng,
                                                           config.sft.flaw_direction)) for p in problems]
        return [(p.messages, task_demonstration(p)) for p in problems]
    return read_sft_pairs(config.sft.data, config.sft.num_examples)[0]
