"""Hugging Face checkpoints in and out: `config.json` + (sharded) `*.safetensors`.

Tensor names and layouts follow transformers' `Qwen2ForCausalLM` / `LlamaForCausalLM`, so a
checkpoint saved here loads unchanged in transformers and vLLM, and `Qwen/Qwen2.5-Math-7B` loads
here. A `.gguf` file or a packaged model's short name (`prime_jax.models.packaged`) is converted
once into such a folder in the cache and read from there.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from prime_jax.models.config import Qwen2Config
from prime_jax.models.packaged import PACKAGED_MODELS, resolve_model_folder
from prime_jax.models.qwen2 import Qwen2ForCausalLM
from prime_jax.parallel import is_logging_process, named_sharding, to_host

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


def _layer_tensors(config: Qwen2Config) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Our stacked layer param -> (HF name pattern with {i}, our per-layer shape); the q/k/v biases
    only when the architecture has them."""
    D, F = config.hidden_size, config.intermediate_size
    N, K, H = config.num_attention_heads, config.num_key_value_heads, config.head_size
    pre = "model.layers.{i}."
    tensors = {
        "input_norm": (pre + "input_layernorm.weight", (D,)),
        "q_kernel": (pre + "self_attn.q_proj.weight", (D, N, H)),
        "q_bias": (pre + "self_attn.q_proj.bias", (N, H)),
        "k_kernel": (pre + "self_attn.k_proj.weight", (D, K, H)),
        "k_bias": (pre + "self_attn.k_proj.bias", (K, H)),
        "v_kernel": (pre + "self_attn.v_proj.weight", (D, K, H)),
        "v_bias": (pre + "self_attn.v_proj.bias", (K, H)),
        "o_kernel": (pre + "self_attn.o_proj.weight", (N, H, D)),
        "post_norm": (pre + "post_attention_layernorm.weight", (D,)),
        "gate_kernel": (pre + "mlp.gate_proj.weight", (D, F)),
        "up_kernel": (pre + "mlp.up_proj.weight", (D, F)),
        "down_kernel": (pre + "mlp.down_proj.weight", (F, D)),
    }
    if not config.attention_bias:
        tensors = {k: v for k, v in tensors.items() if not k.endswith("_bias")}
    return tensors


