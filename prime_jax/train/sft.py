"""Supervised fine-tuning: masked next-token cross-entropy on the response part of chat pairs.

A real SFT stage for any Qwen2 model and chat tokenizer: each example is a (prompt messages,
response text) pair; the prompt is rendered with the tokenizer's own chat template (generation
prompt included) and left-padded, the response (+ EOS) is right-padded, exactly the layout the
sampler produces and `response_logprobs` scores, so the warm-started policy is trained on the
same positions it will later sample from. Only response tokens carry loss.

The step is one jitted function of (TrainState, batch); params and optimizer state live sharded
on the mesh (the optimizer state is created inside jit with its output shardings).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from prime_jax.models import response_logprobs
from prime_jax.models.tokenizer import encode_chat, eos_token_ids
from prime_jax.parallel import put_rows, to_host
from prime_jax.train.state import TrainState, create_train_state, make_optimizer, split_params


def encode_examples(tokenizer, pairs: Iterable[tuple[Sequence[Mapping], str]], *,
                    max_prompt_tokens: int | None = None, max_response_tokens: int | None = None):
    """(messages, response text) pairs -> list of (prompt ids, response ids + EOS).

    Pairs whose prompt or response is too long are dropped; returns (examples, dropped count).
    """
    eos = eos_token_ids(tokenizer)[0]
    out, dropped = [], 0
    for messages, response in pairs:
        prompt = encode_chat(tokenizer, messages, add_generation_prompt=True)
        reply = list(tokenizer.encode(response, add_special_tokens=False)) + [eos]
        if (max_prompt_tokens and len(prompt) > max_prompt_tokens) or (
                max_response_tokens and len(reply) > max_response_tokens):
            dropped += 1
            continue
        out.append((prompt, reply))
    return out, dropped


def pad_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = 0,
                 prompt_len: int | None = None, response_len: int | None = None) -> dict[str, np.ndarray]:
    """Prompts left-padded to `prompt_len`, responses right-padded to `response_len` (numpy)."""
    P = prompt_len or max(len(p) for p, _ in examples)
    R = response_len or max(len(r) for _, r in examples)
    B = len(examples)
    prompt_ids = np.full((B, P), pad_id, np.int32)
    prompt_mask = np.zeros((B, P), np.int32)
    response_ids = np.full((B, R), pad_id, np.int32)
    response_mask = np.zeros((B, R), np.int32)
    for i, (p, r) in enumerate(examples):
        p, r = list(p)[-P:], list(r)[:R]
        prompt_ids[i, P - len(p):] = p
        prompt_mask[i, P - len(p):] = 1
        response_ids[i, :len(r)] = r
        response_mask[i, :len(r)] = 1
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                response_mask=response_mask)


def sft_schedule(lr: float, steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then cosine decay to 10% of `lr` at `steps`."""
    warmup = max(0, min(warmup_steps, steps - 1))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * 0.1)


def make_sft_step(graphdef, optimizer: optax.GradientTransformation, *, chunk_size: int = 128) -> Callable:
    """jitted `(state, batch) -> (state, metrics)`: one AdamW step of masked token-mean CE."""

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        lp = response_logprobs(model, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                               batch["response_mask"], temperature=1.0, chunk_size=chunk_size)
        mask = batch["response_mask"].astype(jnp.float32)
        tokens = jnp.maximum(mask.sum(), 1.0)
        loss = -(lp * mask).sum() / tokens
        # a response is "exact" when every token has log-prob > log(0.5) (greedy would produce it)
        exact = jnp.all((lp > math.log(0.5)) | (mask == 0), axis=1).astype(jnp.float32).mean()
        return loss, {"loss": loss, "exact_frac": exact}

    def step(state: TrainState, batch):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        new = TrainState(params=params, opt_state=opt_state, step=state.step + 1, nan_skips=state.nan_skips)
        return new, metrics

    return jax.jit(step, donate_argnums=(0,))


class SFTPreempted(Exception):
    """`run_sft` stopped early when asked to (`should_stop`), after saving its state (`save_fn`);
    `step` is the last step done. Rerunning with that state resumes it."""

    def __init__(self, step: int):
        super().__init__(f"SFT stopped after step {step}")
        self.step = step
        self.signal_name: str | None = None  # the signal that asked for it ("SIGTERM", "SIGINT"), where known


