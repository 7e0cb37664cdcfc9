"""Tokenizer loading, ChatML rendering and end-of-response ids, on real Qwen tokenizer files.

The fixture (tests/fixtures/qwen3_tokenizer, see its README) holds the Qwen3 release of the Qwen
tokenizer: Qwen2.5's BPE and special-token ids plus four tokens, and a template that renders
system/user prompts exactly as Qwen2.5's does.
"""

from pathlib import Path

import pytest

from prime_jax.models.tokenizer import encode_chat, eos_token_ids, load_tokenizer, render_chat

FIXTURE = Path(__file__).parent / "fixtures" / "qwen3_tokenizer"

# Qwen2/Qwen2.5's special tokens, in id order from 151643 (shared by the fixture).
QWEN25_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]

MESSAGES = [
    {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
    {"role": "user", "content": "Find $x$ if $2x + 3 = 11$."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(FIXTURE)


def test_loads_real_qwen_vocabulary(tokenizer):
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in QWEN25_SPECIAL_TOKENS] == list(range(151643, 151643 + len(QWEN25_SPECIAL_TOKENS)))
    assert tokenizer.padding_side == "left"
    # Byte-level BPE: a known split of plain text (ids are the same in Qwen2.5).
    assert tokenizer.encode("Hello world", add_special_tokens=False) == [9707, 1879]


def test_render_chat_is_exact_chatml(tokenizer):
    text = render_chat(tokenizer, MESSAGES)
    assert text == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\nFind $x$ if $2x + 3 = 11$.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = render_chat(tokenizer, MESSAGES, add_generation_prompt=False)
    assert text == without + "<|im_start|>assistant\n"


def test_encode_chat_round_trips(tokenizer):
    text = render_chat(tokenizer, MESSAGES)
    ids = encode_chat(tokenizer, MESSAGES)
    assert all(isinstance(i, int) for i in ids)
    vocab = tokenizer.get_vocab()
    im_start, im_end = vocab["<|im_start|>"], vocab["<|im_end|>"]
    assert ids[0] == im_start and ids.count(im_start) == 3 and ids.count(im_end) == 2
    assert ids[-3:] == [im_start] + tokenizer.encode("assistant\n", add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    # Same ids as transformers' own tokenizing path.
    assert ids == list(tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)["input_ids"])


@pytest.mark.parametrize("text", [
    "The answer is $\\boxed{\\frac{3}{4}}$.\n\n",
    "  leading spaces, tabs\tand ünïcödé — 数学 ∑_{i=1}^n i² 🙂",
    "<|im_end|>",
])
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_eos_token_ids(tokenizer):
    ids = eos_token_ids(tokenizer)
    assert ids == [151645, 151643]  # eos (<|im_end|>) first, then <|endoftext|>
    assert ids[0] == tokenizer.eos_token_id


def test_hub_id_goes_through_snapshot_download(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(FIXTURE)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)  # no local folder called Qwen/
    tok = load_tokenizer("Qwen/Qwen2.5-Math-7B")
    assert [c[0] for c in calls] == ["Qwen/Qwen2.5-Math-7B"]
    assert "tokenizer.json" in calls[0][1]["allow_patterns"]
    assert tok.eos_token == "<|im_end|>"


def test_missing_tokenizer_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nope")


def test_plain_tokenizer_beside_a_qwen2_config_keeps_its_own_class(tmp_path):
    """The tiny demo tokenizer saved in a model export folder must not turn into Qwen2Tokenizer."""
    import json

    from prime_jax.data import build_tiny_tokenizer
    from prime_jax.models.tokenizer import load_tokenizer

    build_tiny_tokenizer(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    tokenizer = load_tokenizer(tmp_path)
    text = "Compute (3+4)*2\n3+4=7\nthe answer is \\boxed{14}"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
