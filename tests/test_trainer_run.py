"""train_stepwise_dpo.py as a program: run folder, two-process accelerate launch (kill and resume: test_faults)."""
import json
import os
import shutil
import sys

import pytest
import torch

from conftest import ROOT, run_script, train_args, training_rows


def run(args, launcher=(sys.executable,)):
    run_script("train_stepwise_dpo.py", args, launcher)


def test_run_folder_and_learning(train_setup, tmp_path):
    out = tmp_path / "run"
    run(train_args(train_setup, out, "--BATCH_SIZE=8", "--EPOCHS=3", "--SAVE_STEPS=100"))
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
    start = AutoModelForCausalLM.from_pretrained(train_setup / "policy")
    assert (out / "model" / "model.safetensors").exists()
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters()))


@pytest.mark.skipif(shutil.which("accelerate") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "accelerate")), reason="accelerate launcher not installed")
def test_two_process_accelerate_matches_single_process(train_setup, tmp_path):
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    single = tmp_path / "single"
    run(train_args(train_setup, single, "--BATCH_SIZE=4", "--MAX_STEPS=5", "--SAVE_STEPS=100"))
    double = tmp_path / "double"
    run(train_args(train_setup, double, "--BATCH_SIZE=2", "--MAX_STEPS=5", "--SAVE_STEPS=100"),
        launcher=(launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no"))
    a, b = training_rows(single), training_rows(double)
    assert len(a) == len(b) == 5
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-4)
        assert rb["rewards/margins"] == pytest.approx(ra["rewards/margins"], abs=1e-4)


def test_gradient_checkpointing_gives_the_same_steps(train_setup, tmp_path):
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    run(train_args(train_setup, plain, "--BATCH_SIZE=8", "--MAX_STEPS=3", "--SAVE_STEPS=100"))
    run(train_args(train_setup, checkpointed, "--BATCH_SIZE=8", "--MAX_STEPS=3", "--SAVE_STEPS=100",
                   "--GRADIENT_CHECKPOINTING=true"))
    a, b = training_rows(plain), training_rows(checkpointed)
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-5), (ra["step"], key)
    assert a[-1]["rewards/margins"] != 0.0


def test_lora_run_saves_an_adapter_that_load_model_rebuilds(train_setup, tmp_path):
    from common import load_model

    out = tmp_path / "lora"
    run(train_args(train_setup, out, "--BATCH_SIZE=8", "--MAX_STEPS=3", "--SAVE_STEPS=100", "--LORA=true",
                   "--LORA_R=4", "--REFERENCE=live", "--GRADIENT_CHECKPOINTING=true"))
    files = set(os.listdir(out / "model"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    config = json.loads((out / "model" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(train_setup / "policy")
    rows = training_rows(out)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["rewards/margins"] != 0.0
    merged, _ = load_model(out / "model")
    base, _ = load_model(train_setup / "policy")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert not torch.allclose(merged(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)


def test_accelerate_configs_for_gpus_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    ddp = load_config_from_file(os.path.join(ROOT, "configs", "accelerate_ddp.yaml"))
    zero3 = load_config_from_file(os.path.join(ROOT, "configs", "accelerate_zero3.yaml"))
    assert ddp.distributed_type == "MULTI_GPU" and zero3.distributed_type == "DEEPSPEED"
    assert ddp.mixed_precision == zero3.mixed_precision == "bf16" and not ddp.use_cpu
    assert zero3.deepspeed_config["zero_stage"] == 3 and zero3.deepspeed_config["zero3_save_16bit_model"]
    # batch size, accumulation and clipping come from the script's own arguments ("auto" in DeepSpeed)
    assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(zero3.deepspeed_config)
