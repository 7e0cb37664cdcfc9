"""train/builder.py: the memory plan compiles exactly the programs a training step runs, and `main`,
`plan` and `evaluate` load models and make samplers through the same builder methods."""

import collections
from pathlib import Path

import jax
import numpy as np
import pytest

from config_files import load_config
from prime_jax.eval import lib as eval_lib
from prime_jax.eval.results import Generation
from prime_jax.eval.run import evaluate
from prime_jax.plan import memory as plan
from prime_jax.parallel import mesh_from_config
from prime_jax.rewards import RewardPool
from prime_jax.train.builder import RunBuilder, RunLayout, abstract_params
from prime_jax.train.loop import Trainer

ROOT = Path(__file__).resolve().parent.parent

SETTINGS = {
    "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 1, "model.num_heads": 2,
    "model.num_kv_heads": 1, "sft.steps": 0, "data.synthetic.num_train": 200, "data.synthetic.num_eval": 8,
    "batch.prompts_per_step": 4, "batch.mini_batch": 8, "batch.prm_mini_batch": 16, "batch.score_batch": 16,
    "rollout.max_new_tokens": 16, "algo.filter": False, "algo.prm_loss": "ce", "reward.workers": 1,
    # every scoring program the loop has: old and reference log-probs, and the PRM's own pass ("before")
    "algo.recompute_old_logprobs": True, "algo.prm_update": "before", "policy_optim.warmup_steps": 5,
}


def tiny_config(**overrides):
    return load_config("tiny", {**SETTINGS, **overrides})


def _avals(args):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), args)


def test_plan_programs_are_the_training_programs(tmp_path):
    config = tiny_config()
    mesh = mesh_from_config(config)
    trainer = Trainer.create(config, tmp_path, mesh)
    builder = trainer.builder
    graphdef, params = abstract_params(builder.model_config(len(trainer.tokenizer)), mesh)

    # Sampling: the plan's compile (abstract weights, through Sampler.compile) keeps the two programs
    # under the key the rollouts then use: the training step compiles nothing more.
    compiled = builder.compile_rollout(trainer.sampler, (graphdef, params),
                                       key=jax.ShapeDtypeStruct((2,), np.uint32))
    assert trainer.sampler.num_compilations == 2 and compiled.prefill is not None

    # Train steps: record what the loop passes, then lower both.
    calls = collections.defaultdict(list)
    steps = trainer.steps

    def spy(name, fn):
        def call(*args):
            calls[name].append(_avals(args))
            return fn(*args)
        return call

    trainer.steps = steps._replace(score=spy("score", steps.score), prm=spy("prm", steps.prm),
                                   policy=spy("policy", steps.policy))
    trainer.pool = RewardPool(1)
    try:
        trainer.step(trainer.state, 1)
    finally:
        trainer.close()
    assert trainer.sampler.num_compilations == 2

    planned = {"policy": (builder.abstract_train_state(params, "policy"), builder.abstract_batch("policy", 8)),
               "prm": (builder.abstract_train_state(params, "prm"), builder.abstract_batch("prm", 16))}
    for name, (rows, scored) in builder.score_calls().items():
        planned[name] = (*(params if on else None for on in scored), builder.abstract_batch(name, rows))
    assert set(builder.score_calls()) == {"score", "prm_score"}
    text = lambda fn, args: fn.lower(*args).as_text()
    for name in ("policy", "prm"):
        assert {text(getattr(steps, name), args) for args in calls[name]} == {text(getattr(steps, name), planned[name])}
    # the loop's scoring calls: the trainer's (old + reference) and the PRM phase's (the PRM's)
    assert ({text(steps.score, args) for args in calls["score"]}
            == {text(steps.score, planned["score"]), text(steps.score, planned["prm_score"])})


@pytest.mark.parametrize("loss", ["ce", "dpo", "bon_acc"])
def test_plan_prm_batch_carries_group_scores_for_the_dpo_losses(loss):
    """The dpo / bon_* PRM step also reads the group scores of the first scoring pass (prm_update "reverse"):
    the planned PRM batch carries them as the loop builds them, float32 [rows] sharded like the outcome."""
    update = "before" if loss == "ce" else "reverse"
    config = tiny_config(**{"algo.prm_loss": loss, "algo.prm_update": update})
    batch = RunBuilder(config, mesh_from_config(config)).abstract_batch("prm", 16)
    if loss == "ce":
        assert batch.group_scores is None
    else:
        assert batch.group_scores.shape == (16,) and batch.group_scores.dtype == np.float32
        assert batch.group_scores.sharding == batch.outcome.sharding


def test_plan_and_trainer_share_the_builder():
    config = tiny_config(**{"model.vocab_size": 96})
    report = plan.plan_memory(config, jax.devices(), programs=("score", "prm_score"))
    assert [p.name for p in report.phases] == ["score", "prm_score"]
    builder = RunBuilder(config, mesh_from_config(config))
    assert builder.prompts_per_attempt == 8 and builder.prompt_width == 40
    # warm-up honoured: the first update's learning rate is 0
    state = builder.policy_optimizer.init({"w": np.ones(2, np.float32)})
    updates, _ = builder.policy_optimizer.update({"w": np.ones(2, np.float32)}, state, {"w": np.ones(2, np.float32)})
    assert float(np.abs(updates["w"]).max()) == 0.0
    assert RunLayout("/x").checkpoints == Path("/x/checkpoints")


def test_main_plan_and_evaluate_build_through_the_same_builder_methods(tmp_path, monkeypatch):
    """A spy on `RunBuilder`: training (`Trainer.create`, what `main` runs), the memory plan and
    `evaluate` each get the model's config, load their models and make their sampler through it."""
    calls = collections.defaultdict(set)
    who = ["main"]
    for name in ("model_config", "load_model", "sampler"):
        def spy(self, *args, _real=getattr(RunBuilder, name), _name=name, **kwargs):
            calls[_name].add(who[0])
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(RunBuilder, name, spy)
    config = tiny_config(**{"model.vocab_size": 128})
    Trainer.create(config, tmp_path / "run", mesh_from_config(config)).close()
    who[0] = "plan"
    plan.plan_memory(config, jax.devices(), programs=("prefill",))
    who[0] = "evaluate"

    def no_sampling(sampler, model, tokenizer, prompt_ids, settings, *, stop_token_ids, key):
        rows = len(prompt_ids) * settings.n  # the sampler was made; running it is the sampler tests' job
        return Generation(texts=["0"] * rows, response_ids=[[stop_token_ids[0]]] * rows, finished=[True] * rows)

    monkeypatch.setattr(eval_lib, "generate_responses", no_sampling)
    evaluate(config, tmp_path / "eval", benchmarks="synthetic", limit=2, max_new_tokens=4)
    assert calls == {"model_config": {"main", "plan", "evaluate"}, "sampler": {"main", "plan", "evaluate"},
                     "load_model": {"main", "evaluate"}}  # the plan compiles from abstract weights: none loaded
