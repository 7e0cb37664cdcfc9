"""algo.process_source "oracle": step-level rewards from the synthetic task's own demonstrations."""

import numpy as np
import pytest

from config_files import load_config
from prime_jax.config import ConfigError, validate
from prime_jax.data import chains
from prime_jax.data.synthetic_tasks import first_error_token, task_demonstration
from prime_jax.train.prm_phase import oracle_process_rewards

STOP = 0  # a stop token outside the characters' ids


class CharTokenizer:
    """One token per character (id = ord), STOP decoding to a marker that is not in any text."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join("" if (i == STOP and skip_special_tokens) else ("<s>" if i == STOP else chr(i)) for i in ids)


def ids(text, stop=False):
    return [ord(c) for c in text] + ([STOP] if stop else [])


def padded(rows, width):
    out = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for r, row in enumerate(rows):
        out[r, :len(row)], mask[r, :len(row)] = row, 1
    return out, mask


def slipped(demo: str) -> tuple[str, int]:
    """The demonstration with its second step's result one off, carried no further, and that digit's index."""
    second = demo.index("\n") + 1
    at = demo.index("=", second) + 1
    digit = str((int(demo[at]) + 1) % 10)
    return demo[:at] + digit + demo[at + 1:], at


def test_oracle_marks_the_first_departure_from_the_demonstration_in_any_row():
    problem = chains.make_problems(1, seed=3)[0]
    demo = task_demonstration(problem)
    wrong, at = slipped(demo)
    tok = CharTokenizer()
    rows = [ids(demo, stop=True), ids(wrong, stop=True), ids(wrong), ids(demo[:6], stop=True), [], ids(wrong)]
    response_ids, mask = padded(rows, len(demo) + 4)
    outcome = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 1.0], np.float32)  # the last: a right answer through a wrong step
    q = oracle_process_rewards([problem] * 6, response_ids, mask, outcome, tok, {STOP})
    assert q.shape == mask.shape and q.dtype == np.float32
    assert not q[0].any() and not q[4].any()  # right and faithful; empty row
    for r in (1, 2, 5):  # with or without the stop token, wrong or right answer: the slipped digit
        assert q[r, at] == -1.0 and np.count_nonzero(q[r]) == 1
    # stopped early without departing from the demonstration: its last token (the stop) takes the blame
    assert q[3, len(rows[3]) - 1] == -1.0 and np.count_nonzero(q[3]) == 1
    assert first_error_token(problem, ids(wrong), tok) == at
    # oracle_wrong_rows: the same marks on the rows the outcome calls wrong; right answers (row 5) unmarked
    q_wrong = oracle_process_rewards([problem] * 6, response_ids, mask, outcome, tok, {STOP}, wrong_rows_only=True)
    np.testing.assert_array_equal(q_wrong[[0, 1, 2, 3, 4]], q[[0, 1, 2, 3, 4]])
    assert not q_wrong[5].any()


@pytest.mark.parametrize("source", ["oracle", "oracle_wrong_rows"])
def test_oracle_needs_the_synthetic_task_and_process_rewards(source):
    config = load_config("tiny_chains")
    config.algo.process_source = source
    validate(config, num_devices=1)
    for field, value, said in (("algo.estimator", "outcome_rloo", "estimator"), ("data.train", "math500", "data.train"),
                               ("algo.process_source", "verifier", "one of")):
        bad = load_config("tiny_chains")
        bad.algo.process_source = source
        section, key = field.split(".")
        bad[section][key] = value
        with pytest.raises(ConfigError, match=said) as e:
            validate(bad, num_devices=1)
        assert "algo.process_source" in str(e.value) or field in str(e.value)


def test_steps_right_needs_every_step_not_only_the_answer():
    from prime_jax.data.synthetic_tasks import is_task_problem, steps_right

    problem = chains.make_problems(1, seed=3)[0]
    demo = task_demonstration(problem)
    wrong, _ = slipped(demo)
    lines = wrong.split("\n")
    right_answer_wrong_step = "\n".join(lines[:-1] + [demo.split("\n")[-1]])  # the slip, then the right \boxed{}
    assert is_task_problem(problem)
    assert steps_right(problem, demo) and steps_right(problem, demo + "\n")
    assert not steps_right(problem, right_answer_wrong_step) and not steps_right(problem, demo[:-3])


@pytest.mark.parametrize("source", ["ref_logprob", "prm_logprob"])
def test_ref_logprob_needs_the_frozen_reference_and_process_rewards(source):
    config = load_config("tiny_chains")
    config.algo.process_source, config.algo.prm_ref = source, "freeze"
    validate(config, num_devices=1)
    for field, value, said in (("algo.prm_ref", "policy", "prm_ref"), ("algo.estimator", "outcome_rloo", "estimator")):
        bad = load_config("tiny_chains")
        bad.algo.process_source, bad.algo.prm_ref = source, "freeze"
        section, key = field.split(".")
        bad[section][key] = value
        with pytest.raises(ConfigError, match=said):
            validate(bad, num_devices=1)
