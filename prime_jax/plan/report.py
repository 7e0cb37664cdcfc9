"""The memory plan's report: per-phase, per-device peaks against the targets' HBM, and what to
change where a phase does not fit (`suggest`). Built by `prime_jax.plan`; JSON round-trips.

A phase fits a target when its peak is at most `headroom` (90%) of the HBM. Suggestions scale
the activation part linearly with the rows per device: estimates to confirm by rerunning the plan.
"""

from __future__ import annotations

import dataclasses
import math

from prime_jax.parallel import HBM_GIB

GIB = float(1 << 30)
PROGRAMS = ("prefill", "decode", "score", "prm_score", "prm", "policy")
PHASE_TITLES = {
    "prefill": "sample/prefill",
    "decode": "sample/decode",
    "score": "score",
    "prm_score": "PRM score",
    "prm": "PRM update",
    "policy": "policy update",
}
# The targets a plan compares against by default (HBM per device: parallel.HBM_GIB).
TARGETS = {name: HBM_GIB[name] for name in ("v4", "v5e", "v5p", "h100")}
DEFAULT_HEADROOM = 0.9


def target_title(name: str) -> str:
    """E.g. "v5e 16G", "H100 80G"; an unknown target by its name."""
    return f"{'H100' if name == 'h100' else name} {HBM_GIB[name]:g}G" if name in HBM_GIB else name


class PlanDoesNotFit(RuntimeError):
    """Raised by `check_fits`; `str(error)` is the formatted plan, `.report` the PlanReport."""

    def __init__(self, report: "PlanReport", target: str):
        self.report, self.target = report, target
        super().__init__(f"the run does not fit {target} ({report.targets[target]:.1f} GiB/device "
                         f"x {report.headroom:.0%} headroom):\n{report.format()}")


@dataclasses.dataclass
class Phase:
    """One program's per-device peak, split into components (bytes)."""

    name: str
    detail: str
    params: float
    opt_state: float
    grads: float
    kv_cache: float
    activations: float
    peak: float
    compiled: dict  # raw memory_analysis numbers (bytes) and compile seconds
    rows_per_device: float = 0.0


