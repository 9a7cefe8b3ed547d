"""experiments.py's bookkeeping: which problems a run is scored on, what a VARIANTS name trains, and when a
finished run is reused. The scripts it runs are recorded, not run."""
import json
import os

import pytest

import experiments
from data_utils import VALIDATION


class RecordingRunner:
    """Stands in for common.Stages: records each script's arguments and writes what an evaluation would: the
    greedy accuracy, and per problem (4 of them) the answer, the first acc * 4 right."""

    def __init__(self, acc=0.5):
        self.calls, self.acc = [], acc

    def run(self, name, script, args):
        self.calls.append((script, args))
        if script == "evaluate.py":
            out = next(a.split("=", 1)[1] for a in args if a.startswith("--OUT_DIR="))
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "metrics.json"), "w") as f:
                json.dump({"greedy_acc": self.acc}, f)
            with open(os.path.join(out, "samples.jsonl"), "w") as f:
                f.writelines(json.dumps({"gold": "7", "greedy_answer": "7" if i < self.acc * 4 else "8"}) + "\n"
                             for i in range(4))


def config(tmp_path, **over):
    """The experiment's defaults in tmp_path, with a one-line pairs file for every trained method."""
    for pairs_file, _ in experiments.TRAINING.values():
        path = tmp_path / pairs_file
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text('{"prompt": "p"}\n')
    cfg = {k: getattr(experiments, k) for k in experiments.CONFIG_KEYS}
    return cfg | {"RUN_DIR": str(tmp_path)} | over


def run(cfg, runner, method, seed):
    """The run's greedy accuracy."""
    return experiments.one_run(cfg, runner, method, seed, experiments.eval_problems(cfg))[0]


def arg(args, key):
    return next(a.split("=", 1)[1] for a in args if a.startswith(f"--{key}="))


def test_validation_runs_score_the_validation_problems_of_the_training_file(tmp_path):
    runner = RecordingRunner()
    run(config(tmp_path, EVAL_ON="validation"), runner, "sft", 0)
    (script, args), = runner.calls
    assert script == "evaluate.py" and arg(args, "TEST_FILE") == experiments.TRAIN_FILE
    assert (int(arg(args, "FIRST_PROBLEM")), int(arg(args, "N_PROBLEMS"))) == (VALIDATION[0], VALIDATION[1] - VALIDATION[0])
    assert VALIDATION[0] >= experiments.FIRST_PROBLEM + experiments.N_PROBLEMS  # no pair comes from them
    runner = RecordingRunner()
    run(config(tmp_path / "test"), runner, "sft", 0)
    assert arg(runner.calls[0][1], "TEST_FILE") == experiments.TEST_FILE
    assert arg(runner.calls[0][1], "FIRST_PROBLEM") == "0"
    with pytest.raises(SystemExit, match="EVAL_ON"):
        run(config(tmp_path, EVAL_ON="test_set"), RecordingRunner(), "sft", 0)
    small = tmp_path / "small.jsonl"
    small.write_text(open(experiments.TRAIN_FILE).readline())
    with pytest.raises(SystemExit, match="which has 1"):
        run(config(tmp_path, EVAL_ON="validation", TRAIN_FILE=str(small)), RecordingRunner(), "sft", 0)


def test_a_variant_trains_its_method_with_its_own_arguments_last(tmp_path):
    runner = RecordingRunner()
    cfg = config(tmp_path, TRAIN_ARGS=["--LR=1e-4"], VARIANTS={"low_beta": ["step_dpo", ["--BETA=0.05"]]})
    run(cfg, runner, "low_beta", 1)
    (script, args), _ = runner.calls
    assert script == "train_stepwise_dpo.py" and arg(args, "DATA").endswith("judged/step_pairs.jsonl")
    assert args[-3:] == ["--MODE=step", "--LR=1e-4", "--BETA=0.05"] and arg(args, "SEED") == "1"
    assert arg(runner.calls[1][1], "MODEL") == os.path.join(str(tmp_path), "runs", "low_beta-seed1", "model")


