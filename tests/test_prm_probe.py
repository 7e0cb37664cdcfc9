"""benchmarks/prm_probe.py's credit diagnostic: where a signal puts its (dis)credit around a slipped step."""

import numpy as np

from config_files import module_at

probe = module_at("benchmarks/prm_probe.py", "prm_probe")


class CharTokenizer:
    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_first_deviation_finds_the_slipped_digit_and_ignores_correct_or_cut_answers():
    demo = "7-5=2\n2+4=6\n\\boxed{6}"
    assert probe.first_deviation(demo, "7-5=2\n2+4=7\n\\boxed{7}") == 10
    assert probe.first_deviation(demo, demo) is None
    assert probe.first_deviation(demo, demo[:8]) is None  # stopped early: no departure to point at


def test_token_at_char_maps_characters_to_multi_character_tokens():
    class PairTokenizer:  # tokens 0, 1, 2 decode to "ab", "c", "de"
        def decode(self, ids):
            return {0: "ab", 1: "c", 2: "de"}[ids[0]]

    assert [probe.token_at_char(PairTokenizer(), [0, 1, 2], c) for c in range(5)] == [0, 0, 1, 2, 2]
    assert probe.token_at_char(CharTokenizer(), [ord(x) for x in "abc"], 1) == 1


def test_credit_splits_wrong_rows_at_their_slip_and_averages_per_token():
    q = [np.array([0.1, 0.2, -1.0, 0.3]), np.array([0.5, 0.5]), np.array([9.0, 9.0])]
    ref = [np.array([-0.1, -0.1, -3.0, -0.2]), np.array([-0.1, -0.1]), np.array([0.0, 0.0])]
    out = probe.credit(q, ref, slips=[2, None, None], correct=[False, True, False])
    assert out["wrong_rows_with_slip"] == 1  # the third row is wrong with no slip found: left out
    np.testing.assert_allclose([out["q_per_token"][k] for k in ("before", "at", "after", "correct_rows")],
                               [0.15, -1.0, 0.3, 0.5])
    np.testing.assert_allclose([out["ref_logprob_per_token"][k] for k in ("before", "at", "after")], [-0.1, -3.0, -0.2])


def test_text_copies_counts_equal_responses_within_each_group():
    texts = ["a", "a", "b", "a", "x", "y", "x", "x"]
    np.testing.assert_array_equal(probe.text_copies(texts, 4), [[3, 3, 1, 3], [3, 1, 3, 3]])


def test_signal_metrics_reports_top_picks_of_answers_sampled_once():
    """A signal whose top pick is a once-sampled wrong response in one group picks below a random
    pick (which favours the frequent right one), and the rare-pick share says why."""
    scores = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]], np.float64)
    copies = np.array([[3, 3, 3, 1], [3, 3, 3, 1], [4, 4, 4, 4]])
    signal = np.array([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    m = probe.signal_metrics(scores, signal, 4, copies)
    assert m["ranking_accuracy"] == 0.5  # the first group's pairs all wrong, the second's all right
    assert abs(m["best_of_4"] - 1 / 3) < 1e-12  # wrong, right, (all wrong)
    assert m["top_pick_sampled_once"] == 0.5 and m["top_pick_sampled_once_accuracy"] == 0.0
    assert "top_pick_sampled_once" not in probe.signal_metrics(scores, signal, 4)


def test_pair_ranking_orders_better_above_worse_within_groups_only():
    """Right answers with right steps (better) against right answers through a wrong step (worse):
    pairs form inside each group, ties count half, a group without both kinds adds no pair."""
    signal = np.array([[3.0, 1.0, 2.0, 0.0], [5.0, 5.0, 9.0, 9.0], [1.0, 2.0, 3.0, 4.0]])
    better = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]], bool)
    worse = np.array([[0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], bool)
    ranking, pairs = probe.pair_ranking(signal, better, worse)
    assert pairs == 3 and abs(ranking - 2.5 / 3) < 1e-12  # 3 > 1, 3 > 2, 5 = 5
    assert probe.pair_ranking(signal, better & False, worse) == (None, 0)


def test_credit_on_right_answers_through_a_wrong_step():
    q = [np.array([0.1, -0.5, 0.2]), np.array([0.3, 0.3]), np.array([1.0, 1.0])]
    ref = [np.array([-0.1, -2.0, -0.1]), np.array([-0.1, -0.1]), np.array([0.0, 0.0])]
    out = probe.credit(q, ref, slips=[1, None, 0], correct=[True, True, False], want_correct=True)
    assert out["wrong_rows_with_slip"] == 1  # the right answer with a slip; the wrong row is left out
    np.testing.assert_allclose([out["q_per_token"][k] for k in ("before", "at", "after")], [0.1, -0.5, 0.2])
