"""evaluate.py: the policy's metrics by hand, judge best-of-K, and the run folder."""
import json
import os

import pytest

import evaluate
from conftest import COMMITTED, ROOT, FakeServer


def test_score_samples_by_hand():
    gold = ["5", "7"]
    greedy = ["x\n#### 5", "x\n#### 6"]
    samples = [["#### 5", "#### 4", "#### 4"], ["#### 7", "#### 7", "#### 1"]]
    m = evaluate.score_samples(gold, greedy, samples)
    assert m["greedy_acc"] == 0.5 and m["sample_acc"] == pytest.approx(3 / 6)
    assert m["pass_at_k"] == pytest.approx([(1 / 3 + 2 / 3) / 2, (2 / 3 + 1) / 2, 1.0])
    assert m["maj_at_k"] == pytest.approx([1.0, 1.0, 0.5]) and m["maj_at_3"] == 0.5 and m["pass_at_3"] == 1.0


def test_judge_pick():
    assert evaluate.judge_pick([[0.9, 0.2], [0.5, 0.6], [0.6, 0.5]], "min") == 1
    assert evaluate.judge_pick([[0.9, 0.2], [0.5, 0.6], [0.6, 0.5]], "last") == 1
    assert evaluate.judge_pick([[0.9, 0.2], [0.5, 0.6], [0.6, 0.5]], "prod") == 1
    assert evaluate.judge_pick([[], [0.0]], "min") == 0


def test_evaluate_main_writes_run_folder(tmp_path):
    out = tmp_path / "eval"
    evaluate.main([f"--MODEL={os.path.join(COMMITTED, 'policy')}", "--N_PROBLEMS=6", "--K=2",
                   f"--OUT_DIR={out}", "--MAX_NEW_TOKENS=120", f"--CACHE_DIR={tmp_path / 'cache'}",
                   f"--JUDGE_EVAL_FILE={tmp_path / 'judge_eval.json'}"])
    judge_eval = json.loads((tmp_path / "judge_eval.json").read_text())
    assert set(judge_eval["best_of_n"]) == {"n", "judge_min", "judge_prod", "judge_last", "majority", "greedy",
                                            "random"}
    assert 0.0 <= judge_eval["step_auroc"] <= 1.0 and "evaluate" in judge_eval["command"]
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert metrics["n_problems"] == 6 and metrics["k"] == 2 and len(metrics["pass_at_k"]) == 2
    assert config["K"] == 2 and "evaluate" in config["command"]
    assert len(samples) == 6 and all(len(s["samples"]) == 2 for s in samples)
    assert (out / "passk.png").stat().st_size > 1000
    recount = sum(evaluate.answers_match(s["greedy_answer"], s["gold"]) for s in samples) / 6
    assert metrics["greedy_acc"] == recount


def test_greedy_only_evaluation_with_k_0(tmp_path):
    out = tmp_path / "eval"
    evaluate.main([f"--MODEL={os.path.join(COMMITTED, 'policy')}", "--N_PROBLEMS=5", "--K=0", "--JUDGE=",
                   "--JUDGE_EVAL_FILE=", f"--OUT_DIR={out}", "--MAX_NEW_TOKENS=120"])
    metrics = json.loads((out / "metrics.json").read_text())
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert set(metrics) == {"n_problems", "k", "greedy_acc", "seconds"} and metrics["k"] == 0
    assert len(samples) == 5 and "samples" not in samples[0] and not (out / "passk.png").exists()
    assert metrics["greedy_acc"] == sum(evaluate.answers_match(s["greedy_answer"], s["gold"]) for s in samples) / 5


PROCESSBENCH = os.path.join(ROOT, "..", "shared", "data", "processbench")
GSM8K_TEST = os.path.join(ROOT, "..", "shared", "data", "gsm8k", "test.jsonl")


@pytest.mark.skipif(not os.path.isdir(PROCESSBENCH), reason="ProcessBench not found at ../shared/data/processbench")
def test_processbench_with_reference_labels_and_an_always_yes_judge(tmp_path):
    splits = [os.path.join(PROCESSBENCH, name) for name in ("gsm8k.json", "math_first100.json")]
    common = [f"--PROCESSBENCH={','.join(splits)}", f"--CACHE_DIR={tmp_path / 'cache'}"]
    labels = evaluate.main([*common, "--JUDGE=labels", f"--OUT_DIR={tmp_path / 'labels'}"])
    gsm8k, math = labels["splits"]["gsm8k"], labels["splits"]["math_first100"]
    assert (gsm8k["f1"], gsm8k["acc_erroneous"], gsm8k["acc_correct"]) == (1.0, 1.0, 1.0)
    assert (gsm8k["n_erroneous"], gsm8k["n_correct"], gsm8k["n"]) == (207, 193, 400)
    # the math slice holds no correct solution: no accuracy on correct ones, so no F1 (not a made-up number)
    assert (math["f1"], math["acc_erroneous"], math["acc_correct"], math["n_correct"]) == (None, 1.0, None, 0)
    assert labels["mean_f1"] == 1.0 and labels["judge"].startswith("labels@")
    assert json.loads((tmp_path / "labels" / "processbench.json").read_text())["splits"]["gsm8k"]["f1"] == 1.0
    with FakeServer(score=lambda prompt: 0.99) as server:   # a served judge that accepts every step
        yes = evaluate.main([*common, f"--JUDGE={server.url}", "--JUDGE_MODEL_NAME=yes", "--JUDGE_MODE=one_pass",
                             f"--OUT_DIR={tmp_path / 'yes'}"])
    # it never finds an error: right on every correct solution, wrong on every erroneous one, F1 = 0
    assert (yes["splits"]["gsm8k"]["acc_correct"], yes["splits"]["gsm8k"]["acc_erroneous"]) == (1.0, 0.0)
    assert yes["splits"]["gsm8k"]["f1"] == 0.0 and yes["splits"]["math_first100"]["acc_erroneous"] == 0.0
    steps = sum(len(r["steps"]) for path in splits for r in json.load(open(path, encoding="utf-8")))
    assert len(server.seen) == steps and yes["judge"].startswith(server.url)


@pytest.mark.skipif(not os.path.exists(GSM8K_TEST), reason="real GSM8K not found at ../shared/data/gsm8k")
def test_no_judge_quality_numbers_without_reference_labels(tmp_path):
    """On real GSM8K the bundled task's checker means nothing: best-of-K is reported, judge quality is not."""
    out = tmp_path / "eval"
    evaluate.main([f"--MODEL={os.path.join(COMMITTED, 'policy')}", f"--TEST_FILE={GSM8K_TEST}", "--N_PROBLEMS=2",
                   "--K=2", f"--OUT_DIR={out}", "--MAX_NEW_TOKENS=40", f"--CACHE_DIR={tmp_path / 'cache'}",
                   f"--JUDGE_EVAL_FILE={tmp_path / 'judge_eval.json'}"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert "judge_min" in metrics and "judge_quality" not in metrics
    assert not (tmp_path / "judge_eval.json").exists()
    assert json.loads((out / "config.json").read_text())["STEP_LABELS"] == "auto"
    problems = evaluate.load_problems(os.path.join(ROOT, "data", "test.jsonl"))[:3]
    assert evaluate.task_labelled(problems) and not evaluate.task_labelled(evaluate.load_problems(GSM8K_TEST)[:3])