def test_a_finished_run_is_reused_only_with_the_same_settings(tmp_path):
    cfg = config(tmp_path)
    assert run(cfg, RecordingRunner(acc=0.25), "step_dpo", 0) == 0.25
    runner = RecordingRunner(acc=0.75)
    assert run(cfg, runner, "step_dpo", 0) == 0.25 and runner.calls == []
    for changed in (cfg | {"TRAIN_ARGS": ["--BETA=0.2"]}, cfg | {"TRAIN_STEPS": 10}, cfg | {"EVAL_ON": "validation"}):
        runner = RecordingRunner(acc=0.75)
        assert run(changed, runner, "step_dpo", 0) == 0.75 and len(runner.calls) == 2


def test_a_finished_run_is_redone_after_new_pairs_a_new_trainer_default_or_a_new_policy(tmp_path, monkeypatch):
    import train_stepwise_dpo

    cfg = config(tmp_path)
    assert run(cfg, RecordingRunner(acc=0.25), "step_dpo", 0) == 0.25
    (tmp_path / "judged" / "step_pairs.jsonl").write_text('{"prompt": "q"}\n')  # e.g. a rebuilt judge's pairs
    assert run(cfg, RecordingRunner(acc=0.5), "step_dpo", 0) == 0.5
    monkeypatch.setattr(train_stepwise_dpo, "BETA", train_stepwise_dpo.BETA * 2)
    runner = RecordingRunner(acc=0.75)
    assert run(cfg, runner, "step_dpo", 0) == 0.75 and len(runner.calls) == 2
    assert run(cfg, RecordingRunner(acc=0.9), "step_dpo", 0) == 0.75  # nothing changed since
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "model.safetensors").write_bytes(b"weights")
    assert run(cfg | {"POLICY": str(policy)}, RecordingRunner(acc=0.1), "sft", 0) == 0.1
    assert run(cfg, RecordingRunner(acc=0.2), "sft", 0) == 0.2


def test_a_trainer_tunable_added_since_a_run_keeps_it_only_at_its_default(tmp_path):
    cfg = config(tmp_path)
    assert run(cfg, RecordingRunner(acc=0.25), "step_dpo", 0) == 0.25
    done = tmp_path / "runs" / "step_dpo-seed0" / "eval.json"
    finished = json.loads(done.read_text())
    del finished["trainer"]["TREE"]                       # as a run made before TREE existed recorded it
    done.write_text(json.dumps(finished))
    assert run(cfg, RecordingRunner(acc=0.5), "step_dpo", 0) == 0.25
    runner = RecordingRunner(acc=0.75)                    # the new tunable away from its default: redone
    assert run(cfg | {"TRAIN_ARGS": ["--TREE=true"]}, runner, "step_dpo", 0) == 0.75 and len(runner.calls) == 2


def test_runs_keep_their_per_problem_results_and_comparisons_read_them(tmp_path):
    cfg = config(tmp_path)
    assert experiments.one_run(cfg, RecordingRunner(acc=0.75), "step_dpo", 0, experiments.eval_problems(cfg)) == (
        0.75, "1110")
    done = tmp_path / "runs" / "step_dpo-seed0" / "eval.json"
    finished = json.loads(done.read_text())
    del finished["greedy_correct"]                        # as a run made before runs kept them recorded it
    done.write_text(json.dumps(finished))
    runner = RecordingRunner(acc=0.5)
    assert run(cfg, runner, "step_dpo", 0) == 0.5 and len(runner.calls) == 2
    diffs = experiments.comparisons(cfg | {"COMPARE": [["a", "b"], ["a", "missing"]]},
                                    {"a": ["1111", "1110"], "b": ["0000", "0000"]})
    assert [(d["a"], d["b"]) for d in diffs] == [("a", "b")] and diffs[0]["difference"] == pytest.approx(0.875)
    assert 0.5 <= diffs[0]["low"] <= diffs[0]["high"] == 1.0
    assert "| a - b | +87.5% |" in experiments.differences_table(diffs)
