"""`Rollouts`: what the sampler hands to the rewards and the trainer (host numpy arrays)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Rollouts:
    """B = num_prompts × n sampled responses, grouped by prompt.

    Rows `[i*n, (i+1)*n)` are prompt i's n samples (keep them together when slicing micro-batches:
    the leave-one-out baseline needs whole groups).

    tokens `[B, R]` int32: response tokens, pad id after the end (R = max_new_tokens).
    response_mask `[B, R]` int32: 1 up to and including the stop token (or R when truncated).
    logprobs `[B, R]` float32: log-prob of each sampled token under `softmax(logits / temperature)`
        over the full vocabulary, WITHOUT top-k/top-p renormalisation (temperature 1 for greedy);
        this is what `models.response_logprobs(..., temperature=temperature)` returns for the same
        tokens, so the PPO ratio starts at 1. 0 at masked positions.
    lengths `[B]` int32: number of response tokens (= response_mask.sum(1)).
    finished `[B]` bool: the row ended with a stop token; False = truncated at R tokens.
    prompt_tokens `[B, P]` int32 left-padded prompts (P = the prompt length bucket), repeated n
        times; prompt_mask `[B, P]` int32 marks real prompt tokens. `prompt_tokens ++ tokens` with
        `prompt_mask ++ response_mask` is exactly what the sampler attended to, so the trainer can
        score it with `response_logprobs(model, prompt_tokens, prompt_mask, tokens, response_mask)`.
    prompt_index `[B]` int32: which input prompt each row answers (`row // n`).
    n, temperature: how the rows were sampled (temperature 0 = greedy).
    """

    tokens: np.ndarray
    response_mask: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray
    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray
    prompt_index: np.ndarray
    n: int = 1
    temperature: float = 1.0

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_prompts(self) -> int:
        return self.num_rows // self.n

    @property
    def logprob_temperature(self) -> float:
        """The temperature that `logprobs` (and the trainer's `response_logprobs`) use: 1 for greedy."""
        return self.temperature or 1.0

    @property
    def truncated(self) -> np.ndarray:
        """`[B]` bool: the row ran out of new tokens before a stop token."""
        return ~self.finished

    def response_lists(self) -> list[list[int]]:
        """Each row's response tokens (stop token included) as a Python list."""
        return [row[:length].tolist() for row, length in zip(self.tokens, self.lengths)]