def sft_optimizer(lr: float, steps: int, warmup_steps: int, weight_decay: float = 0.0,
                  clip_norm: float = 1.0) -> optax.GradientTransformation:
    """AdamW on `sft_schedule` (what `run_sft` trains with; its state's shapes are a resume's target)."""
    return make_optimizer(sft_schedule(lr, steps, warmup_steps), weight_decay=weight_decay, clip_norm=clip_norm or None)


def run_sft(model: nnx.Module, examples: Sequence[tuple[Sequence[int], Sequence[int]]], *, steps: int,
            lr: float, batch_size: int, mesh, seed: int = 0, warmup_steps: int = 0, weight_decay: float = 0.0,
            clip_norm: float = 1.0, pad_id: int = 0, chunk_size: int = 128,
            log_fn: Callable[[int, dict], None] | None = None, log_every: int = 25,
            pad_multiple: int = 64, resume: tuple[int, TrainState] | None = None,
            save_fn: Callable[[int, TrainState], None] | None = None, save_every: int = 0,
            should_stop: Callable[[], bool] | None = None) -> nnx.Module:
    """Fine-tunes `model` on `examples` for `steps` AdamW steps; returns the trained model.

    Batches are drawn epoch by epoch from a permutation seeded by `seed` (deterministic).
    A batch's prompts and responses are padded to its own longest, rounded up to a multiple of
    `pad_multiple` and capped at the whole set's longest, so the step compiles once per bucket
    (once when the set is short, as the synthetic tasks are) and real chat data with a long tail
    is not padded to its longest everywhere. `log_fn(step, metrics)` is called every `log_every`
    steps and at the end.

    Resuming: `save_fn(step, state)` is called every `save_every` steps (0: never) and, when
    `should_stop()` turns true after a step, before raising `SFTPreempted(step)`; `resume=(step,
    state)` continues from such a state (its TrainState as `sft_optimizer` makes it) with the same
    batches an uninterrupted run would draw.
    """
    if not examples:
        raise ValueError("SFT needs at least one example")
    graphdef, params = split_params(model)
    schedule = sft_schedule(lr, steps, warmup_steps)
    optimizer = sft_optimizer(lr, steps, warmup_steps, weight_decay, clip_norm)
    first, state = resume if resume is not None else (0, create_train_state(params, optimizer, mesh))
    step_fn = make_sft_step(graphdef, optimizer, chunk_size=chunk_size)
    start, acc = time.time(), []
    for k, batch in _sft_batches(examples, steps, batch_size, seed, first, pad_id, pad_multiple):
        state, metrics = step_fn(state, put_rows(batch, mesh))
        acc.append(metrics)
        if log_fn is not None and (k % log_every == 0 or k == steps):
            host = to_host(acc)
            row = {key: float(np.mean([m[key] for m in host])) for key in host[0]}
            row["lr"] = float(schedule(k - 1))
            row["time_s"] = time.time() - start
            log_fn(k, row)
            acc = []
        if save_fn is not None and k < steps:
            # the step's result first: otherwise async dispatch runs the loop ahead of the device and a SIGTERM
            # waits for every step dispatched up to the next save (minutes a step on a CPU)
            jax.block_until_ready(metrics["loss"])
            stop = should_stop is not None and should_stop()  # a collective vote on several processes
            if stop or (save_every and k % save_every == 0):
                save_fn(k, state)
            if stop:
                raise SFTPreempted(k)
    return nnx.merge(graphdef, state.params)


def _sft_batches(examples, steps: int, batch_size: int, seed: int, first: int, pad_id: int, pad_multiple: int):
    """(k, padded numpy batch) for steps k = first+1 .. steps (see `run_sft`): the batches of steps up to
    `first` are drawn and skipped, so a resumed run trains on what an uninterrupted one would."""
    longest_prompt = max(len(p) for p, _ in examples)
    longest_response = max(len(r) for _, r in examples)

    def bucket(length: int, longest: int) -> int:
        return min(-(-length // pad_multiple) * pad_multiple, longest)
    rng = np.random.default_rng([int(seed), 7_001])
    order, pos = rng.permutation(len(examples)), 0
    for k in range(1, steps + 1):
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(examples)), 0
        idx = order[pos:pos + batch_size] if batch_size <= len(order) else rng.choice(len(order), batch_size)
        pos += batch_size
        if k <= first:  # resumed: these batches were trained on before
            continue
        rows = [examples[i] for i in idx]
        yield k, pad_examples(rows, pad_id, bucket(max(len(p) for p, _ in rows), longest_prompt),
                              bucket(max(len(r) for _, r in rows), longest_response))
