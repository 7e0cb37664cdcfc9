"""The real-model data path: generated word problems, GSM8K demonstrations, the held-out split,
SFT demonstrations from worked solutions, data.instruction and a reused SFT reference."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from config_files import load_config
from prime_jax.config import ConfigError, base_config, validate
from prime_jax.data import (STEP_BY_STEP_SUFFIX, DataError, gsm8k_demonstration, held_out, load_benchmark,
                            load_eval_sets, load_train_problems, sft_pairs)
from prime_jax.data import word_problems
from prime_jax.data.synthetic_tasks import is_task_problem, steps_right, task_demonstration
from prime_jax.rewards import grade_response


def _word_config(**overrides):
    c = base_config()
    c.data.train, c.data.eval, c.sft.data = "synthetic", "synthetic", "synthetic"
    c.data.synthetic.task, c.data.instruction, c.tokenizer.path = "word", "step_by_step", "tiny"
    for key, value in overrides.items():
        section, field = key.split(".")
        c[section][field] = value
    return c


def test_word_problems_are_deterministic_right_and_graded_right():
    problems = word_problems.make_problems(500, seed=3, min_steps=1, max_steps=3, stream=0)
    assert [p.user_content for p in problems] == [p.user_content for p in
                                                   word_problems.make_problems(500, seed=3, max_steps=3)]
    assert len({p.meta["expression"] for p in problems}) > 480
    assert {len(p.meta["lines"]) for p in problems} == {1, 2, 3}
    for p in problems:
        demo = task_demonstration(p)
        value = None
        for line in demo.split("\n")[:-1]:  # every written step's arithmetic is right
            a, op, b, r = re.search(r"(\d+) ([-+*/]) (\d+) = (\d+)", line).groups()
            a, b, r = int(a), int(b), int(r)
            assert r == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] and (op != "/" or a % b == 0)
            assert value is None or a == value  # each step goes on from the last
            value = r
        assert str(value) == p.ground_truth and 0 <= value <= 999
        assert demo.endswith(f"The answer is \\boxed{{{p.ground_truth}}}.")
        assert grade_response(demo, p.ground_truth, "math") == 1.0
        assert " 1 apples" not in p.user_content + demo and "boxs" not in p.user_content
        assert is_task_problem(p) and steps_right(p, demo + "\n")
    wrong = problems[0]
    assert grade_response(f"\\boxed{{{int(wrong.ground_truth) + 1}}}", wrong.ground_truth, "math") == 0.0
    with pytest.raises(ValueError, match="min_steps"):
        word_problems.make_problems(1, min_steps=3, max_steps=2)


def test_word_task_from_the_config_holds_out_its_eval_set_and_ends_with_the_instruction():
    c = _word_config(**{"sft.num_examples": 300})
    c.data.synthetic.num_train, c.data.synthetic.num_eval = 400, 100
    evals, _ = load_eval_sets(c)
    held = held_out(evals)
    train = load_train_problems(c, held)
    demos = sft_pairs(c, held)
    assert len(train) == 400 and len(demos) == 300
    assert all(p.user_content.endswith(STEP_BY_STEP_SUFFIX) for p in train + evals["synthetic"])
    assert not {p.meta["expression"] for p in train} & {p.meta["expression"] for p in evals["synthetic"]}
    assert not {m[-1]["content"] for m, _ in demos} & {p.user_content for p in evals["synthetic"]}
    validate(c, num_devices=1)
    c.data.instruction = "none"
    assert load_eval_sets(c)[0]["synthetic"][0].user_content == evals["synthetic"][0].meta["expression"]
    c.data.instruction = " Answer in \\boxed{}. "  # the user's own instruction
    validate(c, num_devices=1)
    assert load_eval_sets(c)[0]["synthetic"][0].user_content.endswith("?\n\nAnswer in \\boxed{}.")


def test_gsm8k_demonstration_rewrites_the_answer_and_drops_calculator_notes():
    solution = "She has 16 - 3 = <<16-3=13>>13 eggs.\nShe makes 13 * 2 = $<<13*2=26>>26.\n#### 1,026"
    assert gsm8k_demonstration(solution) == ("She has 16 - 3 = 13 eggs.\nShe makes 13 * 2 = $26.\n"
                                             "The answer is \\boxed{1026}.")
    assert gsm8k_demonstration("no final answer") is None
    train, _ = load_benchmark("gsm8k_train")
    assert len(train) == 7473 and train[0].ground_truth == "72"
    for p in train[:300]:
        demo = gsm8k_demonstration(p.meta["solution"])
        assert "<<" not in demo and "####" not in demo
        assert grade_response(demo, p.ground_truth, "math") == 1.0


def test_holdout_split_is_evaluated_and_never_trained_or_sfted(tmp_path):
    c = _word_config(**{"data.train": "synthetic,gsm8k_train", "data.holdout": 50, "data.eval": "heldout,gsm8k",
                        "sft.data": "gsm8k_train,synthetic", "sft.num_examples": 7473})
    c.data.synthetic.num_train = 100
    validate(c, num_devices=1)
    evals, _ = load_eval_sets(c)
    heldout = evals["heldout"]
    gsm8k_train, _ = load_benchmark("gsm8k_train")
    assert [p.id for p in heldout] == [p.id for p in gsm8k_train[-50:]]
    assert heldout[0].user_content.endswith(STEP_BY_STEP_SUFFIX)
    held = held_out(evals)
    train = load_train_problems(c, held)
    assert len(train) == 100 + 7473 - 50
    demos = sft_pairs(c, held)
    prompts = {m[-1]["content"] for m, _ in demos}
    assert not prompts & {p.user_content for p in heldout}
    assert len(demos) == 7473 - 50 + 7473  # every GSM8K solution but the held-out ones, then the word task's
    assert demos[0][1].endswith("The answer is \\boxed{72}.")

    for bad, field in (({"data.eval": "heldout", "data.holdout": 0}, "data.eval"),
                       ({"data.train": "synthetic", "data.eval": "heldout"}, "data.eval"),
                       ({"data.holdout": -1}, "data.holdout"), ({"data.instruction": "step_by_stpe"}, "data.instruction"),
                       ({"data.instruction": " "}, "data.instruction"),
                       ({"data.train": "synthetic,synthetic"}, "data.train"), ({"sft.data": "gsm8k_tran"}, "sft.data")):
        bad_config = _word_config(**{"data.train": "gsm8k_train", "data.holdout": 5, "sft.steps": 1, **bad})
        with pytest.raises(ConfigError, match=field):
            validate(bad_config, num_devices=1)
    c.data.holdout = 7473
    with pytest.raises(DataError, match="data.holdout"):
        load_train_problems(c, set())


def test_sft_pairs_from_a_messages_file_or_a_problems_file(tmp_path):
    messages = tmp_path / "demos.jsonl"
    messages.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"}]}) + "\n")
    problems = tmp_path / "math.jsonl"
    rows = [{"problem": "1+1?", "solution": "It is $\\boxed{2}$.", "answer": "2", "unique_id": "a"},
            {"problem": "2+2?", "solution": "no box", "answer": "4", "unique_id": "b"}]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = _word_config(**{"sft.data": f"{messages},{problems}", "sft.steps": 1})
    validate(c, num_devices=1)
    assert sft_pairs(c, set()) == [([{"role": "user", "content": "q"}], "a"),
                                   ([{"role": "user", "content": "1+1?" + STEP_BY_STEP_SUFFIX}], "It is $\\boxed{2}$.")]


def test_reference_dir_must_hold_a_saved_reference(tmp_path):
    c = load_config("tiny", {"sft.reference_dir": str(tmp_path / "nothing")})
    with pytest.raises(ConfigError, match="sft.reference_dir.*no saved reference"):
        validate(c, num_devices=1)
    from prime_jax.train.checkpoint import save_params

    save_params(tmp_path / "reference", {"w": np.ones(3, np.float32)})
    c.sft.reference_dir = str(tmp_path / "reference")
    validate(c, num_devices=1)
