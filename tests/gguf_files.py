"""Tiny GGUF files written with `gguf.GGUFWriter`, as llama.cpp's converter lays them out, from a
random transformers Llama or Qwen2 model: quantized tensors (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q4_K, Q6_K), llama.cpp's q/k row permutation for Llama, and a byte-level BPE tokenizer with the
ChatML template. Shared by the GGUF tests."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

# Width 256 so every projection's rows are whole K-quant blocks (256 values).
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD = 256, 256, 2, 4, 2, 64
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# The type of each tensor (by its GGUF name's last part): every type the issue names, once at least.
TENSOR_TYPES = {
    "token_embd.weight": Q.Q8_0, "output.weight": Q.Q6_K, "output_norm.weight": Q.F32,
    "attn_norm.weight": Q.F32, "ffn_norm.weight": Q.F32,
    "attn_q.weight": Q.Q4_K, "attn_k.weight": Q.Q6_K, "attn_v.weight": Q.Q4_0, "attn_output.weight": Q.Q4_1,
    "attn_q.bias": Q.F32, "attn_k.bias": Q.F32, "attn_v.bias": Q.F32,
    "ffn_gate.weight": Q.Q8_0, "ffn_up.weight": Q.BF16, "ffn_down.weight": Q.F16,
}
UNQUANTIZED = {name: Q.F32 for name in TENSOR_TYPES}

_HF_NAMES = {  # transformers name suffix -> GGUF name suffix
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def tokenizer_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): the 3 ChatML specials (control), the 256 byte symbols of a
    byte-level BPE, and a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i s"]
    merged = ["".join(m.split(" ")) for m in merges]
    tokens = SPECIALS + symbols + merged
    return tokens, [3] * len(SPECIALS) + [1] * (len(symbols) + len(merged)), merges


VOCAB = len(tokenizer_vocab()[0])


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `convert_hf_to_gguf.py` `LlamaModel.permute` (rotate-half -> interleaved pairs)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def hf_model(model_type: str, seed: int = 0, tie: bool = False):
    """A random transformers model of the tiny shape whose every tensor is non-trivial."""
    import torch
    import transformers

    kwargs = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD, rms_norm_eps=1e-5,
                  max_position_embeddings=256, tie_word_embeddings=tie, rope_theta=10000.0, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[model_type]
    torch.manual_seed(seed)
    model = cls[1](cls[0](**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def _random_blocks(rows: int, cols: int, kind, rng: np.random.Generator) -> np.ndarray:
    """Random but valid blocks of a type gguf cannot quantize to (the K-quants): random codes, with
    the float16 scales of Q4_K and Q6_K set to small finite values."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = lambda n, top: rng.uniform(top / 4, top, (rows, cols // block, n)).astype(np.float16).view(np.uint8)  # noqa: E731
    if kind == Q.Q4_K:  # d, dmin, scales[12], qs[128]: values d * sc * q - dmin * m, sc and m < 64, q < 16
        data[..., 0:4] = scale(2, 2e-4)
    elif kind == Q.Q6_K:  # ql[128], qh[64], scales[16] (int8), d: values d * scale * (q - 32), q < 64
        data[..., 208:210] = scale(1, 4e-5)
    return data.reshape(rows, -1)  # any other type: random bytes (for types this code must refuse)


def encode(array: np.ndarray, kind, rng: np.random.Generator) -> tuple[np.ndarray, object]:
    """(bytes or values, raw dtype) of one tensor stored as `kind`."""
    if kind == Q.F32:
        return array.astype(np.float32), None
    if kind == Q.F16:
        return array.astype(np.float16), None
    try:
        return gguf.quants.quantize(array.astype(np.float32), kind), kind
    except NotImplementedError:  # the K-quants, and types only llama.cpp writes
        return _random_blocks(array.shape[0], array.shape[1], kind, rng), kind


def write_gguf(path: Path, model, *, types: dict = TENSOR_TYPES, architecture: str | None = None, seed: int = 0,
               tokenizer: bool = True, truncate_to: int | None = None) -> Path:
    """`model` (a transformers Llama or Qwen2) as llama.cpp writes it; `architecture` overrides
    `general.architecture` (to write one this code must refuse)."""
    config = model.config
    arch = architecture or config.model_type
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(HEAD)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if tokenizer:
        tokens, kinds, merges = tokenizer_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
        writer.add_token_list(tokens)
        writer.add_token_types(kinds)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_pad_token_id(2)
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHATML)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    tensors = [("token_embd.weight", state["model.embed_tokens.weight"])]
    for i in range(config.num_hidden_layers):
        for hf_suffix, gguf_suffix in _HF_NAMES.items():
            value = state.get(f"model.layers.{i}.{hf_suffix}")
            if value is None:
                continue
            if config.model_type == "llama" and gguf_suffix.startswith(("attn_q.", "attn_k.")):
                heads = config.num_attention_heads if gguf_suffix.startswith("attn_q.") else config.num_key_value_heads
                value = llama_cpp_permute(value, heads)
            tensors.append((f"blk.{i}.{gguf_suffix}", value))
    tensors.append(("output_norm.weight", state["model.norm.weight"]))
    if not config.tie_word_embeddings:
        tensors.append(("output.weight", state["lm_head.weight"]))
    for name, value in tensors:
        kind = types[name.split(".", 2)[-1] if name.startswith("blk.") else name]
        data, raw = encode(value, kind, rng)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate_to is not None:
        with open(path, "r+b") as f:
            f.truncate(truncate_to)
    return path
