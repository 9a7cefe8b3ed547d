"""Where rows come from: parquet and JSON files, Hub specs (parsed, loaded through a stand-in, refused at once
offline), field mapping for MATH and ProcessBench, and errors that name the row."""
import json
import os
import subprocess
import sys

import pytest

import sources
from conftest import ROOT, free_port
from data_utils import load_benchmark, load_pairs, load_problems, split_steps
from sources import DataError

SHARED = os.path.join(ROOT, "..", "shared", "data")
MATH500 = os.path.join(SHARED, "math500", "test_first100.jsonl")
PROCESSBENCH = os.path.join(SHARED, "processbench")


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))


def test_parquet_rows_are_mapped_and_checked_with_their_index(tmp_path):
    rows = [{"problem": "What is $1+1$?", "solution": "We add: $1+1=2$, so $\\boxed{2}$.", "level": "Level 1"},
            {"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 1"},
            {"problem": "Nothing?", "solution": "No final answer here.", "level": "Level 2"}]
    write_parquet(tmp_path / "math.parquet", rows[:2])
    problems = load_problems(tmp_path / "math.parquet")
    assert [p["question"] for p in problems] == ["What is $1+1$?", "Half of 1?"]
    assert [split_steps(p["answer"])[1] for p in problems] == ["2", "\\frac{1}{2}"]
    assert problems[0]["level"] == "Level 1" and "problem" not in problems[0]
    write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError, match=r"bad\.parquet\[2\]: field 'answer' has no final line '#### <answer>' and no"):
        load_problems(tmp_path / "bad.parquet")


def test_json_list_and_missing_file_errors(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps([{"problem": "p", "steps": ["a", "b"], "label": 1},
                                                 {"problem": "p", "steps": ["a"], "label": 1}, 3]))
    with pytest.raises(DataError, match=r"b\.json\[1\]: field 'label' must be -1 or the index of a step \(0\.\.0\), got 1$"):
        load_benchmark(tmp_path / "b.json")
    (tmp_path / "c.json").write_text('{"problem": "p"}')
    with pytest.raises(DataError, match=r"c\.json: expected a JSON list of rows, got a dict"):
        load_benchmark(tmp_path / "c.json")
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_problems(tmp_path / "nope.jsonl")
    (tmp_path / "q.json").write_text(json.dumps([{"question": "p", "steps": ["a"], "label": -1}]))
    assert load_benchmark(tmp_path / "q.json") == [{"problem": "p", "steps": ["a"], "label": -1}]


@pytest.mark.parametrize("spec, parsed", [
    ("hf:openai/gsm8k:main:test", ("openai/gsm8k", None, "main", "test")),
    ("hf:Qwen/ProcessBench::gsm8k", ("Qwen/ProcessBench", None, None, "gsm8k")),
    ("hf:xinlai/Math-Step-DPO-10K", ("xinlai/Math-Step-DPO-10K", None, None, "train")),
    ("hf:HuggingFaceH4/MATH-500@abc123::test", ("HuggingFaceH4/MATH-500", "abc123", None, "test")),
])
def test_parse_hub_spec(spec, parsed):
    assert sources.parse_hub_spec(spec) == parsed


def test_hub_spec_is_loaded_at_the_commit_the_hub_reports(monkeypatch):
    """The Hub is replaced by stand-ins (this machine has no network): the spec becomes load_dataset's
    arguments, pinned to the reported commit, and a bad row is named by its index."""
    import datasets
    import huggingface_hub

    calls = []

    class Info:
        sha = "0123abcd"

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, repo, revision, timeout: Info())

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list([{"question": "q", "answer": "1 + 1 = 2\n#### 2"},
                                           {"question": "q", "answer": "no mark"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError, match=r"^hf:openai/gsm8k:main:test\[1\]: field 'answer' has no final line"):
        load_problems("hf:openai/gsm8k:main:test")
    assert calls == [(("openai/gsm8k", "main"), {"split": "test", "revision": "0123abcd"})]


@pytest.mark.parametrize("env", [{"HF_ENDPOINT": "http://127.0.0.1:{port}"}, {"HF_HUB_OFFLINE": "1"}],
                         ids=["hub-unreachable", "offline-not-cached"])
def test_hub_spec_offline_fails_at_once_with_how_to_pass_a_file(tmp_path, env):
    env = {k: v.format(port=free_port()) for k, v in env.items()}
    code = "import data_utils; data_utils.load_problems('hf:openai/gsm8k:main:test')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HOME=str(tmp_path / "hf"), **env))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("sources.DataError: hf:openai/gsm8k:main:test: ")
    assert "to_parquet('test.parquet') and pass that file instead of hf:openai/gsm8k:main:test" in last


def test_pairs_from_parquet_and_trl_rows(tmp_path):
    step = {"dataset": "MATH", "prompt": "q", "initial_reason_steps": "Step 1: a\n", "chosen": "Step 2: b\n",
            "rejected": "Step 2: c\n", "full_chosen": "Step 2: b\nThe answer is $\\boxed{1}$.",
            "full_rejected": "Step 2: c\n", "answer": "1"}
    write_parquet(tmp_path / "step.parquet", [step, step | {"chosen": None}])
    with pytest.raises(DataError, match=r"step\.parquet\[1\]: field 'chosen' must be a string, got null"):
        load_pairs(str(tmp_path / "step.parquet"), "step")
    (tmp_path / "trl.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                                        + json.dumps({"prompt": "q", "chosen": "a", "rejected": 3}) + "\n")
    with pytest.raises(DataError, match=r"trl\.jsonl:2: field 'rejected' must be a string, got 3"):
        load_pairs(str(tmp_path / "trl.jsonl"), "outcome")
    with pytest.raises(DataError, match=r"trl\.jsonl:1: field 'chosen_steps' is missing"):
        load_pairs(str(tmp_path / "trl.jsonl"), "weighted")


@pytest.mark.skipif(not os.path.exists(MATH500), reason="MATH-500 slice not found at ../shared/data/math500")
def test_math500_slice_loads_as_problems():
    problems = load_problems(MATH500)
    assert len(problems) == 100 and all(set(p) >= {"question", "answer", "unique_id"} for p in problems)


@pytest.mark.skipif(not os.path.isdir(PROCESSBENCH), reason="ProcessBench not found at ../shared/data/processbench")
@pytest.mark.parametrize("name, n, n_correct", [("gsm8k.json", 400, 193), ("math_first100.json", 100, 0)])
def test_processbench_files_load(name, n, n_correct):
    rows = load_benchmark(os.path.join(PROCESSBENCH, name))
    assert len(rows) == n and sum(r["label"] == -1 for r in rows) == n_correct
