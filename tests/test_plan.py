"""prime_jax.plan: AOT-compiled memory plan of the iteration's five programs (tiny shapes here)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from prime_jax.plan import GIB, PROGRAMS, PlanDoesNotFit, PlanReport, suggest
from prime_jax.plan.memory import check_fits, plan_memory
from prime_jax.train.builder import model_config

ROOT = Path(__file__).resolve().parent.parent

TINY = """
from prime_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "tiny-plan"
    c.model.vocab_size = 128
    c.model.hidden_size = 32
    c.model.intermediate_size = 64
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.dtype = "float32"
    c.tokenizer.path = "tiny"
    c.data.train = "synthetic"
    c.data.eval = "synthetic"
    c.data.max_prompt_tokens = 16
    c.rollout.max_new_tokens = 16
    c.batch.prompts_per_step = 8
    c.batch.mini_batch = 32
    c.batch.prm_mini_batch = 32
    c.batch.score_batch = 32
    c.batch.micro_batches = 2
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = {data}, {fsdp}, 1
    return c
"""


def tiny_config(data=2, fsdp=4):
    namespace = {}
    exec(TINY.format(data=data, fsdp=fsdp), namespace)
    return namespace["get_config"]()


@pytest.fixture(scope="module")
def report():
    return plan_memory(tiny_config(), jax.devices())


def test_report_has_every_phase_with_consistent_components(report):
    config = tiny_config()
    # prm_update "after": the PRM's q comes from its updates, there is no separate PRM scoring pass
    assert [p.name for p in report.phases] == [p for p in PROGRAMS if p != "prm_score"]
    assert report.devices == 8 and report.mesh == {"data": 2, "fsdp": 4, "tensor": 1}
    mc = model_config(config.model, download=False)
    assert report.model_params == mc.num_params()
    # params are split 4 ways (fsdp; replicated over data); norms and biases are small extras
    per_model = mc.num_params() * 4 / 4
    assert per_model <= report.resident["policy_params"] <= 1.3 * per_model
    assert set(report.resident) == {"policy_params", "policy_opt", "prm_params", "prm_opt", "ref_params"}
    assert report.resident["policy_opt"] == pytest.approx(2 * report.resident["policy_params"], rel=0.01)
    for p in report.phases:
        assert p.peak > 0 and p.compiled["seconds"] > 0
        total = p.params + p.opt_state + p.grads + p.kv_cache + p.activations
        assert total == pytest.approx(p.peak)
        assert p.params == pytest.approx(3 * report.resident["policy_params"])  # policy, PRM, reference
        assert (p.grads > 0) == (p.name in ("prm", "policy"))
        assert (p.kv_cache > 0) == (p.name in ("prefill", "decode"))
    # KV cache: 12 prompts (1.5 x 8) padded to the sampler's bucket of 16, x n=4 = 64 rows (one decode slot
    # each: the static batch) over 8 data-parallel devices, 16 columns for the responses; and the 16 prefilled
    # prompts of 16 columns that each prompt's rows attend
    decode = next(p for p in report.phases if p.name == "decode")
    assert decode.detail.startswith("12 prompts per attempt (rollout.oversample 1.5 x batch.prompts_per_step 8), "
                                    "padded to the sampler's bucket of 16, x n=4 = 64 rows"), decode.detail
    kv = decode.kv_cache
    L, K, H, columns, rows, prompts, prompt_len = 2, 2, 8, 16, 64 // 8, 16 // 8, 16
    assert kv == (2 * L * rows * columns * K * H * 4 + rows * columns + 2 * rows * 4
                  + 2 * L * prompts * prompt_len * K * H * 4)
    assert all(report.fits(t) for t in report.targets)
    text = report.format()
    for needle in ("policy update", "PRM update", "sample/decode", "v5e 16G", "H100 80G", "fits"):
        assert needle in text


def test_json_round_trip(report):
    again = PlanReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.format() == report.format()


def test_check_fits_refuses_and_suggests(report, monkeypatch):
    import prime_jax.plan.memory as plan

    monkeypatch.setattr(plan, "plan_memory", lambda *a, **k: PlanReport.from_dict(
        dict(report.to_dict(), targets=k["targets"])))
    tiny = report.peak() / GIB / 2
    with pytest.raises(PlanDoesNotFit) as error:
        check_fits(tiny_config(), jax.devices(), hbm_gib=tiny)
    assert "does not fit" in str(error.value) and "policy update" in str(error.value)
    assert check_fits(tiny_config(), jax.devices(), hbm_gib=1.0).fits("hbm")
    small = PlanReport.from_dict(dict(report.to_dict(), targets={"small": tiny}))
    hints = suggest(small, tiny_config(), dp=8)
    assert hints["small"]  # something to change for every failing phase
    with pytest.raises(ValueError, match="target"):
        check_fits(tiny_config(), 8)  # a device count needs a target or a preset


def test_plan_sees_the_models_activation_constraint(monkeypatch):
    # The model constrains each decoder layer's hidden states to the batch rule, and the sampler and
    # the train steps trace under their mesh (the plan sets no mesh context of its own), so rows stay
    # split over fsdp=8. With the constraint made a no-op GSPMD follows the FSDP weight split and
    # replicates the rows: the prefill's and the policy update's activations grow several-fold.
    import prime_jax.models.qwen2 as qwen2

    def activations():
        r = plan_memory(tiny_config(1, 8), jax.devices(), programs=("prefill", "policy"))
        assert [(p.name, p.rows_per_device) for p in r.phases] == [("prefill", 8), ("policy", 2)]
        return {p.name: p.activations for p in r.phases}

    constrained = activations()
    monkeypatch.setattr(qwen2, "constrain", lambda x, axes: x)
    replicated = activations()
    assert 2 * constrained["policy"] < replicated["policy"], (constrained, replicated)
    # The prefill returns the prompts' keys/values split by row (its output sharding), and GSPMD
    # propagates that split back through the layers even without the constraint.
    assert constrained["prefill"] <= replicated["prefill"], (constrained, replicated)
    with pytest.raises(ValueError, match="unknown programs"):
        plan_memory(tiny_config(), jax.devices(), programs=("bogus",))


def test_cli_on_fake_devices(tmp_path):
    path = tmp_path / "tiny_plan.py"
    path.write_text(TINY.format(data=1, fsdp=-1))
    out = tmp_path / "plan.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "prime_jax.plan", f"--config={path}", "--devices=4", "--programs=score,policy",
         f"--json_out={out}", "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory plan" in proc.stdout and "policy update" in proc.stdout
    # The rollout-time estimate follows, labelled as one, for every accelerator of the table.
    assert "rollout time of one sampling attempt -- an ESTIMATE" in proc.stdout
    assert all(f"\n  {name} " in proc.stdout for name in ("v4", "v5e", "v5p", "h100")), proc.stdout
    data = json.loads(out.read_text())
    assert data["devices"] == 4 and data["mesh"]["fsdp"] == 4


def _saved_plans() -> dict:
    return json.loads((ROOT / "docs" / "plan_presets.json").read_text())


def test_docs_numbers_are_the_plans():
    """The README's planned peaks and docs/scale_out.md's tables, summary and oversample table are
    rendered from `plan`'s own reports of each preset (docs/plan_presets.json, written by
    benchmarks/plan_presets.py): rendered again, the docs are unchanged."""
    from config_files import module_at

    generator = module_at("benchmarks/plan_presets.py", "plan_presets")
    reports = _saved_plans()
    assert set(reports) == {name for name, _, _ in generator.VARIANTS}
    blocks = generator.render(reports)
    for doc, names in generator.DOCS.items():
        found = generator.generated_blocks((ROOT / doc).read_text())
        for name in names:
            assert found.get(name) == blocks[name], f"{doc}: rerun python benchmarks/plan_presets.py --render"
    for name, report in reports.items():  # what the sample line counts, in the plan's own words
        detail = next(p["detail"] for p in report["phases"] if p["name"] == "decode")
        assert re.match(r"\d+ prompts per attempt \(rollout\.oversample [\d.]+ x batch\.prompts_per_step 256\), "
                        r"padded to the sampler's bucket of \d+", detail), (name, detail)


@pytest.mark.skipif(not os.environ.get("PRIME_SLOW_TESTS"), reason="minutes of CPU; set PRIME_SLOW_TESTS=1")
def test_qwen7b_plan_v4_64(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "prime_jax.plan", "--config=configs/qwen7b.py:v4-64", "--quiet", "--strict",
         "--targets=v4", f"--json_out={tmp_path / 'plan.json'}"], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # --strict: 1 unless it fits v4
    assert "7.62B params/model" in proc.stdout and "on 32 cpu devices" in proc.stdout
    assert "=> fits the preset's target v4 32G (*)" in proc.stdout
    # the docs' numbers (docs/plan_presets.json) are still what the plan says
    got = {p["name"]: p["peak"] for p in json.loads((tmp_path / "plan.json").read_text())["phases"]}
    saved = {p["name"]: p["peak"] for p in _saved_plans()["v4-64"]["phases"]}
    assert got == pytest.approx(saved, rel=1e-3), "rerun python benchmarks/plan_presets.py"


def test_device_count_runs_in_a_subprocess():
    # 4 != the 8 devices of this process: plan_memory re-executes on 4 fake CPU devices
    r = plan_memory(tiny_config(1, -1), 4, programs=("score",), targets={"small": 1.0})
    assert r.devices == 4 and r.mesh["fsdp"] == 4 and [p.name for p in r.phases] == ["score"]
    assert r.targets == {"small": 1.0} and r.fits("small")
