"""pipeline.py: the stages of each round, and the summary table."""
import pytest

import pipeline
from data_utils import PAIRS_POOL

CFG = {"RUN_DIR": "run", "MODE": "step", "ROUNDS": 2, "N_PROBLEMS": 700, "TRAIN_EPOCHS": 3, "TRAIN_LR": 2e-5,
       "STAGE_ARGS": {}}


def test_each_round_trains_the_last_rounds_policy_on_fresh_pool_problems():
    stages = {name: (script, args) for name, script, args in pipeline.stages(CFG)}
    assert list(stages) == ["data", "steps", "sft", "eval_start", "judge_1", "train_1", "eval_1", "judge_2",
                            "train_2", "eval_trained"]
    first = PAIRS_POOL[0]
    assert stages["judge_1"][1] == ["--POLICY=models/policy", f"--FIRST_PROBLEM={first}", "--N_PROBLEMS=700",
                                    "--OUT_DIR=run/round1/judged", "--JUDGE_PAST_ERROR=False"]   # step pairs need no more
    assert stages["train_1"][1] == ["--MODEL=models/policy", "--DATA=run/round1/judged/step_pairs.jsonl", "--MODE=step",
                                    "--EPOCHS=3", "--LR=2e-05", "--OUT_DIR=run/round1/train"]
    assert stages["eval_1"][1][:2] == ["--MODEL=run/round1/train/model", "--K=0"]
    assert stages["judge_2"][1][:3] == ["--POLICY=run/round1/train/model", f"--FIRST_PROBLEM={first + 700}",
                                        "--N_PROBLEMS=700"]
    assert stages["train_2"][1][0] == "--MODEL=run/round1/train/model"
    assert stages["eval_trained"][1][0] == "--MODEL=run/round2/train/model"
    outcome = {name: args for name, _, args in pipeline.stages(CFG | {"MODE": "outcome", "ROUNDS": 1})}
    assert outcome["train_1"][1] == "--DATA=run/round1/judged/outcome_pairs.jsonl"
    weighted = {name: args for name, _, args in pipeline.stages(CFG | {"MODE": "weighted", "ROUNDS": 1})}
    assert weighted["judge_1"][-1] == "--JUDGE_PAST_ERROR=True"   # weighted pairs need every step scored


def test_rounds_that_need_more_problems_than_the_pool_are_refused():
    size = PAIRS_POOL[1] - PAIRS_POOL[0]
    with pytest.raises(SystemExit, match=f"need {size + 2} pool problems; the pairs pool .* has {size}"):
        pipeline.stages(CFG | {"N_PROBLEMS": size // 2 + 1})
    with pytest.raises(SystemExit, match="--MODE must be step, weighted or outcome"):
        pipeline.stages(CFG | {"MODE": "dpo"})


def test_table_by_hand():
    start = {"greedy_acc": 0.25, "maj_at_8": 0.2, "judge_best_of_8": 0.3}
    trained = {"greedy_acc": 0.3, "maj_at_8": 0.25, "judge_best_of_8": 0.325}
    assert pipeline.table(start, trained, 8).splitlines()[2:] == [
        "| greedy accuracy | 25.0% | 30.0% | +5.0% |", "| majority@8 | 20.0% | 25.0% | +5.0% |",
        "| judge best-of-8 | 30.0% | 32.5% | +2.5% |"]
