"""GGUF checkpoints in: a `.gguf` file becomes a Hugging Face folder, once, in a cache.

`converted_folder(path)` reads the file with the `gguf` package (pure Python + numpy), takes the
architecture from its metadata (llama or qwen2; anything else is refused in one line),
dequantizes every tensor `gguf.quants.dequantize` can (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, the
K-quants, the IQ types), undoes llama.cpp's q/k row permutation for Llama, builds the tokenizer
(vocabulary, merges, special tokens, chat template) from the metadata, and writes

    config.json, model.safetensors (or shards + index), generation_config.json,
    tokenizer.json, tokenizer_config.json, chat_template.jinja, gguf_source.json

into `<cache>/gguf/<file stem>-<key>/`, the key naming the file (resolved path, size, mtime) and
this converter's version. Everything downstream (`from_pretrained`, `load_tokenizer`, the memory
plan, export) then reads an ordinary HF folder, and the second load skips the conversion.

Weights are stored in float32 (a dequantized block is exact in float32, not in 16 bits; F16 and
BF16 tensors keep their dtype), so a converted model takes 4 bytes per parameter on disk.
The cache is `prime_jax.cache.cache_root()`: `$PRIME_JAX_CACHE`, else `$XDG_CACHE_HOME/prime_jax`, else
`~/.cache/prime_jax`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from prime_jax.cache import cache_root
from prime_jax.models.config import Qwen2Config, UnsupportedModelError

logger = logging.getLogger(__name__)

CONVERTER_VERSION = 1  # part of the cache key: bump when the converted files would change
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")  # general.architecture -> the same model_type
SOURCE_FILE = "gguf_source.json"
_MAX_SHARD_BYTES = 2 * 1024**3

# GGUF tensor names (llama.cpp) -> transformers names; "{i}" is the layer.
_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def is_gguf_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".gguf")


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def open_gguf(path: str | os.PathLike):
    """A `gguf.GGUFReader` of `path`; a missing, truncated or corrupt file raises one line."""
    import gguf  # optional dependency (GGUF files only)

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise UnsupportedModelError(
            f"GGUF file {str(path)!r} is truncated or corrupt ({type(e).__name__}: {' '.join(str(e).split())})") from None


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def architecture(reader, path: str | os.PathLike = "") -> str:
    """`general.architecture` of a supported GGUF; raises UnsupportedModelError otherwise."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF {str(path) or 'file'} has architecture {arch!r}, which is not supported "
            f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})")
    return arch


