"""reward_model.py end to end on the committed tiny models: outputs, schema, kill while sampling and resume
(kills while judging: test_faults.py)."""
import json

import pytest

from conftest import JUDGE_RUN_ARGS, JUDGE_RUN_OUTPUTS, kill_when, line_count, run_script


def run(folder, extra=(), wait=True):
    """reward_model.py on JUDGE_RUN_ARGS into folder/out and folder/cache: the printed summary, or the Popen
    (wait=False)."""
    args = [*JUDGE_RUN_ARGS, f"--OUT_DIR={folder}/out", f"--CACHE_DIR={folder}/cache", *extra]
    proc = run_script("reward_model.py", args, wait=wait)
    return json.loads(proc.stdout.strip().splitlines()[-1]) if wait else proc


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fresh")
    return folder, run(folder)


def test_outputs_and_counts(fresh):
    folder, printed = fresh
    out = folder / "out"
    judged = [json.loads(x) for x in (out / "judged.jsonl").read_text().splitlines()]
    assert len(judged) == 12 * 4
    for row in judged:
        assert set(row) >= {"prompt", "completions", "labels", "step_scores"}
        assert len(row["completions"]) == len(row["labels"]) == len(row["step_scores"])
        assert all(0.0 <= s <= 1.0 for s in row["step_scores"])
        assert row["labels"] == [s >= 0.5 for s in row["step_scores"]]
    counts = json.loads((out / "counts.json").read_text())
    assert counts["samples"] == 48 and counts["correct_samples"] == sum(r["correct"] for r in judged)
    assert counts["step_pairs"] == sum(counts["step_pairs_by_source"].values())
    assert printed["computed"]["samples"] == 12 and printed["computed"]["scored"] == 48
    config = json.loads((out / "config.json").read_text())
    assert "reward_model.py" in config["command"] and config["K"] == 4


def test_step_pairs_have_the_step_dpo_schema(fresh):
    import datasets

    folder, _ = fresh
    path = folder / "out" / "step_pairs.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    if not rows:
        pytest.skip("no pairs in this tiny run")
    features = datasets.Features({k: datasets.Value("string") for k in (
        "prompt", "initial_reason_steps", "chosen", "rejected", "full_chosen", "full_rejected", "answer")})
    ds = datasets.load_dataset("json", data_files=str(path), features=features, split="train")
    assert len(ds) == len(rows)
    for row in rows:
        assert row["chosen"].endswith("\n") and row["rejected"].endswith("\n")
        assert "<|endoftext|>" not in row["chosen"] + row["rejected"] + row["full_chosen"]
        assert row["chosen"] != row["rejected"] and row["chosen"].count("\n") == 1


def test_second_run_scores_nothing_and_writes_the_same_bytes(fresh):
    folder, _ = fresh
    before = {name: (folder / "out" / name).read_bytes() for name in JUDGE_RUN_OUTPUTS}
    printed = run(folder)
    assert printed["computed"] == {"samples": 0, "scored": 0, "rectify_samples": 0, "rectify_scored": 0}
    assert {name: (folder / "out" / name).read_bytes() for name in JUDGE_RUN_OUTPUTS} == before


def test_sigkill_while_sampling_then_resume_gives_identical_outputs(fresh, tmp_path):
    folder, _ = fresh
    samples = tmp_path / "cache" / "samples.jsonl"
    kill_when(run(tmp_path, wait=False), lambda: line_count(samples) >= 1)
    done = line_count(samples)
    assert 1 <= done < 12
    printed = run(tmp_path)
    assert printed["computed"]["samples"] == 12 - done // 3 * 3
    for name in JUDGE_RUN_OUTPUTS:
        assert (tmp_path / "out" / name).read_bytes() == (folder / "out" / name).read_bytes(), name
