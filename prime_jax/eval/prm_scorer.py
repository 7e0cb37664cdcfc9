"""The implicit PRM as a scorer of finished responses: q per token or summed per response, for
best-of-n reranking (`prime_jax.evaluate --prm`) and the training run's token-reward pages."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from prime_jax import algo
from prime_jax.models import response_logprobs
from prime_jax.parallel import batch_shards, put_rows, replicated, to_host
from prime_jax.sampling import PAD_ID


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


class PRMScorer:
    """Implicit process rewards of responses, ``q_t = (log π_prm − log π_ref)(y_t | x, y_<t)``
    (``algo.implicit_token_rewards``, EOS included): summed per response (``__call__``, best-of-n)
    or per token (``token_rewards``, the training run's HTML page).

    prm_model / ref_model: `Qwen2ForCausalLM`s or their `(graphdef, state)` (same tokenizer);
    ref_model None scores ``log π_prm`` alone. Log-probs use ``temperature``; 1.0 (the raw logits)
    is how the trainer scores the PRM and its reference. Rows are scored ``batch_size`` at a time,
    padded to power-of-two buckets (few compilations) and, with a mesh, split over its data axes.
    The jitted programs are shared by scorers of the same graphs, so a new scorer of new weights
    compiles nothing new. ``beta``: the PRM's training β; with it, evaluation records each sample's
    P(correct) = sigmoid(β Σq) and reports the PRM-weighted vote (prm_vote@n).
    """

    def __init__(self, prm_model, ref_model, *, mesh=None, temperature: float = 1.0, chunk_size: int = 128,
                 batch_size: int = 64, beta: float | None = None):
        split = lambda m: m if isinstance(m, tuple) else nnx.split(m)
        self.mesh = mesh
        self.batch_size = int(batch_size)
        self.beta = None if beta is None else float(beta)  # the PRM's training β: P(correct) = sigmoid(β Σq)
        prm_graphdef, self.prm_state = split(prm_model)
        ref_graphdef, self.ref_state = split(ref_model) if ref_model is not None else (None, None)
        self._programs = _q_programs(prm_graphdef, ref_graphdef, mesh, float(temperature), int(chunk_size))
        self._rows_multiple = 1 if mesh is None else batch_shards(mesh)

    def __call__(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """`[B]` float32 summed q of each (prompt, response) pair (responses need >= 1 token)."""
        out = np.zeros(len(prompt_ids), np.float32)
        for idx, batch in self._batches(prompt_ids, response_ids):
            out[idx] = self._run("sums", batch)[:len(idx)]
        return out

    def token_rewards(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
                      ) -> list[np.ndarray]:
        """Each response's `[len(response)]` float32 q."""
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(prompt_ids)
        for idx, batch in self._batches(prompt_ids, response_ids):
            q = self._run("tokens", batch)
            for j, i in enumerate(idx):
                out[i] = q[j, :len(response_ids[i])]
        return out

    def _run(self, which: str, batch) -> np.ndarray:
        if self.mesh is not None:
            batch = put_rows(batch, self.mesh)
        return to_host(self._programs[which](self.prm_state, self.ref_state, batch))

    def _batches(self, prompt_ids, response_ids):
        """(row indices, padded host batch) of `batch_size` rows at a time, similar lengths together."""
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), len(response_ids[i])))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            rows = _next_pow2(len(idx))
            rows = -(-rows // self._rows_multiple) * self._rows_multiple
            P = max(16, _next_pow2(max(len(prompt_ids[i]) for i in idx)))
            R = max(8, _next_pow2(max(max(len(response_ids[i]), 1) for i in idx)))
            batch = {"prompt_ids": np.full((rows, P), PAD_ID, np.int32), "prompt_mask": np.zeros((rows, P), np.int32),
                     "response_ids": np.full((rows, R), PAD_ID, np.int32),
                     "response_mask": np.zeros((rows, R), np.int32)}
            for j, i in enumerate(idx):
                p, r = list(prompt_ids[i]), list(response_ids[i])
                batch["prompt_ids"][j, P - len(p):] = p
                batch["prompt_mask"][j, P - len(p):] = 1
                batch["response_ids"][j, :len(r)] = r
                batch["response_mask"][j, :len(r)] = 1
            for j in range(len(idx), rows):  # padding rows: one dummy token, ignored
                batch["prompt_mask"][j, -1] = 1
                batch["response_mask"][j, 0] = 1
            yield idx, batch


@functools.lru_cache(maxsize=8)
def _q_programs(prm_graphdef, ref_graphdef, mesh, temperature: float, chunk_size: int) -> dict:
    """{"tokens": jit (prm_state, ref_state, batch) -> q [B, R], "sums": -> [B]}, results replicated."""
    def q_tokens(prm_state, ref_state, batch):
        args = (batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], batch["response_mask"])
        lp_prm = response_logprobs(nnx.merge(prm_graphdef, prm_state), *args, temperature=temperature,
                                   chunk_size=chunk_size)
        lp_ref = 0.0 if ref_state is None else response_logprobs(
            nnx.merge(ref_graphdef, ref_state), *args, temperature=temperature, chunk_size=chunk_size)
        return algo.implicit_token_rewards(lp_prm, lp_ref, batch["response_mask"])

    def q_sums(prm_state, ref_state, batch):
        return q_tokens(prm_state, ref_state, batch).sum(axis=-1)

    if mesh is None:
        return {"tokens": jax.jit(q_tokens), "sums": jax.jit(q_sums)}

    return {"tokens": jax.jit(q_tokens, out_shardings=replicated(mesh)),
            "sums": jax.jit(q_sums, out_shardings=replicated(mesh))}