@dataclasses.dataclass
class PlanReport:
    title: str
    devices: int
    platform: str
    mesh: dict
    model_params: int
    resident: dict  # per-device bytes of each resident state (policy_params, ...)
    phases: list
    targets: dict  # name -> HBM GiB per device
    headroom: float
    suggestions: dict = dataclasses.field(default_factory=dict)  # target -> [str]
    notes: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    primary: str = ""  # the target of config.mesh.preset (marked *, the only one given suggestions)

    # -------------------------------------------------------------- queries
    def peak(self) -> float:
        return max(p.peak for p in self.phases)

    def fits(self, target: str) -> bool:
        budget = self.targets[target] * GIB * self.headroom
        return all(p.peak <= budget for p in self.phases)

    def failing(self, target: str) -> list:
        budget = self.targets[target] * GIB * self.headroom
        return [p for p in self.phases if p.peak > budget]

    # -------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PlanReport":
        d = dict(d)
        d["phases"] = [Phase(**p) for p in d["phases"]]
        return cls(**d)

    # -------------------------------------------------------------- text
    def format(self) -> str:
        g = lambda b: f"{b / GIB:7.2f}"
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"memory plan: {self.title}",
            f"  {self.model_params / 1e9:.2f}B params/model; mesh {mesh} on {self.devices} {self.platform} devices; "
            f"fits = peak <= {self.headroom:.0%} of HBM",
            f"  resident per device (GiB): " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.resident.items()),
        ]
        targets = list(self.targets)
        title = lambda t: target_title(t) + ("*" if t == self.primary else "")
        head = (f"  {'phase (per device, GiB)':<24}{'params':>8}{'opt':>8}{'grads':>8}{'act+tmp':>8}{'KV':>8}"
                f"{'peak':>8} | " + " ".join(f"{title(t):>9}" for t in targets))
        lines += [head, "  " + "-" * (len(head) - 2)]
        for p in self.phases:
            marks = []
            for t in targets:
                hbm = self.targets[t] * GIB
                marks.append("ok" if p.peak <= hbm * self.headroom else ("tight" if p.peak <= hbm else "NO"))
            lines.append(f"  {PHASE_TITLES.get(p.name, p.name):<24}{g(p.params)} {g(p.opt_state)} {g(p.grads)} "
                         f"{g(p.activations)} {g(p.kv_cache)} {g(p.peak)} | " + " ".join(f"{m:>9}" for m in marks))
        lines.append(f"  {'whole iteration (max)':<24}{'':>40}{g(self.peak())} | " + " ".join(
            f"{('fits' if self.fits(t) else 'NO'):>9}" for t in targets))
        for p in self.phases:
            c = p.compiled
            lines.append(f"    {p.name:<8} {p.detail}; XLA: args {c['argument'] / GIB:.2f} temp {c['temp'] / GIB:.2f} "
                         f"out {c['output'] / GIB:.2f} alias {c['alias'] / GIB:.2f} GiB; compiled in {c['seconds']:.0f}s")
        if self.primary:
            verdict = "fits" if self.fits(self.primary) else "does NOT fit"
            lines.append(f"  => {verdict} the preset's target {target_title(self.primary)} (*)")
        for t, items in self.suggestions.items():
            for s in items:
                lines.append(f"  suggestion for {target_title(t)}: {s}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        lines.append(f"  ({self.seconds:.0f}s)")
        return "\n".join(lines)


# =============================================================================================
# suggestions
# =============================================================================================
def suggest(report: PlanReport, config, *, dp: int) -> dict:
    """For each target that some phase does not fit: what to change (estimates; rerun to confirm)."""
    out: dict[str, list[str]] = {}
    c = config
    tensor = report.mesh.get("tensor", 1)
    chosen = [report.primary] if report.primary else list(report.targets)
    for target in chosen:
        hbm = report.targets[target]
        budget = hbm * GIB * report.headroom
        items: list[str] = []
        state = (sum(report.resident.values()))
        if state > budget:
            per_device_total = state * (report.mesh.get("fsdp", 1) * tensor)  # state of one replica group
            need = 2 ** math.ceil(math.log2(per_device_total / (budget * 0.6)))
            items.append(f"params + optimizer states alone take {state / GIB:.1f} GiB/device: shard over more "
                         f"devices (data=1, fsdp=-1 on >= {need} devices) or use a bigger-HBM target")
            out[target] = items
            continue
        for p in report.failing(target):
            fixed = p.params + p.opt_state + p.grads
            if p.name in ("policy", "prm", "score", "prm_score"):
                per_row = p.activations / max(p.rows_per_device, 1e-9)
                rows_fit = (budget - fixed - p.kv_cache) / per_row if per_row > 0 else float("inf")
                field = {"policy": "mini_batch", "prm": "prm_mini_batch", "score": "score_batch",
                         "prm_score": "prm_mini_batch"}[p.name]
                rows_total = c.batch[field]
                if rows_fit >= 1 and p.rows_per_device > 1:
                    rows_dev = 2 ** int(math.floor(math.log2(min(rows_fit, p.rows_per_device))))
                    est = f"est. peak {(fixed + p.kv_cache + per_row * rows_dev) / GIB:.1f} GiB"
                    if p.name in ("score", "prm_score"):
                        items.append(f"{PHASE_TITLES[p.name]}: batch.{field}={rows_dev * dp} "
                                     f"({rows_dev} rows/device per scoring call; {est})")
                    else:
                        new_k = int(rows_total // (rows_dev * dp))
                        items.append(f"{PHASE_TITLES[p.name]}: batch.micro_batches={new_k} ({rows_dev} rows/device "
                                     f"per micro-batch; {est})")
                else:
                    items.append(f"{PHASE_TITLES[p.name]}: activations of {p.rows_per_device:g} row/device "
                                 f"({p.activations / GIB:.1f} GiB) exceed the {(budget - fixed) / GIB:.1f} GiB left: "
                                 f"use tensor parallelism (mesh.tensor=2 or 4 splits heads and MLP) or more devices")
            else:  # sampling: KV cache and prefill temporaries scale with the rows per generate call
                per_row = (p.kv_cache + p.activations) / max(p.rows_per_device, 1e-9)
                rows_fit = (budget - fixed) / per_row if per_row > 0 else float("inf")
                if rows_fit >= 1:
                    rows_dev = 2 ** int(math.floor(math.log2(rows_fit)))
                    prompts = rows_dev * dp // c.rollout.n
                    items.append(f"{PHASE_TITLES[p.name]}: at most {prompts} prompts per generate call fit "
                                 f"({rows_dev} rows/device; est. peak {(fixed + per_row * rows_dev) / GIB:.1f} GiB); "
                                 f"the loop samples ceil(rollout.oversample * batch.prompts_per_step) prompts per "
                                 f"call, padded to a power of two: lower rollout.oversample, sample in chunks, "
                                 f"or use more devices")
                else:
                    items.append(f"{PHASE_TITLES[p.name]}: not even one row/device fits next to the resident "
                                 f"state; use more devices")
        if items:
            out[target] = items
    return out


