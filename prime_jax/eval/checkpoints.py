"""What `prime_jax.evaluate` loads: a --checkpoint / --prm / --reference resolved to a `CheckpointSpec`
(an HF folder or hub id, a GGUF file or packaged model, a training run's orbax checkpoint, or the
config's own model), the model it names, a PRM's reference, and the tokenizer that goes with it."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from flax import nnx

from prime_jax.config import RANDOM_MODEL, TINY_TOKENIZER
from prime_jax.data import build_tiny_tokenizer
from prime_jax.models.packaged import is_model_file_or_name, is_packaged
from prime_jax.train import checkpoint as ckpt
from prime_jax.train.builder import RunBuilder, RunLayout, abstract_params, checkpoint_steps

logger = logging.getLogger("prime_jax.evaluate")


@dataclasses.dataclass
class CheckpointSpec:
    """A resolved --checkpoint / --prm / --reference: an HF folder or hub id, a run checkpoint
    (orbax, WORKDIR/checkpoints/<step>), a run's SFT weights (WORKDIR/reference), or the config's
    own model ("config")."""

    kind: str  # "hf" | "run" | "sft" | "config"
    path: str = ""  # hf: folder or hub id; run: the checkpoints/ folder
    step: int | None = None
    run_dir: Path | None = None  # the training workdir a run checkpoint (or hf_export) belongs to

    def describe(self) -> str:
        if self.kind == "run":
            return f"{self.path}/{self.step} (orbax run checkpoint)"
        if self.kind == "hf":
            return f"{self.path} ({'GGUF' if is_model_file_or_name(self.path) else 'Hugging Face'})"
        if self.kind == "sft":
            return f"{self.path} (the run's SFT weights: its frozen reference)"
        return "config.model.path"


def resolve_checkpoint(spec: str) -> CheckpointSpec:
    """Turns a path (or hub id) into a CheckpointSpec; raises FileNotFoundError with the reason."""
    if not spec:
        return CheckpointSpec("config")
    p = Path(spec).expanduser()
    if is_packaged(spec) or (is_model_file_or_name(spec) and p.is_file()):
        return CheckpointSpec("hf", spec)  # a GGUF file or packaged model: `from_pretrained` converts it (cached)
    if not p.exists():
        if not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
            return CheckpointSpec("hf", spec)  # a hub id
        raise FileNotFoundError(f"checkpoint {spec!r} does not exist")

    run, parent = RunLayout(p), RunLayout(p.parent)
    if (p / "config.json").exists() and any(p.glob("*.safetensors")):
        return CheckpointSpec("hf", str(p), run_dir=p.parent if parent.checkpoints.is_dir() else None)
    steps = run.checkpoint_steps()
    if steps:
        return CheckpointSpec("run", str(run.checkpoints), steps[-1], run_dir=p)
    if (run.hf_export / "config.json").exists():
        return CheckpointSpec("hf", str(run.hf_export), run_dir=p)
    if ckpt.params_saved(p) and (p.parent / "config.json").exists():
        return CheckpointSpec("sft", str(p), run_dir=p.parent)  # WORKDIR/reference: the RL start
    if p.name.isdigit() and (p / "state").is_dir():
        return CheckpointSpec("run", str(p.parent), int(p.name), run_dir=p.parent.parent)
    steps = checkpoint_steps(p)
    if steps:
        return CheckpointSpec("run", str(p), steps[-1], run_dir=p.parent)
    raise FileNotFoundError(
        f"checkpoint {spec!r} is neither an HF folder (config.json + *.safetensors), a training workdir with "
        f"checkpoints/<step>/ or hf_export/, a checkpoints/ folder, a step folder nor a run's reference/ folder")


def run_config(run_dir: Path | None) -> dict:
    """The training run's own config (WORKDIR/config.json written by the trainer), or {}."""
    return {} if run_dir is None else RunLayout(run_dir).run_config()


def model_fields(config, run_dir: Path | None) -> dict:
    """The config's `model` section, overridden by the run's own (its checkpoints have that shape)."""
    fields = dict(config.model.to_dict())
    fields.update({k: v for k, v in run_config(run_dir).get("model", {}).items() if k in fields})
    return fields


def run_builder(config, mesh, run_dir: Path | None = None) -> RunBuilder:
    """The run builder evaluation loads models and makes its sampler with, as training does; with the
    model section of the training run `run_dir` (its checkpoints have that shape)."""
    return RunBuilder(config, mesh, model=model_fields(config, run_dir))


