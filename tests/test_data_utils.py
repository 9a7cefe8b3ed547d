import json
import os
import random
import subprocess
import sys
from fractions import Fraction

import pytest

from conftest import GSM8K_DIR, ROOT
from data_utils import (DataError, answers_match, corrupt_solution, eval_arith, extract_answer, find_equations,
                        generate_task, join_solution, label_steps, load_problems, make_problem, normalize_answer,
                        split_steps, strip_calculator, to_step_rows)

GOOD = {"question": "Tom has 3 apples. He finds 2 more. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"}


def run_validate(path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "data_utils.py"), "--validate", str(path)],
                          capture_output=True, text=True, cwd=ROOT)
    lines = proc.stdout.strip().split("\n")
    return proc.returncode, lines[:-1], json.loads(lines[-1])


def test_validate_reports_each_bad_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [json.dumps(GOOD).encode(),
            b"{not json",
            json.dumps(GOOD).encode() + b" trailing",
            b"[1, 2]",
            json.dumps({"answer": "#### 1"}).encode(),
            json.dumps({"question": "", "answer": "#### 1"}).encode(),
            json.dumps({"question": 5, "answer": "#### 1"}).encode(),
            json.dumps({"question": "q", "answer": "1 + 1 = 2"}).encode(),
            b'{"question": "caf\xe9", "answer": "#### 1"}',
            b"",
            json.dumps(GOOD).encode()]
    path.write_bytes(b"\n".join(rows) + b"\n")
    code, errors, summary = run_validate(path)
    assert code == 1
    assert errors == [
        f"{path}:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{path}:3: not valid JSON (Extra data at column {len(json.dumps(GOOD)) + 2})",
        f"{path}:4: row is a JSON list, expected an object",
        f"{path}:5: field 'question' is missing",
        f"{path}:6: field 'question' is empty",
        f"{path}:7: field 'question' must be a string, got int",
        f"{path}:8: field 'answer' has no final line '#### <answer>'",
        f"{path}:9: bytes at offset 17 are not valid UTF-8",
    ]
    assert summary["rows"] == 10 and summary["valid"] == 2 and summary["invalid"] == 8
    assert summary["steps_min"] == summary["steps_max"] == 1 and summary["steps_mean"] == 1.0


def test_validate_accepts_bom_and_crlf(tmp_path):
    path = tmp_path / "ok.jsonl"
    two = {"question": "q", "answer": "a = 1\r\nb = 2\r\n#### 2"}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n" + json.dumps(two).encode() + b"\r\n")
    code, errors, summary = run_validate(path)
    assert (code, errors) == (0, [])
    assert summary == {"file": str(path), "rows": 2, "valid": 2, "invalid": 0, "steps_min": 1, "steps_max": 2,
                       "steps_mean": 1.5}
    assert load_problems(path)[1]["answer"] == two["answer"]


def test_load_problems_names_file_line_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:2: field 'answer' is missing$"):
        load_problems(path)


def test_split_steps_gsm8k_lines():
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    steps, final = split_steps(answer)
    assert steps == ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.", "Natalia sold 48+24 = <<48+24=72>>72 clips."]
    assert final == "72"
    assert split_steps(answer, strip_calc=True)[0][0] == "Natalia sold 48/2 = 24 clips in May."


def test_split_steps_markers_and_delimiters():
    assert split_steps("Step 1: add 2. Step 2: double it.\n#### 8") == (["add 2.", "double it."], "8")
    assert split_steps("Step 1: a\nStep 2: b") == (["a", "b"], None)
    assert split_steps("a; b; c", delimiter=";") == (["a", "b", "c"], None)
    assert split_steps("x\r\n\r\ny\r\n#### 1") == (["x", "y"], "1")


def test_strip_calculator():
    assert strip_calculator("0.2 x 50 = $<<0.2*50=10>>10.") == "0.2 x 50 = $10."


@pytest.mark.parametrize("text, expected", [
    ("a\nb\n#### 1,080", "1,080"),
    ("so the total is \\boxed{\\frac{3}{4}} and \\boxed{12}", "12"),
    ("The answer is $-3.50.", "-3.50"),
    ("The answer is: 7/2", "7/2"),
    ("no final answer here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("a, b, same", [
    ("1,080", "1080", True), ("$18", "18", True), ("18.0", "18", True), ("18.", "18", True),
    ("6/8", "0.75", True), ("-3", "-3.00", True), ("\\frac{1}{2}", "1/2", True), ("-3", "3", False),
    ("18", "19", False), (None, "1", False), ("Seven", "seven", True),
])
def test_answers_match(a, b, same):
    assert answers_match(a, b) is same


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
    import data_utils as du
    train, test = generate_task(du.N_TRAIN, du.N_TEST, du.SEED)
    assert load_problems(os.path.join(ROOT, du.TRAIN_FILE)) == train
    assert load_problems(os.path.join(ROOT, du.TEST_FILE)) == test


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


def test_to_step_rows_shape():
    rows = to_step_rows([GOOD])
    assert rows == [{"prompt": GOOD["question"], "completions": ["3 + 2 = 5"], "labels": [True], "answer": "5"}]
    assert join_solution(["a", "b"], "3") == "a\nb\n#### 3"


@pytest.mark.skipif(not os.path.isdir(GSM8K_DIR), reason="real GSM8K not found at ../shared/data/gsm8k")
@pytest.mark.parametrize("name", ["train.jsonl", "test.jsonl"])
def test_real_gsm8k(name):
    path = os.path.join(GSM8K_DIR, name)
    code, errors, summary = run_validate(path)
    assert code == 0 and errors == [] and summary["invalid"] == 0 and summary["valid"] == summary["rows"] > 1000
    for row in load_problems(path):
        steps, final = split_steps(row["answer"])
        assert len(steps) == len([ln for ln in row["answer"].split("\n")[:-1] if ln.strip()])
        assert extract_answer(row["answer"]) == final and answers_match(final, final)
        assert answers_match(extract_answer(row["answer"]).replace(",", ""), final)
