import json
import os
import subprocess
import sys

import pytest

from conftest import GSM8K_DIR, ROOT
from data_utils import (answers_match, extract_answer, join_solution, load_problems, split_steps, strip_calculator,
                        to_step_rows)
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
])
def test_answers_match(a, b, same):
    assert answers_match(a, b) is same


















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
