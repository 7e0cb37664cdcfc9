"""One builder of a run's parts, from its config and mesh: training, the memory plan and evaluation
all build through it, so they cannot drift apart.

    builder = RunBuilder(config, mesh)          # a real mesh, or one over fake CPU devices (plan)
    builder.model_config(vocab_size)            # the Qwen2Config (checkpoint's config.json or shape fields)
    builder.load_model(path, vocab_size=)       # a model on the mesh: a checkpoint, or the seeded random init
    builder.tokenizer(layout, is_main)          # the run's tokenizer (the tiny one built into WORKDIR)
    builder.policy_optimizer / prm_optimizer    # AdamW with the configured warm-up
    builder.train_steps(model)                  # make_train_steps(...) as the loop runs them
    builder.sampler()                           # the rollout Sampler (buckets, decode slots)
    builder.compile_rollout(sampler, model, key)  # the rollout's prefill/decode programs, abstract or real
    builder.abstract_batch(program, rows)       # the batch a program takes (PrimeBatch.present), as shapes
    builder.abstract_run_state(params)          # what a run checkpoint holds (policy, PRM, key)
    RunLayout(workdir)                          # where a run keeps its files

`prime_jax.plan` compiles the same programs from `nnx.eval_shape` weights through the public
`Sampler.compile` and `TrainSteps.*.lower`, so the plan's programs are the training programs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import optax
from flax import nnx

from prime_jax import algo
from prime_jax.config import RANDOM_MODEL, TINY_TOKENIZER
from prime_jax.data import build_tiny_tokenizer
from prime_jax.models import Qwen2Config, Qwen2ForCausalLM, from_pretrained, load_config
from prime_jax.models.gguf_io import model_config as gguf_model_config
from prime_jax.models.packaged import gguf_path, is_model_file_or_name
from prime_jax.models.tokenizer import load_tokenizer
from prime_jax.parallel import batch_sharding, replicated, shard_state, state_shardings, with_shardings
from prime_jax.sampling import Sampler
from prime_jax.train.batch import PrimeBatch
from prime_jax.train.state import abstract_train_state, make_optimizer, split_params, train_state_shardings
from prime_jax.train.steps import TrainSteps, make_train_steps

SCORE_MICRO_BATCHES = 1  # the loop scores each batch.score_batch chunk in one pass
MIN_PROMPT_BUCKET = 16  # the sampler's smallest prompt-length bucket


# ==============================================================================================
# Files of a run
# ==============================================================================================
@dataclasses.dataclass(frozen=True)
class RunLayout:
    """Where a run keeps its files under WORKDIR (the trainer writes them; evaluate, export and
    resume read them)."""

    workdir: Path

    def __post_init__(self):
        object.__setattr__(self, "workdir", Path(self.workdir))

    checkpoints = property(lambda self: self.workdir / "checkpoints")  # orbax run checkpoints, <step>/{state,meta}
    reference = property(lambda self: self.workdir / "reference")  # the frozen reference (SFT) params
    tokenizer = property(lambda self: self.workdir / "tokenizer")  # the built tiny tokenizer
    hf_export = property(lambda self: self.workdir / "hf_export")  # the exported policy (HF format)
    config_json = property(lambda self: self.workdir / "config.json")  # the run's config
    metrics = property(lambda self: self.workdir / "metrics.jsonl")
    sft_metrics = property(lambda self: self.workdir / "sft_metrics.jsonl")
    rollouts = property(lambda self: self.workdir / "rollouts")  # held-out responses as HTML pages

    def checkpoint_steps(self) -> list[int]:
        """Committed checkpoint steps (orbax renames its temporary folder on commit)."""
        return checkpoint_steps(self.checkpoints)

    def run_config(self) -> dict:
        """The run's own config (as the trainer wrote it), or {} when absent or unreadable."""
        try:
            return json.loads(self.config_json.read_text())
        except (OSError, ValueError):
            return {}


