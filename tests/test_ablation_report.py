"""benchmarks/ablation.py's report: its markdown table from a summary, and the summary of runs' metrics files."""

import json

from config_files import module_at

ablation = module_at("benchmarks/ablation.py", "ablation")


def _row(label, probes, half):
    return {"label": label, "eval_accuracy_start": 0.5, "eval_accuracy_final": 0.7, "eval_accuracy_best": 0.72,
            "eval_accuracy_gain_points": 20.0, "train_reward_last10": 0.68,
            "prm_dpo_accuracy_second_half_per_seed": half,
            "probe_per_seed": probes, "seconds_per_step": 1.5}


def test_markdown_lists_each_seeds_pick_with_the_weighted_vote_when_the_probe_has_it():
    new = {"prm_best_of_n": 0.63, "prm_weighted_vote": 0.66, "random_pick": 0.602, "majority": 0.64}
    old = {"prm_best_of_n": 0.605, "prm_weighted_vote": None, "random_pick": 0.652, "majority": 0.69}
    prime = {**_row("PRIME", [new, old, None], [0.68, 0.71, 0.69]), "steps_to_outcome_final_mean": 150,
             "fraction_of_steps_to_outcome_final_mean": 0.5, "final_minus_outcome_final_points": 3.5}
    md = ablation.markdown({"prime_rloo": prime, "outcome_rloo": _row("RLOO, outcome only", None, None)})
    assert "| PRIME | 50.0% | 70.0% | +20.0 | 72.0% | 68.0% | 0.680, 0.710, 0.690 | " \
           "63.0 / 66.0 / 60.2 / 64.0; 60.5 / - / 65.2 / 69.0; - | 1.50 |" in md
    assert "| RLOO, outcome only | 50.0% | 70.0% | +20.0 | 72.0% | 68.0% | - | - | 1.50 |" in md
    assert "reaches outcome-only's final mean (70.0%) at step 150 (50% of the steps); final difference +3.5" in md


def _write_run(workdir, evals, dpo=None):
    """A run's metrics.jsonl with eval rows at steps 0, 10, ... and one train row per step."""
    workdir.mkdir(parents=True)
    rows = []
    for i, accuracy in enumerate(evals):
        rows.append({"step": 10 * i, "eval/accuracy": accuracy})
        rows.append({"step": 10 * i, "train/reward": 0.5, "time/step_s": 1.0, "prm/dpo_accuracy": dpo})
    (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_summary_pairs_the_final_difference_by_seed_and_reports_its_standard_error(tmp_path):
    # PRIME minus outcome-only per seed: +0.02, -0.04, +0.05 -> mean +1.0 point, s.d. 4.58, s.e. 2.65
    finals = {"prime_rloo": [0.62, 0.50, 0.75], "outcome_rloo": [0.60, 0.54, 0.70]}
    for estimator, per_seed in finals.items():
        for seed, final in enumerate(per_seed):
            _write_run(tmp_path / f"{estimator}_s{seed}", [0.4, 0.5, final],
                       dpo=0.7 if estimator == "prime_rloo" else None)
    summary = ablation.summarize(tmp_path, [0, 1, 2], {})
    prime = summary["prime_rloo"]
    assert [round(d, 6) for d in prime["final_minus_outcome_per_seed_points"]] == [2.0, -4.0, 5.0]
    assert abs(prime["final_minus_outcome_standard_error_points"] - 2.6458) < 1e-3
    assert abs(prime["final_minus_outcome_final_points"] - 1.0) < 1e-9
    md = ablation.markdown(summary)
    assert "final difference +1.0 points (standard error 2.6, paired by seed)." in md


def test_markdown_names_the_overridden_runs_and_a_start_already_above_the_baseline():
    """--prime_overrides: the runs' label (not "PRIME") says whose curve reaches the baseline; a reach at
    step 0 says that outcome-only ended no higher than it started."""
    label = "process + outcome RLOO [--config.algo.process_source=oracle]"
    prime = {**_row(label, None, None), "steps_to_outcome_final_mean": 0,
             "fraction_of_steps_to_outcome_final_mean": 0.0, "final_minus_outcome_final_points": 1.0}
    md = ablation.markdown({"prime_rloo": prime, "outcome_rloo": _row("RLOO, outcome only", None, None)})
    assert f"{label}'s mean held-out accuracy reaches" in md and "PRIME's" not in md
    assert "at step 0: outcome-only ends no higher than it starts; final difference +1.0" in md


def test_prime_overrides_reach_the_prime_runs_only(tmp_path, monkeypatch):
    commands = []

    class Done:
        returncode = 0

        def __init__(self, cmd, **_):
            commands.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(ablation.subprocess, "Popen", Done)
    ablation.run_all("configs/tiny.py", tmp_path, [0], ["--config.total_steps=2"], parallel=False,
                     prime_extra=("--config.algo.process_source=oracle",))
    by_estimator = {next(a for a in c if a.startswith("--config.algo.estimator=")).split("=")[1]: c for c in commands}
    assert "--config.algo.process_source=oracle" in by_estimator["prime_rloo"]
    assert "--config.algo.process_source=oracle" not in by_estimator["outcome_rloo"]
    assert all("--config.total_steps=2" in c for c in commands)
