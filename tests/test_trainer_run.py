"""train_stepwise_dpo.py as a program: run folder, kill and resume, two-process accelerate launch."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from data_utils import corrupt_solution, generate_task, split_steps


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, tiny_model):
    """A tiny policy folder and 48 step pairs (gold step vs an automatically corrupted one)."""
    folder = tmp_path_factory.mktemp("train")
    tiny_model.save_pretrained(folder / "policy")
    tiny_tokenizer.save_pretrained(folder / "policy")
    rng = random.Random(0)
    rows = []
    for p in generate_task(48, 1, seed=5)[0]:
        steps, final = split_steps(p["answer"], strip_calc=True)
        bad, _, j = corrupt_solution(steps, final, rng, p["question"])
        rows.append({"prompt": p["question"], "initial_reason_steps": "".join(s + "\n" for s in steps[:j]),
                     "chosen": steps[j] + "\n", "rejected": bad[j] + "\n", "full_chosen": "", "full_rejected": "",
                     "answer": final})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def args_for(folder, out, *extra):
    return [f"--MODEL={folder / 'policy'}", f"--DATA={folder / 'pairs.jsonl'}", f"--OUT_DIR={out}",
            "--LOGGING_STEPS=1", "--LR=1e-3", "--BETA=0.5", "--NLL_WEIGHT=0.2", *extra]


def run(args, launcher=(sys.executable,), wait=True):
    cmd = [*launcher, "train_stepwise_dpo.py", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def training_rows(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "rewards/margins" in r]


def test_run_folder_and_learning(setup, tmp_path):
    out = tmp_path / "run"
    run(args_for(setup, out, "--BATCH_SIZE=8", "--EPOCHS=3", "--SAVE_STEPS=100"))
    rows = training_rows(out)
    assert len(rows) == 18 and [r["step"] for r in rows] == list(range(1, 19))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "nll/chosen", "step/chosen_tokens"):
        assert key in rows[0]
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)   # policy == reference at step 1
    assert rows[-1]["rewards/margins"] > 0.1 and rows[-1]["rewards/accuracies"] > 0.6
    config = json.loads((out / "config.json").read_text())
    assert config["MODE"] == "step" and config["n_pairs"] == 48 and "train_stepwise_dpo.py" in config["command"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 18 and (out / "training.png").stat().st_size > 1000
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    start = AutoModelForCausalLM.from_pretrained(setup / "policy")
    assert (out / "model" / "model.safetensors").exists()
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters()))


def test_killed_mid_epoch_then_resumed_matches_uninterrupted(setup, tmp_path):
    common = ("--BATCH_SIZE=2", "--EPOCHS=3", "--SAVE_STEPS=10")
    full = tmp_path / "full"
    run(args_for(setup, full, *common))
    part = tmp_path / "part"
    proc = run(args_for(setup, part, *common), wait=False)
    marker = part / "checkpoint-20" / "trainer_state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.01)
    assert proc.poll() is None, "training ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(training_rows(part))
    assert 20 <= killed_at < 72
    run(args_for(setup, part, *common, "--RESUME=true"))
    a, b = training_rows(full), training_rows(part)
    assert [r["step"] for r in b] == list(range(1, 73))
    for ra, rb in zip(a, b):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-6), (ra["step"], key)
    from safetensors.torch import load_file
    wa, wb = load_file(full / "model" / "model.safetensors"), load_file(part / "model" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.skipif(shutil.which("accelerate") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "accelerate")), reason="accelerate launcher not installed")
def test_two_process_accelerate_matches_single_process(setup, tmp_path):
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    single = tmp_path / "single"
    run(args_for(setup, single, "--BATCH_SIZE=4", "--MAX_STEPS=5", "--SAVE_STEPS=100"))
    double = tmp_path / "double"
    run(args_for(setup, double, "--BATCH_SIZE=2", "--MAX_STEPS=5", "--SAVE_STEPS=100"),
        launcher=(launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no"))
    a, b = training_rows(single), training_rows(double)
    assert len(a) == len(b) == 5
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-4)
        assert rb["rewards/margins"] == pytest.approx(ra["rewards/margins"], abs=1e-4)
