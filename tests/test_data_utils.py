import json
import os
import subprocess
import sys

import pytest

from conftest import GSM8K_DIR, ROOT
from data_utils import (answers_match, extract_answer, join_solution, load_problems, split_steps, step_separator,
                        strip_calculator, to_step_rows)
from sources import DataError

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
        f"{path}:8: field 'answer' has no final line '#### <answer>' and no \\boxed{{<answer>}}",
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
    # LaTeX answers, graded by math-verify
    ("\\frac12", "1/2", True), ("x=3", "3", True), ("3\\sqrt{2}", "3\\sqrt2", True), ("\\frac{\\sqrt{3}}{2}",
     "\\sqrt{3}/2", True), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
    ("3\\sqrt{2}", "2\\sqrt{3}", False), ("\\frac{1}{3}", "0.33", False), ("x=4", "3", False),
])
def test_answers_match(a, b, same):
    assert answers_match(a, b) is same


@pytest.mark.parametrize("text, expected", [
    ("so $x = \\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{\\left\\{1, 2\\right\\}} then \\boxed{\\dfrac{a}{b^{2}}}", "\\dfrac{a}{b^{2}}"),
    ("unclosed \\boxed{\\frac{1}{2}", None),
])
def test_boxed_extraction_balances_braces(text, expected):
    assert extract_answer(text) == expected


def test_step_delimiters_split_and_join_back():
    blocks = "## Step 1: Add.\n3 + 4 = 7.\n\n## Step 2: Double.\n2 * 7 = 14.\n\nThe answer is $\\boxed{14}$."
    steps, final = split_steps(blocks, "markdown_step")
    assert steps == ["## Step 1: Add.\n3 + 4 = 7.", "## Step 2: Double.\n2 * 7 = 14.\n\nThe answer is $\\boxed{14}$."]
    assert final == "14" and join_solution(steps, final, step_separator("markdown_step")) == blocks
    assert split_steps(blocks, "blank_line")[0] == ["## Step 1: Add.\n3 + 4 = 7.", "## Step 2: Double.\n2 * 7 = 14.",
                                                     "The answer is $\\boxed{14}$."]
    assert split_steps(blocks)[0] == ["Add.\n3 + 4 = 7.", "Double.\n2 * 7 = 14.\n\nThe answer is $\\boxed{14}$."]
    lines = "Step 1: a\nmore of a\nStep 2: b\n#### 5"
    assert split_steps(lines, "step") == (["Step 1: a\nmore of a", "Step 2: b"], "5")
    assert join_solution(["a", "b"], "5") == "a\nb\n#### 5" and join_solution(["\\boxed{5}"], "5") == "\\boxed{5}"


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


MATH500 = os.path.join(ROOT, "..", "shared", "data", "math500", "test_first100.jsonl")


@pytest.mark.skipif(not os.path.exists(MATH500), reason="MATH-500 slice not found at ../shared/data/math500")
def test_real_math500_answers_extract_from_their_solutions_and_grade_equal():
    rows = [json.loads(line) for line in open(MATH500, encoding="utf-8")]
    for row in rows:
        extracted = extract_answer(row["solution"])
        assert extracted is not None, row["unique_id"]
        assert answers_match(extracted, extracted) and answers_match(row["answer"], row["answer"]), row["unique_id"]
        assert answers_match(extracted, row["answer"]), (row["unique_id"], extracted, row["answer"])
    assert [p["answer"] for p in load_problems(MATH500)] == [r["solution"] for r in rows]
