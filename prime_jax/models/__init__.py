"""Qwen2 and Llama-family decoders in Flax NNX, Hugging Face weights in and out (GGUF files and
packaged models in: `gguf_io`, `packaged`), and the shared chunked log-prob function."""

from prime_jax.models.config import Qwen2Config
from prime_jax.models.hf_io import from_pretrained, load_config, save_pretrained
from prime_jax.models.logprobs import chunked_token_logprobs, naive_token_logprobs, response_logprobs
from prime_jax.models.qwen2 import KVCache, Qwen2ForCausalLM

__all__ = [
    "KVCache",
    "Qwen2Config",
    "Qwen2ForCausalLM",
    "chunked_token_logprobs",
    "from_pretrained",
    "load_config",
    "naive_token_logprobs",
    "response_logprobs",
    "save_pretrained",
]