def checkpoint_steps(folder: Path) -> list[int]:
    """Committed steps of a checkpoints/ folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(d.name) for d in folder.iterdir() if d.name.isdigit() and (d / "state").is_dir())


# ==============================================================================================
# The model's architecture
# ==============================================================================================
def model_config(model: Mapping[str, Any], vocab_size: int = 0, *, download: bool = True) -> Qwen2Config:
    """The `Qwen2Config` of a run's `model` section (a ConfigDict or dict): the checkpoint's
    config.json, else the shape fields ("random"). vocab_size: the tokenizer's size, used when
    model.vocab_size is 0. download=False (the plan) reads only a local config.json or GGUF's
    metadata (a packaged model is fetched: it is small) and falls back to the shape fields for a hub id."""
    run = dict(dtype=model["dtype"], param_dtype=model["param_dtype"], remat=model["remat"],
               fused_mlp=model["fused_mlp"])
    path = model["path"]
    if path != RANDOM_MODEL:
        if is_model_file_or_name(path) and not download:  # the GGUF's metadata: no conversion
            return gguf_model_config(gguf_path(path), **run)
        local = Path(os.path.expanduser(path)) / "config.json"
        if download or local.is_file():
            return load_config(path, **run)
    vocab = model["vocab_size"] or vocab_size
    if not vocab:
        raise ValueError("model.vocab_size is 0 (the tokenizer's size); set it to plan without a tokenizer")
    return Qwen2Config(
        model_type=model["model_type"], vocab_size=vocab, hidden_size=model["hidden_size"],
        intermediate_size=model["intermediate_size"],
        num_hidden_layers=model["num_layers"], num_attention_heads=model["num_heads"],
        num_key_value_heads=model["num_kv_heads"], head_dim=model["head_dim"] or None,
        rope_theta=float(model["rope_theta"]), max_position_embeddings=model["max_position_embeddings"],
        tie_word_embeddings=bool(model["tie_word_embeddings"]), **run)


def random_model(config: Qwen2Config, mesh, seed: int) -> Qwen2ForCausalLM:
    """A random-init model (`nnx.Rngs(seed)`), placed with its shardings on `mesh`."""
    graphdef, state = nnx.split(Qwen2ForCausalLM(config, rngs=nnx.Rngs(seed)))
    return nnx.merge(graphdef, shard_state(state, mesh))


def abstract_model(config: Qwen2Config) -> Qwen2ForCausalLM:
    """The model's shapes and dtypes only (`nnx.eval_shape`; nothing allocated)."""
    return nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))


def abstract_params(config: Qwen2Config, mesh):
    """(graphdef, params) of the model as sharded `ShapeDtypeStruct`s (restore targets, plans)."""
    graphdef, params = split_params(abstract_model(config))
    return graphdef, with_shardings(params, state_shardings(params, mesh))


def optimizer(o) -> optax.GradientTransformation:
    """AdamW of an optimizer section (`policy_optim`, `prm_optim`), with its linear warm-up."""
    lr = optax.linear_schedule(0.0, o.lr, o.warmup_steps) if o.warmup_steps else o.lr
    return make_optimizer(lr, weight_decay=o.weight_decay, clip_norm=o.clip_norm or None, b1=o.b1, b2=o.b2, eps=o.eps)