def _hf_to_ours(name: str, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """HF torch layout (`Linear.weight` is [out, in]) -> ours."""
    if name.endswith("kernel") and name != "o_kernel":
        return hf.T.reshape(shape)  # [out, D] -> [D, out] -> [D, heads, H] or [D, F]/[F, D]
    if name == "o_kernel":
        return hf.T.reshape(shape)  # [D, N*H] -> [N*H, D] -> [N, H, D]
    return hf.reshape(shape)


def _hf_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The transformers shape of one layer's tensor whose shape is `shape` in our layout."""
    if name == "o_kernel":
        return (shape[-1], math.prod(shape[:-1]))  # [D, N*H]
    if name.endswith("kernel"):
        return (math.prod(shape[1:]), shape[0])  # Linear.weight: [out, in]
    return (math.prod(shape),)  # biases [heads*H], norms [D]


def _ours_to_hf(name: str, ours: np.ndarray) -> np.ndarray:
    if name == "o_kernel":
        return ours.reshape(-1, ours.shape[-1]).T
    if name.endswith("kernel"):
        return ours.reshape(ours.shape[0], -1).T
    return ours.reshape(-1)


class _CheckpointReader:
    """Reads tensors by name from one or many safetensors files (via the index file)."""

    def __init__(self, folder: Path):
        index = folder / _INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / _SINGLE_FILE).exists():
            with safe_open(folder / _SINGLE_FILE, "np") as f:
                weight_map = {k: _SINGLE_FILE for k in f.keys()}
        else:
            raise FileNotFoundError(f"no {_INDEX_FILE} or {_SINGLE_FILE} in {folder}")
        self.folder, self.weight_map, self._open = folder, weight_map, {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str, expected_shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.weight_map:
            raise KeyError(f"checkpoint {self.folder} has no tensor {name!r} (expected shape {expected_shape})")
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = safe_open(self.folder / file, "np")
        handle = self._open[file]
        array = handle.get_tensor(name)  # bfloat16 arrives as an ml_dtypes numpy array
        # Exact shape, not just the element count: a transposed [in, out] weight must not load.
        if tuple(array.shape) != tuple(expected_shape):
            raise ValueError(
                f"tensor {name!r} in {self.folder / file}: checkpoint shape {tuple(array.shape)} does not match "
                f"the shape {tuple(expected_shape)} that config.json implies"
            )
        return array


def _resolve(path_or_repo_id: str | os.PathLike) -> Path:
    """The local folder of a model: a folder as is, a `.gguf` file or packaged short name converted
    (cached), a hub id downloaded by `huggingface_hub`."""
    converted = resolve_model_folder(path_or_repo_id)
    if converted is not None:
        return converted
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    if path.exists() or str(path_or_repo_id).startswith((".", "/")) or str(path_or_repo_id).count("/") != 1:
        raise FileNotFoundError(f"model path {str(path_or_repo_id)!r} is not a directory holding config.json, a "
                                f".gguf file, a hub id nor a packaged model ({', '.join(PACKAGED_MODELS)})")
    from huggingface_hub import snapshot_download  # a hub id such as Qwen/Qwen2.5-Math-7B

    return Path(snapshot_download(str(path_or_repo_id), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))


def load_config(path_or_repo_id, **overrides) -> Qwen2Config:
    """The `Qwen2Config` of a model folder, `.gguf` file, packaged short name or hub id."""
    folder = _resolve(path_or_repo_id)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{folder} has no config.json")
    return Qwen2Config.from_hf_dict(json.loads(config_file.read_text()), **overrides)


def from_pretrained(path_or_repo_id, *, dtype: str | None = None, param_dtype: str | None = None,
                    mesh=None, remat: str | None = None, fused_mlp: bool | None = None) -> Qwen2ForCausalLM:
    """Loads a Qwen2 or Llama checkpoint: a local HF folder, a `.gguf` file, a packaged model's short
    name (`prime_jax.models.packaged`, e.g. "smollm2-135m-instruct") or a Hugging Face hub id.

    With a mesh, each tensor is converted and placed with its own sharding, one at a time, so the
    host never holds more than one full tensor beyond the shards already on devices.
    """
    folder = _resolve(path_or_repo_id)
    overrides = {k: v for k, v in dict(dtype=dtype, param_dtype=param_dtype, remat=remat).items() if v}
    if fused_mlp is not None:
        overrides["fused_mlp"] = fused_mlp
    config = load_config(folder, **overrides)
    reader = _CheckpointReader(folder)
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    weight_dtype = config.weight_dtype

    def place(value: np.ndarray, logical_axes):
        value = np.asarray(value).astype(weight_dtype)
        if mesh is None:
            return jnp.asarray(value)
        return jax.device_put(value, named_sharding(mesh, logical_axes, value.shape))

    def load_stacked(name: str, variable):
        pattern, shape = _layer_tensors(config)[name]
        per_layer = [
            _hf_to_ours(name, reader.get(pattern.format(i=i), _hf_shape(name, shape)), shape)
            for i in range(config.num_hidden_layers)
        ]
        return place(np.stack(per_layer), variable.logical_axes)

    top_level = {
        "embed_tokens": ("model.embed_tokens.weight", lambda a: a),
        "final_norm": ("model.norm.weight", lambda a: a),
        "lm_head": ("lm_head.weight", lambda a: a.T),
    }
    flat = dict(nnx.to_flat_state(abstract_state))
    loaded = {}
    for path, variable in flat.items():
        shape = tuple(variable.get_value().shape)
        if path[0] == "layers":
            value = load_stacked(path[1], variable)
        else:
            hf_name, convert = top_level[path[0]]
            hf_shape = shape[::-1] if path[0] == "lm_head" else shape
            value = place(convert(reader.get(hf_name, hf_shape)).reshape(shape), variable.logical_axes)
        if tuple(value.shape) != shape:
            raise ValueError(f"tensor for {'.'.join(map(str, path))}: got shape {tuple(value.shape)}, model needs {shape}")
        loaded[path] = variable.replace(value)
    state = nnx.from_flat_state(loaded)
    return nnx.merge(graphdef, state)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_pretrained(model: Qwen2ForCausalLM, path, *, max_shard_bytes: int = 2 * 1024**3,
                    dtype: str | None = None, generation_config: dict | None = None,
                    token_ids: dict | None = None) -> None:
    """Writes `config.json` + safetensors shards (+ index when more than one) that transformers loads,
    and `generation_config.json` when `generation_config` is given.

    Tensors are gathered to the host one at a time. `dtype` (e.g. "bfloat16") defaults to the
    model's param dtype. `token_ids` ({"eos_token_id": ..., ...}) fill ids the model's config
    lacks. Every file gets the usual mode (0644 under umask 022).
    """
    config = model.config
    folder = Path(path)
    # Several processes: all gather each tensor (a collective), process 0 alone writes.
    writer = is_logging_process()
    if writer:
        folder.mkdir(parents=True, exist_ok=True)
    out_dtype = jnp.dtype(dtype or config.param_dtype)
    count, weight_map, total = _write_shards(_hf_tensors(model, out_dtype), folder, writer, max_shard_bytes)
    if not writer:
        return
    _name_shards(folder, count, weight_map, total)
    hf_config = config.to_hf_dict()
    for key, value in (token_ids or {}).items():
        if value is not None:
            hf_config.setdefault(key, value)
    # The dtype the tensors were written in (transformers 5 reads `dtype`, older readers and vLLM
    # `torch_dtype`); `dtype="auto"` loaders pick it from here.
    hf_config["torch_dtype"] = hf_config["dtype"] = out_dtype.name
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config, indent=2))


