"""The memory plan of every hardware preset, and the docs' numbers generated from it.

    python benchmarks/plan_presets.py            # plan every preset (minutes), write docs/plan_presets.json,
                                                 # and regenerate the marked blocks of README.md and docs/scale_out.md
    python benchmarks/plan_presets.py --render   # only regenerate the blocks from docs/plan_presets.json

Each preset is planned exactly as a user plans it, `python -m prime_jax.plan
--config=configs/qwen7b.py:<preset> --json_out=...` (fake CPU devices, the full 7B programs), plus
the variants the docs discuss (the loop's default `rollout.oversample=1.5` on the presets that set
1.0). The README's planned peaks and docs/scale_out.md's tables and summary sit between
`<!-- plan_presets:<block> -->` and `<!-- /plan_presets:<block> -->` markers and are rendered from
the saved reports only; tests/test_plan.py checks that the docs hold exactly this rendering, so a
number in the docs is the tool's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prime_jax.parallel import MESH_PRESETS  # noqa: E402
from prime_jax.plan.report import GIB, PHASE_TITLES, PlanReport, target_title  # noqa: E402

REPORTS = ROOT / "docs" / "plan_presets.json"
DOCS = {"README.md": ("peaks",), "docs/scale_out.md": ("tables", "summary", "oversample")}
# (name, preset, overrides): the presets as configured, then the default oversample where a preset lowers it
VARIANTS = [(p, p, ()) for p in MESH_PRESETS] + [
    (f"{p}+oversample1.5", p, ("--config.rollout.oversample=1.5",)) for p in ("8xh100", "v4-64", "v5e-64")]


def plan(preset: str, overrides: tuple[str, ...]) -> dict:
    """One `python -m prime_jax.plan` run, as a user runs it; its JSON report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        cmd = [sys.executable, "-m", "prime_jax.plan", f"--config=configs/qwen7b.py:{preset}", *overrides,
               f"--json_out={out}", "--quiet"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------------------------
# rendering (from the saved reports only)
# ----------------------------------------------------------------------------------------------
def _table(report: PlanReport) -> list[str]:
    """The per-phase table of `plan`'s output, as it prints it (header to the verdict line)."""
    lines = report.format().splitlines()
    start = next(i for i, line in enumerate(lines) if "phase (per device, GiB)" in line)
    end = next(i for i, line in enumerate(lines) if line.startswith("  => "))
    return [line for line in lines[start:end + 1] if not line.startswith("    ")]  # not the per-program detail lines


def _peak(report: PlanReport) -> tuple[float, str]:
    top = max(report.phases, key=lambda p: p.peak)
    return top.peak / GIB, PHASE_TITLES.get(top.name, top.name)


def _name(preset: str) -> str:
    return preset.replace("xh100", "×H100")


def render(reports: dict[str, dict]) -> dict[str, str]:
    """{block: markdown} of every generated block."""
    plans = {k: PlanReport.from_dict(v) for k, v in reports.items()}
    presets = [p for p in MESH_PRESETS if p in plans]
    blocks = {}

    def verdict(r: PlanReport) -> str:
        hbm = r.targets[r.primary]
        fits = "fits" if r.fits(r.primary) else "does NOT fit"
        return f"{_peak(r)[0]:.2f} GiB of {hbm:g} ({fits})"

    blocks["peaks"] = ("Planned per-device peaks (`python -m prime_jax.plan --config=configs/qwen7b.py:PRESET`, "
                       "XLA:CPU compile of the full 7B programs; `docs/scale_out.md` has the tables): "
                       + ", ".join(f"{_name(p)} {verdict(plans[p])}" for p in presets) + ".")
    tables = []
    for p in presets:
        r = plans[p]
        mesh = "×".join(str(r.mesh[a]) for a in ("data", "fsdp", "tensor"))
        tables += [f"`{p}` ({r.devices} devices, mesh {mesh}):", "", "```", *_table(r), "```", ""]
    blocks["tables"] = "\n".join(tables).rstrip()
    tightest = max(presets, key=lambda p: _peak(plans[p])[0] / plans[p].targets[plans[p].primary])
    t = plans[tightest]
    parts = [f"**{_name(p)}** peaks at {_peak(plans[p])[0]:.2f} GiB of {plans[p].targets[plans[p].primary]:g} "
             f"({_peak(plans[p])[1]})" for p in presets]
    all_fit = all(plans[p].fits(plans[p].primary) for p in presets)
    blocks["summary"] = (
        f"Summary: {'every preset fits its own target' if all_fit else 'NOT every preset fits its own target'}. "
        + ", ".join(parts) + f". The tightest is **{_name(tightest)}**, at "
        f"{_peak(t)[0] / t.targets[t.primary]:.0%} of {target_title(t.primary)} (the 90 % line is "
        f"{0.9 * t.targets[t.primary]:.1f} GiB).")
    rows = ["| preset | `rollout.oversample` | planned peak | phase | fits the preset's target |", "|---|---|---|---|---|"]
    for name, preset, overrides in VARIANTS:
        if name in plans and overrides:
            for label, r in ((preset, plans[preset]), (name, plans[name])):
                oversample = "1.5 (the default)" if label == name else "the preset's (1.0)"
                peak, phase = _peak(r)
                rows.append(f"| `{preset}` | {oversample} | {peak:.2f} GiB of {r.targets[r.primary]:g} | {phase} | "
                            f"{'yes' if r.fits(r.primary) else 'no'} |")
    blocks["oversample"] = "\n".join(rows)
    return blocks


def _marked(block: str) -> re.Pattern:
    return re.compile(rf"(<!-- plan_presets:{block} -->\n)(.*?)(\n<!-- /plan_presets:{block} -->)", re.S)


def generated_blocks(text: str) -> dict[str, str]:
    """{block: content} of the marked blocks in a document."""
    return {m.group(1)[len("<!-- plan_presets:"):-len(" -->\n")]: m.group(2)
            for m in re.finditer(r"(<!-- plan_presets:\w+ -->\n)(.*?)\n<!-- /plan_presets:\w+ -->", text, re.S)}


def write_docs(reports: dict[str, dict]) -> None:
    blocks = render(reports)
    for doc, names in DOCS.items():
        path = ROOT / doc
        text = path.read_text()
        for name in names:
            text, count = _marked(name).subn(lambda m: m.group(1) + blocks[name] + m.group(3), text)
            if count != 1:
                raise SystemExit(f"{doc}: no (or several) <!-- plan_presets:{name} --> blocks")
        path.write_text(text)
        print(f"updated {doc}: {', '.join(names)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--render", action="store_true", help="only regenerate the docs from docs/plan_presets.json")
    parser.add_argument("--only", default="", help="comma list of variants to replan (the others are kept)")
    args = parser.parse_args()
    reports = json.loads(REPORTS.read_text()) if REPORTS.exists() else {}
    if not args.render:
        only = {v for v in args.only.split(",") if v}
        for name, preset, overrides in VARIANTS:
            if only and name not in only:
                continue
            print(f"planning {name} ...", flush=True)
            reports[name] = plan(preset, overrides)
            print(f"  peak {_peak(PlanReport.from_dict(reports[name]))[0]:.2f} GiB", flush=True)
        REPORTS.write_text(json.dumps(reports, indent=1) + "\n")
    write_docs(reports)


if __name__ == "__main__":
    main()
