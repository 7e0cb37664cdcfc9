"""Tokenizer loading and chat rendering with the checkpoint's own chat template.

The prompt a policy sees must be rendered exactly as the model was trained to see it, so the
template always comes from the tokenizer files (`tokenizer_config.json` / `chat_template.jinja`),
never from a string kept here. transformers is imported lazily: it is only needed on the host
side that turns text into ids and back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

# Files a tokenizer needs; what a hub download fetches (weights are not needed for a tokenizer).
_TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "generation_config.json",
    "config.json",
]

# Classes that mean "exactly what tokenizer.json says", with no model-specific behaviour.
_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")

# Tokens that end a response in the ChatML family (Qwen2/2.5/3), besides the tokenizer's eos.
_END_OF_RESPONSE_TOKENS = ("<|im_end|>", "<|endoftext|>")


def _resolve_tokenizer_dir(path_or_repo_id: str | os.PathLike) -> Path:
    from prime_jax.models.packaged import resolve_model_folder  # packaged imports this module back

    converted = resolve_model_folder(path_or_repo_id)  # a .gguf file or a packaged model: its tokenizer
    if converted is not None:
        if not (converted / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path_or_repo_id} has no tokenizer in its GGUF metadata; name one with the "
                                    "tokenizer path setting")
        return converted
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if path.exists() or name.startswith((".", "/")) or name.count("/") != 1:
        raise FileNotFoundError(f"tokenizer path {name!r} is not a directory, a .gguf file, a packaged model nor a "
                                "hub id like 'Qwen/Qwen2.5-Math-7B'")
    from huggingface_hub import snapshot_download  # a hub id such as Qwen/Qwen2.5-Math-7B

    return Path(snapshot_download(name, allow_patterns=_TOKENIZER_FILES))


def load_tokenizer(path_or_repo_id: str | os.PathLike, *, padding_side: str = "left", **kwargs):
    """A transformers tokenizer (AutoTokenizer) from a local folder, a `.gguf` file or packaged model
    (the tokenizer its metadata describes, converted once with its weights) or a Hugging Face hub id.

    Hub ids are fetched with `huggingface_hub.snapshot_download` (tokenizer files only) and then
    loaded from the local snapshot. `padding_side` defaults to "left": prompts are left-padded
    so that every row's next token lands in the same column. Extra kwargs go to AutoTokenizer.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # start-up cost (seconds)

    folder = _resolve_tokenizer_dir(path_or_repo_id)
    config_file = folder / "tokenizer_config.json"
    declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.exists() else None
    if declared in _GENERIC_TOKENIZER_CLASSES:
        # A plain tokenizer.json tokenizer (e.g. the tiny demo's) saved beside a model's config.json:
        # AutoTokenizer would pick the model type's class (Qwen2Tokenizer), whose pre-tokenizer and
        # decoder replace ours and drop spaces. Honour the class the files declare.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder), **kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    tokenizer.padding_side = padding_side
    return tokenizer


_TOKENIZER_MODULE = "tokenization_prime_jax"
_TOKENIZER_MODULE_SOURCE = '''"""This folder's tokenizer: tokenizer.json exactly as saved (written by prime-jax)."""
from transformers import TokenizersBackend


class PrimeJaxTokenizer(TokenizersBackend):
    """No model-specific pre-tokenizer or decoder: the ones in tokenizer.json."""
'''


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """`tokenizer.save_pretrained(folder)`, made to load back as the same tokenizer through
    `AutoTokenizer.from_pretrained(folder)` beside a model's config.json.

    For a plain tokenizer.json tokenizer (the tiny demo's), AutoTokenizer would otherwise pick the
    model type's class (Qwen2Tokenizer for model_type qwen2), whose byte-level pre-tokenizer and
    decoder replace the file's and drop its spaces. An `auto_map` entry makes transformers honour
    the declared class; with `trust_remote_code=True` it loads the three-line subclass written
    beside it, which changes nothing either.
    """
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if config.get("tokenizer_class") in _GENERIC_TOKENIZER_CLASSES:
        config["tokenizer_class"] = "TokenizersBackend"
        config["auto_map"] = {"AutoTokenizer": [None, f"{_TOKENIZER_MODULE}.PrimeJaxTokenizer"]}
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (folder / f"{_TOKENIZER_MODULE}.py").write_text(_TOKENIZER_MODULE_SOURCE)


def render_chat(tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                **template_kwargs) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]) per the tokenizer's template.

    With `add_generation_prompt`, the text ends with the assistant header (for ChatML:
    `<|im_start|>assistant\\n`) so the model's next tokens are the response.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template")
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
    )
    if not isinstance(text, str):  # defensive: some versions return a list for batched input
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def encode_chat(tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                **template_kwargs) -> list[int]:
    """Token ids of `render_chat(...)`. The template already holds every special token, so none is added."""
    text = render_chat(tokenizer, messages, add_generation_prompt, **template_kwargs)
    return list(tokenizer.encode(text, add_special_tokens=False))


def eos_token_ids(tokenizer) -> list[int]:
    """Ids that end a response: the tokenizer's eos, then `<|im_end|>` / `<|endoftext|>` where they exist.

    Order is kept and duplicates dropped; the first id is the tokenizer's own eos when it has one.
    """
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in _END_OF_RESPONSE_TOKENS:
        if token in vocab and int(vocab[token]) not in ids:
            ids.append(int(vocab[token]))
    if not ids:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no end-of-response token")
    return ids
