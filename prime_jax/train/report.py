"""WORKDIR/rollouts/step_N.html: a few responses, each token coloured by its implicit process reward.

Green tokens have q > 0 (the PRM likes them more than the reference does), red ones q < 0; the
intensity is |q| relative to the largest |q| on the page, and hovering a token shows its value.
Each response shows the prompt, the verifier's outcome and the ground truth.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Sequence, TypedDict


class Sample(TypedDict, total=False):
    prompt: str  # prompt text (chat-rendered)
    tokens: Sequence[str]  # response tokens as text pieces
    q: Sequence[float]  # implicit process reward of each token
    outcome: float  # verifier score in [0, 1]
    ground_truth: str
    source: str


def _colour(q: float, scale: float) -> str:
    a = min(1.0, abs(q) / scale) if scale > 0 else 0.0
    rgb = "40,167,69" if q >= 0 else "220,53,69"
    return f"rgba({rgb},{0.08 + 0.8 * a:.3f})"


def _piece(text: str) -> str:
    shown = text.replace("\n", "\u21b5\n").replace("\t", "\u21e5")
    return html.escape(shown)


def render_html(samples: Sequence[Sample], *, title: str) -> str:
    scale = max((abs(float(v)) for s in samples for v in s.get("q", ())), default=0.0)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}"
        ".resp{font-family:monospace;white-space:pre-wrap;line-height:1.7;border:1px solid #ccc;padding:.6em}"
        ".prompt{font-family:monospace;white-space:pre-wrap;color:#555;background:#f6f6f6;padding:.4em}"
        ".tok{border-radius:2px}.ok{color:#1a7f37}.bad{color:#c0392b}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Each response token is coloured by its implicit process reward "
        "q = log &pi;<sub>PRM</sub> &minus; log &pi;<sub>ref</sub>: green q &gt; 0, red q &lt; 0, "
        f"full colour at |q| = {scale:.4g}. Hover a token for its value.</p>",
    ]
    for i, s in enumerate(samples):
        outcome = float(s.get("outcome", 0.0))
        verdict = "correct" if outcome >= 1.0 else ("partial" if outcome > 0 else "wrong")
        cls = "ok" if outcome >= 1.0 else "bad"
        qs = list(s.get("q", ()))
        total = sum(float(v) for v in qs)
        parts.append(
            f"<h3>#{i + 1} <span class='{cls}'>{verdict} (outcome {outcome:.2f})</span>"
            f" &middot; ground truth <code>{html.escape(str(s.get('ground_truth', '')))}</code>"
            f" &middot; &Sigma;q = {total:.4g}"
            + (f" &middot; {html.escape(str(s['source']))}" if s.get("source") else "") + "</h3>")
        parts.append(f"<div class='prompt'>{html.escape(str(s.get('prompt', '')))}</div>")
        spans = []
        for j, tok in enumerate(s.get("tokens", ())):
            q = float(qs[j]) if j < len(qs) else 0.0
            spans.append(f"<span class='tok' style='background:{_colour(q, scale)}' "
                         f"title='q={q:.4g}'>{_piece(tok)}</span>")
        parts.append("<div class='resp'>" + "".join(spans) + "</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_rollouts_html(path: str | Path, samples: Sequence[Sample], *, title: str) -> Path:
    """Writes the page atomically (tmp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_html(samples, title=title), encoding="utf-8")
    os.replace(tmp, path)
    return path