def hf_config(reader, path: str | os.PathLike = "") -> dict[str, Any]:
    """The transformers `config.json` dict of a GGUF's model, from its metadata (and whether it
    has an `output.weight`, i.e. an untied head)."""
    arch = architecture(reader, path)

    def get(key, default=None):
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise UnsupportedModelError(f"GGUF {str(path) or 'file'} lacks the metadata key {arch}.{key}")
        return value

    scaling = get("rope.scaling.type", "none")
    if scaling != "none" or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise UnsupportedModelError(f"GGUF {str(path) or 'file'}: rope scaling ({scaling}) is not supported "
                                    "(only default RoPE)")
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // heads))
    rotary = int(get("rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise UnsupportedModelError(f"GGUF {str(path) or 'file'}: partial rotary embedding ({rotary} of "
                                    f"{head_dim} dimensions) is not supported")
    names = {t.name for t in reader.tensors}
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise UnsupportedModelError(f"GGUF {str(path) or 'file'} has no token_embd.weight tensor")
    vocab = int(get("vocab_size", 0)) or int(embed.shape[-1])
    config = {
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": arch == "qwen2" or "blk.0.attn_q.bias" in names,
    }
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        value = _field(reader, f"tokenizer.ggml.{name}")
        if value is not None:
            config[key] = int(value)
    return config


def model_config(path: str | os.PathLike, **overrides) -> Qwen2Config:
    """The model's `Qwen2Config` without converting it: the converted folder's config.json when
    the cache has it, else the GGUF's metadata (no tensor is read)."""
    folder = _cached_folder(path)
    if (folder / SOURCE_FILE).is_file():
        return Qwen2Config.from_hf_dict(json.loads((folder / "config.json").read_text()), **overrides)
    reader = open_gguf(path)
    return Qwen2Config.from_hf_dict(hf_config(reader, path), **overrides)


def _hf_name(gguf_name: str, path) -> str:
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _PER_LAYER:
        return f"model.layers.{parts[1]}.{_PER_LAYER[parts[2]]}"
    raise UnsupportedModelError(f"GGUF {path}: tensor {gguf_name!r} is not part of a llama/qwen2 decoder")


def _check_dequantizable(reader, path) -> None:
    """Every tensor type dequantizes (tried on one row of the first tensor of each type), before
    any of the slow work."""
    import gguf  # optional dependency (GGUF files only)

    tried = set()
    for tensor in reader.tensors:
        kind = tensor.tensor_type
        if kind in tried:
            continue
        tried.add(kind)
        try:
            gguf.quants.dequantize(np.asarray(tensor.data[:1]), kind)
        except NotImplementedError:
            raise UnsupportedModelError(
                f"GGUF {path}: tensor {tensor.name} is stored as {kind.name}, which the gguf package "
                f"{version('gguf')} cannot dequantize") from None


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k permutation of a Llama checkpoint (its `convert_hf_to_gguf.py`
    reorders each head's rows from rotate-half to interleaved RoPE pairs).

    weight `[heads * H, ...]` (a weight `[out, in]` or a bias `[out]`) -> the same shape, each
    head's rows `(i, pair)` for i < H/2 put back as `(pair, i)` (transformers'
    `_reverse_permute_weights`)."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensor(reader_tensor, config: dict[str, Any]) -> np.ndarray:
    """One tensor dequantized, in transformers' layout (`Linear.weight` `[out, in]`)."""
    import gguf  # optional dependency (GGUF files only)

    kind = reader_tensor.tensor_type
    shape = tuple(int(d) for d in reversed(reader_tensor.shape))  # GGUF lists dims innermost first
    if kind == gguf.GGMLQuantizationType.F16:
        array = np.asarray(reader_tensor.data).view(np.float16)
    elif kind == gguf.GGMLQuantizationType.BF16:
        import ml_dtypes  # optional: bf16 tensors only

        array = gguf.quants.dequantize(reader_tensor.data, kind).astype(ml_dtypes.bfloat16)  # exact
    else:
        array = gguf.quants.dequantize(reader_tensor.data, kind).astype(np.float32, copy=False)
    array = np.ascontiguousarray(array.reshape(shape))
    name = reader_tensor.name
    if config["model_type"] == "llama" and (".attn_q." in name or ".attn_k." in name):
        heads = config["num_attention_heads"] if ".attn_q." in name else config["num_key_value_heads"]
        array = unpermute_rows(array, heads)
    return array


# ----------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------
def build_tokenizer(reader, path=""):
    """The GGUF's tokenizer as a transformers tokenizer (None when the file has none).

    transformers' own GGUF tokenizer builder (`convert_gguf_tokenizer`, what
    `AutoTokenizer.from_pretrained(..., gguf_file=...)` runs) fed with the metadata as `gguf` reads
    it: transformers' GGUF file reader needs PyTorch, which prime-jax does not.
    """
    from transformers import TokenizersBackend  # start-up cost (seconds)
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    if "tokenizer.ggml.model" not in reader.fields:
        return None
    grouped = {group: {name: _field(reader, f"tokenizer.{key}") for key, name in renames.items()
                       if f"tokenizer.{key}" in reader.fields}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokens, settings = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokens.get("tokenizer_type") == "llama":  # as transformers: sentencepiece vocabularies add BOS by default
        settings.setdefault("add_bos_token", True)
    vocabulary = tokens["tokens"]
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unk_token_id"),
                      ("pad_token", "pad_token_id")):
        settings[name] = vocabulary[tokens[key]] if tokens.get(key) is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(_field(reader, "general.architecture"), tokens)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(f"GGUF {path}: its tokenizer cannot be built ({' '.join(str(e).split())})") from None
    return TokenizersBackend(tokenizer_object=backend, **settings, **extra)


# ----------------------------------------------------------------------------------------------
# Converting and caching
# ----------------------------------------------------------------------------------------------
def convert(path: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Writes the HF folder of a GGUF file into `folder` (see the module docstring)."""
    path, folder = Path(path).expanduser(), Path(folder)
    reader = open_gguf(path)
    hf = hf_config(reader, path)
    config = Qwen2Config.from_hf_dict(hf)  # refuses what the decoder cannot run, before the slow part
    _check_dequantizable(reader, path)
    for tensor in reader.tensors:
        _hf_name(tensor.name, path)  # an unknown tensor is refused before anything is written
    tokenizer = build_tokenizer(reader, path)
    folder.mkdir(parents=True, exist_ok=True)

    _write_tensors(reader, hf, folder, path)
    ids = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
    hf_out = {**config.to_hf_dict(), **ids, "torch_dtype": "float32", "dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(hf_out, indent=2))
    if ids:
        (folder / "generation_config.json").write_text(json.dumps(ids, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    stat = path.stat()
    (folder / SOURCE_FILE).write_text(json.dumps({
        "gguf": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
        "architecture": hf["model_type"], "converter_version": CONVERTER_VERSION,
        "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
        "tokenizer": tokenizer is not None}, indent=2))
    return folder


def _write_tensors(reader, hf: dict[str, Any], folder: Path, path) -> None:
    """model.safetensors, or shards of at most 2 GiB + the index: each shard is written as soon as
    it is full, so memory holds one shard of dequantized tensors at a time."""
    from safetensors.numpy import save_file  # conversion only

    shard_of: dict[str, int] = {}
    shard: dict[str, np.ndarray] = {}
    count, size = 0, 0

    def flush():
        nonlocal count, shard, size
        save_file(shard, str(folder / f".shard-{count}.safetensors"), metadata={"format": "pt"})
        count, shard, size = count + 1, {}, 0

    for tensor in reader.tensors:
        array = _tensor(tensor, hf)
        if shard and size + array.nbytes > _MAX_SHARD_BYTES:
            flush()
        name = _hf_name(tensor.name, path)
        shard[name], shard_of[name] = array, count
        size += array.nbytes
    flush()
    names = ["model.safetensors"] if count == 1 else [f"model-{k + 1:05d}-of-{count:05d}.safetensors"
                                                       for k in range(count)]
    for k, final in enumerate(names):
        os.replace(folder / f".shard-{k}.safetensors", folder / final)
    if count > 1:
        weight_map = {name: names[k] for name, k in shard_of.items()}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                        indent=2))


def _usual_modes(folder: Path) -> None:
    """The modes of ordinary files and folders (0644/0755 under umask 022): `mkdtemp` makes the folder
    0700 and safetensors its files 0600."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for file in folder.iterdir():
        os.chmod(file, 0o666 & ~mask)


def cache_key(path: str | os.PathLike) -> str:
    """Names one version of one file: its resolved path, size, mtime and the converter's version."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    text = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERTER_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cached_folder(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """Where the conversion of the GGUF file `path` lives in the cache (it may not exist yet)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    root = Path(cache).expanduser() if cache else cache_root()
    return root / "gguf" / f"{path.stem}-{cache_key(path)}"


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive `flock` on `path` (created if needed): processes (pytest-xdist workers, a
    host's processes) that want the same cache entry at once wait for the first one's result
    instead of doing the work twice. Where locks do not reach (hosts sharing a network file
    system), the atomic rename of the result still keeps one complete copy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def converted_folder(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """The HF folder of a GGUF file: from the cache, else converted into it, once (`file_lock`)
    and atomically (a temporary folder renamed into place, so an interrupted conversion leaves
    nothing half-written)."""
    path = Path(path).expanduser()
    target = _cached_folder(path, cache)
    if (target / SOURCE_FILE).is_file():
        return target
    with file_lock(target.parent / f".{target.name}.lock"):
        if (target / SOURCE_FILE).is_file():  # converted while we waited
            return target
        logger.info("converting %s to a Hugging Face folder in %s (once; later loads read it)", path, target)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            convert(path, scratch)
            _usual_modes(scratch)
            try:
                os.rename(scratch, target)
            except OSError:  # another host finished first: keep its folder
                if not (target / SOURCE_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target