def load_model(spec: CheckpointSpec, config, mesh, *, vocab_size: int, which: str = "policy"):
    """The model a CheckpointSpec names, on `mesh`, in the config's dtypes (through `RunBuilder`)."""
    if spec.kind == "sft":
        return run_reference(spec.run_dir, config, mesh, vocab_size)
    builder = run_builder(config, mesh, spec.run_dir if spec.kind == "run" else None)
    if spec.kind == "hf":
        return builder.load_model(spec.path, vocab_size=vocab_size)
    if spec.kind == "run":
        return ckpt.restore_or_raise(
            lambda: ckpt.restore_model(spec.path, spec.step, builder.model_config(vocab_size), mesh, which),
            f"checkpoint {spec.path}/{spec.step}")
    if builder.model["path"] == RANDOM_MODEL:
        logger.warning("config.model.path is 'random' and no --checkpoint was given: evaluating a random model")
    return builder.load_model(vocab_size=vocab_size)


def load_reference(spec: CheckpointSpec, prm_spec: CheckpointSpec, config, mesh, *, vocab_size: int):
    """The PRM's reference: --reference, else the PRM run's own (its frozen reference, WORKDIR/reference
    or the start model it was taken from; with algo.prm_ref "policy", its policy at the PRM's step),
    else config.model.path."""
    if spec.kind != "config":
        if spec.kind == "run":  # a workdir given as --reference: its reference weights
            return run_reference(spec.run_dir, config, mesh, vocab_size)
        return load_model(spec, config, mesh, vocab_size=vocab_size)
    if prm_spec.kind == "run":
        return run_prm_reference(prm_spec, config, mesh, vocab_size)
    if config.model.path == RANDOM_MODEL:
        raise ValueError("--prm needs --reference (config.model.path is 'random')")
    return load_model(CheckpointSpec("config"), config, mesh, vocab_size=vocab_size)


def run_prm_reference(prm_spec: CheckpointSpec, config, mesh, vocab_size: int):
    """The reference a training run's PRM was trained against: the rollout policy of the same
    checkpoint when the run had algo.prm_ref = "policy", else the run's frozen reference."""
    if run_config(prm_spec.run_dir).get("algo", {}).get("prm_ref", "freeze") == "policy":
        return load_model(prm_spec, config, mesh, vocab_size=vocab_size, which="policy")
    return run_reference(prm_spec.run_dir, config, mesh, vocab_size)


def run_reference(run_dir: Path, config, mesh, vocab_size: int):
    """A training run's frozen reference: WORKDIR/reference, else (no SFT) its start model (a random
    start: the run's seeded init)."""
    builder = run_builder(config, mesh, run_dir)
    folder = RunLayout(run_dir).reference
    if ckpt.params_saved(folder):
        graphdef, target = abstract_params(builder.model_config(vocab_size), mesh)
        return nnx.merge(graphdef, ckpt.restore_params(folder, target))
    return builder.load_model(vocab_size=vocab_size, seed=run_config(run_dir).get("seed", config.seed))


def resolve_tokenizer_path(config, spec: CheckpointSpec, workdir: Path, override: str = "") -> str:
    """--tokenizer_path, else the HF checkpoint's own tokenizer files, else the (run's)
    config.tokenizer.path ("tiny": the run's WORKDIR/tokenizer, built into WORKDIR/tokenizer if
    missing), else the model path."""
    if override:
        return override
    if spec.kind == "hf" and is_model_file_or_name(spec.path):
        return spec.path  # the tokenizer in the GGUF's metadata
    if spec.kind == "hf":
        folder = Path(spec.path)
        if folder.is_dir() and ((folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()):
            return str(folder)
    run = run_config(spec.run_dir)
    path = run.get("tokenizer", {}).get("path", config.tokenizer.path) if run else config.tokenizer.path
    model_path = model_fields(config, spec.run_dir)["path"]
    path = path or (spec.path if spec.kind == "hf" else model_path)
    if path == TINY_TOKENIZER:
        for d in (RunLayout(spec.run_dir).tokenizer if spec.run_dir else None, RunLayout(workdir).tokenizer):
            if d is not None and (d / "tokenizer.json").exists():
                return str(d)
        build_tiny_tokenizer(RunLayout(workdir).tokenizer)
        return str(RunLayout(workdir).tokenizer)
    if path == RANDOM_MODEL:
        raise ValueError("no tokenizer: the model is 'random' and config.tokenizer.path is empty; "
                         "set --tokenizer_path or --config.tokenizer.path")
    return path
