"""A tiny character-level tokenizer with a Qwen2.5-style ChatML template, for CPU demo runs.

Vocabulary (102 ids, fixed order, so the tokenizer is deterministic):

* 0 ``<|endoftext|>`` (pad), 1 ``<|im_start|>``, 2 ``<|im_end|>`` (eos), 3 ``<unk>``
* 4 ``"\\t"``, 5 ``"\\n"``, 6..100 the 95 printable ASCII characters ``" "`` .. ``"~"``
* 101 ``"\\boxed{"`` (one token, so the answer marker is cheap to produce)

Any ASCII text (tabs/newlines included) encodes and decodes losslessly; other characters map to
``<unk>``. The chat template has Qwen2.5's ChatML structure: ``<|im_start|>{role}\\n{content}
<|im_end|>\\n`` per message and ``<|im_start|>assistant\\n`` as the generation prompt; unlike
Qwen2.5 it adds no default system message (it would cost ~70 tokens here).
"""
from __future__ import annotations

import os
import string

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
BOXED_PIECE = "\\boxed{"

#: ChatML, as Qwen2.5's template renders messages without tools (no default system message).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def tiny_vocab() -> dict[str, int]:
    """Token -> id, in the fixed order described in the module docstring."""
    printable = [chr(c) for c in range(32, 127)]
    assert len(printable) == 95 and set(string.digits) <= set(printable)
    tokens = [PAD_TOKEN, IM_START, IM_END, UNK_TOKEN, "\t", "\n", *printable, BOXED_PIECE]
    return {t: i for i, t in enumerate(tokens)}


def _build_backend():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers  # start-up cost: built once per run

    tok = Tokenizer(models.WordLevel(vocab=tiny_vocab(), unk_token=UNK_TOKEN))
    # Every character is its own piece, except "\boxed{" which stays whole.
    tok.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"\\boxed\{|[\s\S]"), behavior="isolated", invert=False
    )
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (*SPECIAL_TOKENS, UNK_TOKEN)]
    )
    return tok


def build_tiny_tokenizer(save_dir: str | os.PathLike | None = None):
    """The tiny tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    With ``save_dir`` it is also saved there (``tokenizer.json``, ``tokenizer_config.json``, the
    chat template), loadable with ``transformers.AutoTokenizer.from_pretrained(save_dir)``.
    """
    from transformers import PreTrainedTokenizerFast  # start-up cost (seconds)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(),
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=None,
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
        padding_side="right",
    )
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
        tokenizer.save_pretrained(os.fspath(save_dir))
    return tokenizer