def _hf_tensors(model: Qwen2ForCausalLM, out_dtype) -> list[tuple[str, Callable[[], np.ndarray]]]:
    """(Hugging Face name, a function that gathers the tensor to the host in `out_dtype`), in file order."""
    config = model.config

    def host(x) -> np.ndarray:  # collective on several processes: every process calls save_pretrained
        return to_host(jnp.asarray(x, out_dtype))

    tensors: list[tuple[str, Callable[[], np.ndarray]]] = [
        ("model.embed_tokens.weight", lambda: host(model.embed_tokens.get_value()))]
    layer_names = _layer_tensors(config)
    for i in range(config.num_hidden_layers):
        for name, (pattern, _) in layer_names.items():
            tensors.append((pattern.format(i=i),
                            lambda name=name, i=i: _ours_to_hf(name, host(getattr(model.layers, name).get_value()[i]))))
    tensors.append(("model.norm.weight", lambda: host(model.final_norm.get_value())))
    if not config.tie_word_embeddings:
        tensors.append(("lm_head.weight", lambda: host(model.lm_head.get_value()).T))
    return tensors


def _write_shards(tensors, folder: Path, writer: bool, max_shard_bytes: int) -> tuple[int, dict[str, int], int]:
    """Fetches the tensors one at a time into shards of at most `max_shard_bytes` (one tensor may
    exceed it), written as `tmp-<k>.safetensors` when `writer`; returns (shard count, {name: shard
    index}, total bytes)."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    weight_map: dict[str, int] = {}
    files: list[str] = []
    total = 0

    def flush():
        files.append(f"shard-{len(files) + 1}")
        if writer:
            save_file({k: np.ascontiguousarray(v) for k, v in shards[-1].items()},
                      str(folder / f"tmp-{len(files)}.safetensors"), metadata={"format": "pt"})
        shards[-1].clear()  # written: host memory holds one shard at a time

    for name, fetch in tensors:
        array = fetch()
        nbytes = array.nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
            shards.append({})
            size = 0
        shards[-1][name] = array
        weight_map[name] = len(shards) - 1
        size += nbytes
        total += nbytes
    flush()
    return len(files), weight_map, total


def _name_shards(folder: Path, count: int, weight_map: dict[str, int], total: int) -> None:
    """Renames the written shards to their final names (replacing an earlier export's) and writes
    the index when there is more than one."""
    names = [_SINGLE_FILE] if count == 1 else [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]
    for old in folder.glob("model*.safetensors"):
        old.unlink()
    for k, final in enumerate(names):
        os.replace(folder / f"tmp-{k + 1}.safetensors", folder / final)
        os.chmod(folder / final, 0o666 & ~_umask())  # safetensors creates its files 0600
    index = folder / _INDEX_FILE
    if count > 1:
        index.write_text(json.dumps({"metadata": {"total_size": total},
                                     "weight_map": {n: names[s] for n, s in weight_map.items()}}, indent=2))
    elif index.exists():
        index.unlink()
