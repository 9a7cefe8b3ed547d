"""The bundled task: the arithmetic parser, reference step labels, the generator and corrupted solutions."""
import os
import random
from fractions import Fraction

import pytest

import data_utils
from conftest import ROOT
from data_utils import answers_match, load_problems, normalize_answer, split_steps
from task import corrupt_solution, eval_arith, find_equations, generate_task, label_steps, make_problem


@pytest.mark.parametrize("expr, value", [
    ("48/2", 24), ("0.2 x 50", 10), ("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("-3 + 10", 7), ("7 / 2", Fraction(7, 2)),
    ("1,000 - 1", 999), ("2 × 3 ÷ 4", Fraction(3, 2)), ("10 - 2 - 3", 5), ("--4", 4),
])
def test_eval_arith(expr, value):
    assert eval_arith(expr) == value


@pytest.mark.parametrize("expr", ["__import__('os')", "2 ** 3", "1 / 0", "(1 + 2", "1 +", "", "3 4"])
def test_eval_arith_refuses(expr):
    with pytest.raises(ValueError):
        eval_arith(expr)


def test_find_equations():
    assert find_equations("He has 3 + 4 = <<3+4=7>>7 and 7 * 2 = 14 left.") == [("3 + 4", 7), ("7 * 2", 14)]
    assert find_equations("It costs $12/60 = $0.2 per minute") == [("12/60", Fraction(1, 5))]
    assert find_equations("No maths here.") == []


def test_label_steps_hand_cases():
    gold = "A has 3 + 4 = <<3+4=7>>7.\nThen 7 * 2 = <<7*2=14>>14.\n#### 14"
    assert label_steps(gold, ["A has 4 + 3 = 7.", "Then 7 * 2 = 14."]) == [True, True]      # order of operands
    assert label_steps(gold, ["A has 3 + 4 = 8.", "Then 8 * 2 = 16."]) == [False, False]    # slip propagates
    assert label_steps(gold, ["A has 3 + 4 = 7.", "Then 7 * 3 = 21."]) == [True, False]     # wrong operand
    assert label_steps(gold, ["A has 5 + 2 = 7.", "Then 7 * 2 = 14."]) == [False, True]     # right value, wrong operands
    assert label_steps(gold, ["A has 7.", "Then 7 * 2 = 14.", "And 1 + 1 = 2."]) == [False, True, False]


def test_generator_is_deterministic_and_split_is_disjoint():
    train, test = generate_task(300, 50, seed=3)
    assert (train, test) == generate_task(300, 50, seed=3)
    assert train != generate_task(300, 50, seed=4)[0]
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    assert len(train) == 300 and len(test) == 50


def test_generated_problems_are_consistent():
    rng = random.Random(0)
    for _ in range(300):
        p = make_problem(rng)
        steps, final = split_steps(p["answer"])
        assert all(label_steps(p["answer"], steps))
        assert all(eq[1] == eval_arith(eq[0]) for s in steps for eq in find_equations(s))
        assert normalize_answer(final) == normalize_answer(str(find_equations(steps[-1])[-1][1]))
        assert 2 <= len(steps) <= 9 and int(final) >= 0


def test_committed_data_is_what_the_generator_writes():
    train, test = generate_task(data_utils.N_TRAIN, data_utils.N_TEST, data_utils.SEED)
    assert load_problems(os.path.join(ROOT, data_utils.TRAIN_FILE)) == train
    assert load_problems(os.path.join(ROOT, data_utils.TEST_FILE)) == test


def test_corruption_places_the_first_error():
    rng = random.Random(1)
    train, _ = generate_task(400, 1, seed=9)
    kinds = set()
    for p in train:
        steps, final = split_steps(p["answer"], strip_calc=True)
        bad_steps, bad_final, j = corrupt_solution(steps, final, rng, p["question"])
        labels = label_steps(p["answer"], bad_steps)
        assert all(labels[:j]) and not labels[j] and bad_steps[:j] == steps[:j]
        kinds.add("arith" if any(eval_arith(l) != v for l, v in find_equations(bad_steps[j])) else "semantic")
        assert answers_match(bad_final, str(find_equations(bad_steps[-1])[-1][1]))
        if j == len(steps) - 1:
            assert not answers_match(bad_final, final)
    assert kinds == {"arith", "semantic"}