# ==============================================================================================
# The builder
# ==============================================================================================
class RunBuilder:
    """Builds a run's parts from `config` on `mesh` (see the module docstring). `model`: the model
    section to build with, when not the config's own (`evaluate` of a training run: the run's, which
    its checkpoints have the shapes of)."""

    def __init__(self, config, mesh, model: Mapping[str, Any] | None = None):
        self.config = c = config
        self.mesh = mesh
        self.model = config.model.to_dict() if model is None else dict(model)
        self.n = c.rollout.n
        self.data_parallel = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
        # Prompts sampled per attempt: oversampled, rounded up so the rows split evenly over the
        # data-parallel devices (every attempt has the same shapes: one compilation).
        prompts = math.ceil(c.rollout.oversample * c.batch.prompts_per_step)
        while prompts * self.n % self.data_parallel:
            prompts += 1
        self.prompts_per_attempt = prompts
        # Training batches hold prompts in a fixed number of columns (one compilation per program).
        self.prompt_width = -(-c.data.max_prompt_tokens // 8) * 8
        # the estimator reads process rewards: the run scores the reference, and has a PRM unless its source is another
        self.uses_process_rewards = algo.uses_process_rewards(c.algo.estimator)
        self.updates_prm = self.uses_process_rewards and c.algo.prm_update != "none"

    # ------------------------------------------------------------------ model and tokenizer
    def model_config(self, vocab_size: int = 0, *, download: bool = True) -> Qwen2Config:
        return model_config(self.model, vocab_size, download=download)

    def load_model(self, path: str = "", *, vocab_size: int, seed: int | None = None) -> Qwen2ForCausalLM:
        """A model on the mesh in the model section's dtypes: the checkpoint at `path` (an HF folder or hub
        id, a GGUF file or packaged model; default model.path, the run's start model), or for "random"
        the seeded random init (`seed`, default the config's) of the section's shape."""
        m = self.model
        path = path or m["path"]
        if path != RANDOM_MODEL:
            return from_pretrained(path, dtype=m["dtype"], param_dtype=m["param_dtype"], mesh=self.mesh,
                                   remat=m["remat"], fused_mlp=m["fused_mlp"])
        return random_model(self.model_config(vocab_size), self.mesh, self.config.seed if seed is None else seed)

    def tokenizer(self, layout: RunLayout, is_main: bool = True):
        """The run's tokenizer: tokenizer.path, else model.path; "tiny" is built into WORKDIR/tokenizer."""
        path = self.config.tokenizer.path or self.config.model.path
        if path == TINY_TOKENIZER:
            # Deterministic: process 0 writes it into the workdir (for users and the export), the
            # others build their own copy (a pod's hosts need not share a file system).
            folder = layout.tokenizer if is_main else Path(tempfile.mkdtemp(prefix="prime_tokenizer_"))
            if not (folder / "tokenizer.json").exists():
                build_tiny_tokenizer(folder)
            path = str(folder)
        return load_tokenizer(path)

    # ------------------------------------------------------------------ optimizers and train steps
    @functools.cached_property
    def policy_optimizer(self) -> optax.GradientTransformation:
        return optimizer(self.config.policy_optim)

    @functools.cached_property
    def prm_optimizer(self) -> optax.GradientTransformation:
        return optimizer(self.config.prm_optim)

    def train_steps(self, model) -> TrainSteps:
        """The jitted score / PRM / policy steps (model: real, abstract or `(graphdef, params)`)."""
        c = self.config
        return make_train_steps(
            model, self.policy_optimizer, self.prm_optimizer if self.updates_prm else None, self.mesh, n=self.n,
            micro_batches=c.batch.micro_batches, score_micro_batches=SCORE_MICRO_BATCHES, beta=c.algo.beta,
            clip_eps=c.algo.clip_eps, temperature=c.rollout.temperature, chunk_size=c.model.logprob_chunk,
            prm_loss_type=c.algo.prm_loss, agg=c.algo.agg)

    def scored_fields(self) -> tuple[str, ...]:
        """The log-probs the scoring pass computes: the policy's old ones unless the sampler's are
        used, the frozen reference's when process rewards are on."""
        c = self.config
        return tuple(f for f, on in (("old_logprobs", c.algo.recompute_old_logprobs),
                                     ("ref_logprobs", self.uses_process_rewards)) if on)

    def score_calls(self) -> dict[str, tuple[int, tuple[bool, bool, bool]]]:
        """The scoring programs the loop runs, {name: (rows, which of (policy, PRM, reference) it
        scores)}: "score" (`scored_fields` of batch.score_batch rows) and, when the PRM's q comes
        from a scoring pass of its own (algo.prm_update before / reverse / none), "prm_score"
        (the PRM's log-probs of batch.prm_mini_batch rows, `prm_phase.score_q`)."""
        c, fields = self.config, self.scored_fields()
        calls = {}
        if fields:
            calls["score"] = (c.batch.score_batch, ("old_logprobs" in fields, False, "ref_logprobs" in fields))
        if self.uses_process_rewards and c.algo.prm_update in ("before", "reverse", "none"):
            calls["prm_score"] = (c.batch.prm_mini_batch, (False, True, False))
        return calls

    def batch_fields(self, program: str) -> tuple[str, ...]:
        """The `PrimeBatch` fields set when the loop calls `program` ("score", "prm_score", "prm",
        "policy"): they are the program's inputs (`PrimeBatch.present`)."""
        c = self.config
        return PrimeBatch.present(program, scored=self.scored_fields(), overlap_scoring=c.rollout.overlap_scoring,
                                  group_scores=c.algo.prm_loss in algo.GROUP_SCORE_LOSS_TYPES)

    def abstract_batch(self, program: str, rows: int, response_len: int | None = None) -> PrimeBatch:
        """The batch of `rows` rows the loop passes to `program` (`batch_fields`), as sharded
        `ShapeDtypeStruct`s: prompts in `prompt_width` columns, responses in `response_len`
        (default rollout.max_new_tokens, the longest bucket)."""
        columns = {"prompt": self.prompt_width, "response": response_len or self.config.rollout.max_new_tokens}
        sharding = batch_sharding(self.mesh, 1)
        out = {}
        for name in self.batch_fields(program):
            f = PrimeBatch.FIELDS[name]
            shape = (rows, columns[f.columns]) if f.columns else (rows,)
            out[name] = jax.ShapeDtypeStruct(shape, f.dtype, sharding=sharding)
        return PrimeBatch(**out)

    def abstract_train_state(self, params, which: str):
        """The sharded shapes of the `which` ("policy" | "prm") TrainState."""
        opt = self.policy_optimizer if which == "policy" else self.prm_optimizer
        return with_shardings(abstract_train_state(params, opt), train_state_shardings(params, opt, self.mesh))

    def abstract_run_state(self, params) -> dict:
        """What a run checkpoint's `state` holds: {"policy", "prm": TrainState, "key"} (shapes)."""
        key = jax.random.PRNGKey(0)
        return {"policy": self.abstract_train_state(params, "policy"), "prm": self.abstract_train_state(params, "prm"),
                "key": jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(self.mesh))}

    # ------------------------------------------------------------------ sampling
    def sampler(self) -> Sampler:
        """The rollout sampler: prompt buckets of >= 16 tokens, rollout.decode_slots slots."""
        return Sampler(self.mesh, min_prompt_bucket=MIN_PROMPT_BUCKET,
                       decode_slots=self.config.rollout.decode_slots or None)

    def rollout_settings(self) -> dict:
        """The sampling arguments of a training rollout's `generate` call (besides prompts, stop ids, key)."""
        r = self.config.rollout
        return dict(max_new_tokens=r.max_new_tokens, n=self.n, temperature=r.temperature, top_p=r.top_p,
                    top_k=r.top_k)

    def compile_rollout(self, sampler: Sampler, model, *, key, stop_token_ids: Sequence[int] = (0,),
                        num_prompts: int = 0):
        """The prefill and decode programs of one rollout attempt (`num_prompts` prompts, default
        prompts_per_attempt, of the longest allowed length), compiled through the sampler's public
        `compile`: from abstract weights for a plan, kept for the run's `generate` calls."""
        return sampler.compile(model, num_prompts=num_prompts or self.prompts_per_attempt,
                               prompt_len=self.config.data.max_prompt_tokens, stop_token_ids=stop_token_ids,
                               key=key, **self.rollout_settings())
