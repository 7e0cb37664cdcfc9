"""Prompt rendering: problems -> token ids with the tokenizer's own chat template."""
from __future__ import annotations

from typing import Any, Sequence

from .problems import Problem, SkipStats


def render_prompt_texts(problems: Sequence[Problem], tokenizer: Any) -> list[str]:
    """The chat-template text of each problem, generation prompt included."""
    return [
        tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)
        for p in problems
    ]


def render_prompts(
    problems: Sequence[Problem],
    tokenizer: Any,
    max_prompt_tokens: int | None,
    *,
    chunk_size: int = 1024,
) -> tuple[list[list[int]], list[Problem], SkipStats]:
    """Token ids of each problem's prompt, rendered with ``tokenizer.apply_chat_template(
    messages, add_generation_prompt=True)``.

    The template is rendered to text and then encoded without extra special tokens, which is
    what ``apply_chat_template(..., tokenize=True)`` does, in batches. Prompts longer than
    ``max_prompt_tokens`` (``None``: no limit) are dropped and counted as
    ``"prompt_too_long"``; a template that rejects a problem's messages counts as
    ``"template_error"``.

    Returns ``(ids, kept_problems, stats)``; ``ids[i]`` belongs to ``kept_problems[i]``.
    """
    stats = SkipStats(source="render_prompts")
    ids_out: list[list[int]] = []
    kept: list[Problem] = []
    for start in range(0, len(problems), chunk_size):
        chunk = problems[start : start + chunk_size]
        texts, ok = [], []
        for p in chunk:
            try:
                texts.append(
                    tokenizer.apply_chat_template(
                        p.messages, add_generation_prompt=True, tokenize=False
                    )
                )
                ok.append(p)
            except Exception:  # jinja TemplateError and friends
                stats.skip("template_error", f"id {p.id}")
        if not texts:
            continue
        enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for p, ids in zip(ok, enc):
            if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                stats.skip("prompt_too_long", f"id {p.id} ({len(ids)} tokens)")
                continue
            ids_out.append(list(ids))
            kept.append(p)
            stats.keep()
    stats.log()
    return ids_out, kept, stats
