"""Decoder hyper-parameters (Qwen2 or Llama family), read from and written to Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")

# The decoder architectures this code runs: transformers' `model_type` -> its causal-LM class. They
# differ only in the attention biases (Qwen2: q/k/v biases; Llama: none unless `attention_bias`).
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


class UnsupportedModelError(ValueError):
    """A checkpoint this code cannot run (architecture, rope scaling, quantization, a corrupt or
    unfetchable file); the message is one line that says what is supported."""


def supported_architectures() -> str:
    return ", ".join(f"{t} ({cls})" for t, cls in ARCHITECTURES.items())


def model_type_of(hf: dict[str, Any]) -> str:
    """The `model_type` of a `config.json` dict (from `architectures` when absent; a dict with
    neither is a Qwen2 config, as this project's first exports were); refuses any other."""
    model_type = hf.get("model_type")
    if model_type is None:
        by_class = {cls: t for t, cls in ARCHITECTURES.items()}
        named = [by_class[a] for a in hf.get("architectures") or [] if a in by_class]
        if hf.get("architectures") and not named:
            raise UnsupportedModelError(
                f"architecture {hf['architectures']} is not supported (supported: {supported_architectures()})")
        model_type = named[0] if named else "qwen2"
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (supported: {supported_architectures()})")
    return model_type


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Shapes of a Qwen2/Qwen2.5 or Llama-family decoder plus how to run it (dtypes, remat, fused_mlp).

    `model_type` picks the architecture ("qwen2" or "llama", `ARCHITECTURES`); the one structural
    difference, q/k/v biases, is `attention_bias` (None: the type's own, on for Qwen2, off for Llama).
    """

    model_type: str = "qwen2"
    attention_bias: bool | None = None
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    # Special token ids, as the checkpoint's config.json has them (None: not set); written back on
    # export so that transformers' `generate` knows where a response ends.
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # How to run it (not part of the HF architecture).
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # master copy of the weights
    remat: str = "none"  # per-layer rematerialisation: none | full | dots | dots_no_batch
    # Gate and up projections as one product over the two kernels stacked [D, 2, F] (same weights and
    # checkpoints): on CPU the backward pass of two products wrote their gradients transposed (about a
    # tenth of a train step at SmolLM2's shape). Moves training numbers by float rounding.
    fused_mlp: bool = False

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported (supported: {supported_architectures()})")
        if self.attention_bias is None:
            object.__setattr__(self, "attention_bias", self.model_type == "qwen2")
        if self.model_type == "qwen2" and not self.attention_bias:
            raise ValueError("a qwen2 model has q/k/v biases (attention_bias must be True)")
        if self.hidden_size % self.num_attention_heads and self.head_dim is None:
            raise ValueError("hidden_size must be divisible by num_attention_heads when head_dim is unset")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        for field in ("dtype", "param_dtype"):
            jnp.dtype(getattr(self, field))  # raises on an unknown dtype name

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "Qwen2Config":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, v, h = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_size
        q, kv = self.num_attention_heads * h, self.num_key_value_heads * h
        biases = q + 2 * kv if self.attention_bias else 0
        attn = d * q + 2 * d * kv + biases + q * d
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_hidden_layers * layer + d + head

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides) -> "Qwen2Config":
        """From a Hugging Face Qwen2 or Llama `config.json` dict (rope theta in `rope_theta` or
        `rope_parameters`); raises UnsupportedModelError for another architecture or what this
        decoder does not run (rope scaling, MLP biases, another activation)."""
        model_type = model_type_of(hf)
        rope_theta = hf.get("rope_theta")
        rope_parameters = hf.get("rope_parameters") or {}
        if rope_theta is None:
            rope_theta = rope_parameters.get("rope_theta", 10000.0)
        rope_type = rope_parameters.get("rope_type", (hf.get("rope_scaling") or {}).get("rope_type", "default"))
        if rope_type not in (None, "default"):
            raise UnsupportedModelError(f"rope scaling type {rope_type!r} is not supported (only default RoPE)")
        if hf.get("mlp_bias"):
            raise UnsupportedModelError("MLP biases (mlp_bias: true) are not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        fields = dict(
            model_type=model_type,
            attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), list) else hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' Qwen2Config or LlamaConfig (`model_type`) loads
        (both rope spellings written; the special token ids when set)."""
        ids = {k: list(v) if isinstance(v, tuple) else v for k, v in (
            ("bos_token_id", self.bos_token_id), ("eos_token_id", self.eos_token_id),
            ("pad_token_id", self.pad_token_id)) if v is not None}
        if self.model_type == "qwen2":
            specific = {"use_sliding_window": False}
        else:
            specific = {"attention_bias": self.attention_bias, "mlp_bias": False}
        return {**ids, **specific,
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "torch_dtype": self.param_dtype,
        }
