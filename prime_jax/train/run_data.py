"""What a run reads before it trains: its tokenizer, its eval sets and the training prompts (read
once, before any training, so bad data fails at the start)."""

from __future__ import annotations

import dataclasses
from typing import Any

from prime_jax.data import Problem, held_out, load_eval_sets, load_train_problems
from prime_jax.train.builder import RunBuilder, RunLayout
from prime_jax.train.rollouts import PromptSource


@dataclasses.dataclass
class RunData:
    """What a run reads before it trains: the tokenizer, the eval sets, the training prompts."""

    tokenizer: Any
    eval_sets: dict[str, list[Problem]]
    prompts: PromptSource

    @classmethod
    def load(cls, builder: RunBuilder, layout: RunLayout, is_main: bool) -> "RunData":
        """Raises DataError for unusable data (no usable row, no prompt that fits)."""
        c = builder.config
        tokenizer = builder.tokenizer(layout, is_main)
        eval_sets, _ = load_eval_sets(c)
        exclude = held_out(eval_sets)  # the synthetic eval problems' expressions, which generation skips
        prompts = PromptSource(load_train_problems(c, exclude), tokenizer, c.data.max_prompt_tokens, c.seed)
        return cls(tokenizer, eval_sets, prompts)
