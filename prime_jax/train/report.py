"""WORKDIR/rollouts/step_N.html: held-out responses, each token coloured by its implicit process reward.

Green tokens have q > 0 (the PRM likes them more than the reference does), red ones q < 0; the
intensity is |q| relative to the 90th percentile of |q| over the step's responses (larger values
are shown at full colour), so that one outlier token does not wash out all the others; a legend
shows the scale, and hovering a token shows its value. At step 0 the PRM equals the reference, so
every q is 0 and the page says so. Each response shows the prompt, the verifier's outcome and the
ground truth; `mix_outcomes` picks a mix of correct and wrong responses to show
(`logging.html_samples` of them), `logging.html_per_page` to a page: step_N.html, then
step_N_p2.html, ..., linked to each other. The page heads with how well the PRM ranked at that
step (its `prm/dpo_accuracy` on the step's fresh samples) and how to read Σq.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Callable, Sequence, TypeVar, TypedDict

import numpy as np

T = TypeVar("T")


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


def colour_scale(samples: Sequence[Sample], percentile: float = 90.0) -> float:
    """|q| shown at full colour: the `percentile` of |q| over the page's nonzero values (0: all q are 0)."""
    values = np.abs(np.asarray([float(v) for s in samples for v in s.get("q", ())], np.float64))
    values = values[values > 0]
    return float(np.percentile(values, percentile)) if values.size else 0.0


def mix_outcomes(items: Sequence[T], outcome: Callable[[T], float], k: int) -> list[T]:
    """Up to `k` items alternating correct (outcome >= 1) and not, in their order, filling up with
    whichever kind is left, so a page shows both what the PRM rewards and what it penalises."""
    right = [x for x in items if outcome(x) >= 1.0]
    wrong = [x for x in items if outcome(x) < 1.0]
    out = []
    while len(out) < k and (right or wrong):
        for group in (right, wrong):
            if group and len(out) < k:
                out.append(group.pop(0))
    return out


def _legend(scale: float) -> str:
    if scale <= 0:
        return ("<p>Every q is 0: the PRM still equals the reference (this is the start of the run, before any "
                "PRM update), so no token is coloured yet.</p>")
    stops = [-scale, -scale / 2, 0.0, scale / 2, scale]
    cells = "".join(f"<span class='tok' style='background:{_colour(v, scale)};padding:0 .6em'>{v:+.3g}</span>"
                    for v in stops)
    return (f"<p>Legend (q per token): {cells} &nbsp; |q| &ge; {scale:.3g} (the page's 90th percentile of |q|) is "
            "shown at full colour.</p>")


def _piece(text: str) -> str:
    shown = text.replace("\n", "\u21b5\n").replace("\t", "\u21e5")
    return html.escape(shown)


def _ranking_line(ranking: float | None, ranking_note: str) -> str:
    """How to read Σq, and how well the PRM ranked at this step (its prm/dpo_accuracy)."""
    guide = ("How to read it: &Sigma;q is the PRM's total reward for a response; between responses to one prompt, "
             "the higher &Sigma;q is the one the PRM thinks right")
    if ranking is None or ranking != ranking:
        return f"<p class='rank'>{guide}. {html.escape(ranking_note or 'No ranking was measured at this step.')}</p>"
    return (f"<p class='rank'>{guide}. At this step it put the right one above the wrong one in <b>{ranking:.0%}</b> "
            f"of its fresh samples' right/wrong pairs (<code>prm/dpo_accuracy</code>; 50% is chance), so a wrong "
            f"answer with a higher &Sigma;q than a right one is expected in about {1 - ranking:.0%} of pairs.</p>")


def _nav(page: int, pages: int, name: Callable[[int], str], total: int) -> str:
    """Links to the step's other pages, and which settings choose how many responses there are."""
    settings = (f"{total} responses (<code>--config.logging.html_samples</code>), "
                "<code>--config.logging.html_per_page</code> to a page")
    if pages <= 1:
        return f"<p class='nav'>{settings}.</p>"
    links = [f"<b>{k}</b>" if k == page else f"<a href='{name(k)}'>{k}</a>" for k in range(1, pages + 1)]
    prev = f"<a href='{name(page - 1)}'>&lsaquo; previous</a> " if page > 1 else ""
    nxt = f" <a href='{name(page + 1)}'>next &rsaquo;</a>" if page < pages else ""
    return f"<p class='nav'>{prev}page {' '.join(links)} of {pages}{nxt} &middot; {settings}.</p>"


def render_html(samples: Sequence[Sample], *, title: str, ranking: float | None = None, ranking_note: str = "",
                scale: float | None = None, page: int = 1, pages: int = 1, first: int = 0,
                page_name: Callable[[int], str] | None = None, total: int | None = None) -> str:
    """One page: `samples` (numbered from `first` + 1, of `total`), coloured on `scale` (default:
    theirs), the PRM's ranking at the step (`ranking`, prm/dpo_accuracy; None: `ranking_note` says
    why), links to the other pages (page of pages, `page_name(k)` is page k's file name)."""
    scale = colour_scale(samples) if scale is None else scale
    nav = _nav(page, pages, page_name or (lambda k: f"page_{k}.html"), len(samples) if total is None else total)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}"
        ".resp{font-family:monospace;white-space:pre-wrap;line-height:1.7;border:1px solid #ccc;padding:.6em}"
        ".prompt{font-family:monospace;white-space:pre-wrap;color:#555;background:#f6f6f6;padding:.4em}"
        ".tok{border-radius:2px}.ok{color:#1a7f37}.bad{color:#c0392b}.rank{background:#eef4ff;padding:.4em}"
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _ranking_line(ranking, ranking_note),
        "<p>Each response token is coloured by its implicit process reward "
        "q = log &pi;<sub>PRM</sub> &minus; log &pi;<sub>ref</sub>: green q &gt; 0, red q &lt; 0. "
        "Hover a token for its value.</p>",
        _legend(scale),
        nav,
    ]
    for i, s in enumerate(samples, first):
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
    parts.append(nav)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_rollouts_html(path: str | Path, samples: Sequence[Sample], *, title: str, per_page: int = 0,
                        ranking: float | None = None, ranking_note: str = "") -> list[Path]:
    """Writes `samples` as pages of `per_page` (0: one page): `path` (step_N.html), then
    step_N_p2.html, ..., each atomically (tmp file + rename), all coloured on one scale. Returns the
    pages' paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    per_page = per_page or max(1, len(samples))
    pages = max(1, -(-len(samples) // per_page))
    name = lambda k: path.name if k == 1 else f"{path.stem}_p{k}{path.suffix}"  # noqa: E731
    scale = colour_scale(samples)
    written = []
    for k in range(1, pages + 1):
        first = (k - 1) * per_page
        page = path.with_name(name(k))
        tmp = page.with_suffix(".html.tmp")
        tmp.write_text(render_html(samples[first:first + per_page], title=title, ranking=ranking,
                                   ranking_note=ranking_note, scale=scale, page=k, pages=pages, first=first,
                                   page_name=name, total=len(samples)), encoding="utf-8")
        os.replace(tmp, page)
        written.append(page)
    return written
