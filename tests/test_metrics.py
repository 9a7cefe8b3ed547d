"""Metrics, by hand."""
import pytest

import metrics


def test_pass_at_k_and_majority():
    assert metrics.pass_at_k(8, 0, 3) == 0.0 and metrics.pass_at_k(8, 8, 1) == 1.0
    assert metrics.pass_at_k(4, 1, 2) == pytest.approx(0.5)          # 1 - C(3,2)/C(4,2)
    assert metrics.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert metrics.majority_answer(["3", "3.0", "4", None]) == "3"
    assert metrics.majority_answer(["4", "3"]) == "4" and metrics.majority_answer([None]) is None


def test_spearman_by_hand():
    assert metrics.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert metrics.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks with ties: a -> [1, 2.5, 2.5, 4], b -> [1, 2, 3, 4]; Pearson of the ranks = 4.5 / sqrt(4.5 * 5)
    assert metrics.spearman([0.1, 0.5, 0.5, 0.9], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert metrics.spearman([1, 1, 1], [1, 2, 3]) is None and metrics.spearman([1], [2]) is None
    with pytest.raises(ValueError):
        metrics.spearman([1, 2], [1])


def test_auroc_by_hand():
    assert metrics.auroc([0.9, 0.8, 0.3, 0.1], [True, True, False, False]) == 1.0
    assert metrics.auroc([0.1, 0.9], [True, False]) == 0.0
    # pairs (pos, neg): (0.5, 0.5) tie = 0.5, (0.5, 0.2) = 1, (0.9, 0.5) = 1, (0.9, 0.2) = 1 -> 3.5 / 4
    assert metrics.auroc([0.5, 0.9, 0.5, 0.2], [True, True, False, False]) == pytest.approx(0.875)
    assert metrics.auroc([0.5], [True]) is None


def test_processbench_f1_by_hand():
    m = metrics.processbench_f1(predicted=[1, 2, -1, -1, 0], reference=[1, 0, -1, 2, -1])
    assert m["acc_erroneous"] == pytest.approx(1 / 3) and m["acc_correct"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    only_wrong = metrics.processbench_f1(predicted=[1, 0], reference=[1, 2])  # no correct solution to score
    assert (only_wrong["acc_erroneous"], only_wrong["acc_correct"], only_wrong["f1"]) == (0.5, None, None)
    assert metrics.processbench_f1(predicted=[-1, -1], reference=[0, -1])["f1"] == 0.0  # always "no error"


def test_first_error_auroc_splits_first_errors_by_kind():
    ok, slip, wrong_qty, later = "She has 3 + 4 = 7 apples.", "She has 3 + 4 = 8 apples.", "She has 3 + 5 = 8 apples.", "x"
    solutions = [([ok, slip, later], [True, False, False], [0.9, 0.3, 0.1]),  # slip below every right step
                 ([wrong_qty], [False], [0.95]),                             # other error above every right step
                 ([ok, ok], [True, True], [0.8, 0.7])]
    m = metrics.first_error_auroc(solutions)
    # only the first error of a solution counts: the later wrong step (0.1) is in neither group
    assert m == {"arithmetic_slip": 1.0, "other": 0.0, "n_right_steps": 3, "n_arithmetic_slip": 1, "n_other": 1}


def test_bootstrap_difference_is_paired_and_holds_the_seeds_noise():
    bootstrap_difference = metrics.bootstrap_difference
    same = [[1, 0, 1, 1, 0] * 20]
    assert bootstrap_difference(same, same) == {"difference": 0.0, "low": 0.0, "high": 0.0}  # one draw for both
    better = [[1, 1, 1, 1, 0] * 20]                      # right on 20 more of the 100 problems
    d = bootstrap_difference(better, same)
    assert d["difference"] == pytest.approx(0.2) and 0.1 < d["low"] < 0.2 < d["high"] < 0.3
    d = bootstrap_difference([[1] * 100, [0] * 100], [[1, 0] * 50])   # two seeds that disagree: a wide interval
    assert d["difference"] == pytest.approx(0.0) and d["low"] <= -0.4 and d["high"] >= 0.4
    assert bootstrap_difference(better, same, seed=3) == bootstrap_difference(better, same, seed=3)
    with pytest.raises(ValueError, match="same problems"):
        bootstrap_difference([[1, 0, 1]], [[1, 0]])
