"""StepwiseDPOTrainer: the losses by hand, the reference, accumulation, LoRA; the script as a program (run
folder, two-process accelerate launch, gradient checkpointing; kill and resume: test_faults.py)."""
import copy
import json
import math
import os
import shutil
import sys

import pytest
import torch
from transformers import TrainingArguments

import batching as B
import train_stepwise_dpo as T
from conftest import FULL_ROWS, ROOT, STEP_ROWS, naive_logp, run_script, train_args, training_rows
from sources import DataError
from models import load_model
from prompts import encode, policy_prompt


def test_preference_loss_by_hand():
    t = lambda *x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    losses, rc, rr = T.preference_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.5)))       # margin 1, beta 0.5
    assert (rc.item(), rr.item()) == pytest.approx((0.25, -0.25))
    ipo, _, _ = T.preference_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.25, loss_type="ipo")
    assert ipo.item() == pytest.approx(1.0)                                    # (1 - 1/(2*0.25))^2
    cpo, _, _ = T.preference_loss(t(-1.0), t(-2.0), t(-0.5), t(-3.0), beta=0.5, loss_type="cpo")
    assert cpo.item() == pytest.approx(losses.item())                          # the reference plays no part
    dpop, _, _ = T.preference_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.5, dpop_lambda=2.0,
                                   policy_chosen_plain=t(-1.5), ref_chosen_plain=t(-1.0))
    assert dpop.item() == pytest.approx(math.log(2))                           # margin 1 - 2 * 0.5 = 0
    no_penalty, _, _ = T.preference_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.5, dpop_lambda=2.0,
                                         policy_chosen_plain=t(-0.5), ref_chosen_plain=t(-1.0))
    assert no_penalty.item() == pytest.approx(losses.item())


def test_step_weights_by_hand():
    assert T.step_weights([1.0, 0.5], "chosen", "weighted") == pytest.approx([4 / 3, 2 / 3])
    assert T.step_weights([0.2, 0.6], "rejected", "weighted") == pytest.approx([4 / 3, 2 / 3])
    assert T.step_weights([0.7, 0.7, 0.7], "chosen", "weighted") == pytest.approx([1.0, 1.0, 1.0])
    assert T.step_weights([1.0, 1.0], "rejected", "weighted") == [1.0, 1.0]      # nothing to weight by
    assert T.step_weights([0.1, 0.9], "chosen", "outcome") == [1.0, 1.0]


def test_step_features_have_no_eos_and_full_features_end_with_eos(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    step = T.build_features(tiny_tokenizer, STEP_ROWS[1], "step")
    assert eos not in step["chosen_ids"] + step["rejected_ids"]
    assert step["prompt_ids"] == encode(tiny_tokenizer, policy_prompt(tiny_tokenizer, STEP_ROWS[1]["prompt"])
                                        + STEP_ROWS[1]["initial_reason_steps"])
    full = T.build_features(tiny_tokenizer, FULL_ROWS[0], "weighted")
    assert full["chosen_ids"][-1] == eos and full["rejected_ids"][-1] == eos
    assert tiny_tokenizer.decode(full["chosen_ids"][:-1]) == "\n".join(FULL_ROWS[0]["chosen_steps"]) + "\n#### 35"
    assert sorted(set(full["chosen_weights"])) == pytest.approx(sorted({0.9 / 0.75, 0.6 / 0.75}))


def make_trainer(model, tokenizer, feats, dpo, ref_model=None, **args):
    base = dict(output_dir="/tmp/unused", per_device_train_batch_size=len(feats), learning_rate=1e-3,
                report_to=[], use_cpu=True, remove_unused_columns=False, save_strategy="no", seed=0)
    return T.StepwiseDPOTrainer(model=model, args=TrainingArguments(**(base | args)),
                                train_dataset=T.PairDataset(feats), ref_model=ref_model,
                                data_collator=lambda b: B.collate(b, tokenizer.pad_token_id, True),
                                dpo=T.DPOSettings(**({"beta": 0.1, "loss": "sigmoid", "nll_weight": 0.0,
                                                      "dpop_lambda": 0.0, "prefix_sharing": True} | dpo)))


def test_step_mode_is_plain_dpo_on_prefix_and_step(tiny_tokenizer, policy_and_ref):
    policy, ref = policy_and_ref
    feats = [T.build_features(tiny_tokenizer, r, "step") for r in STEP_ROWS]
    trainer = make_trainer(policy, tiny_tokenizer, feats, {"beta": 0.3}, ref_model=ref)
    with torch.no_grad():
        loss = trainer.compute_loss(policy, B.collate(feats, tiny_tokenizer.pad_token_id, True)).item()
        expected = []
        for r in STEP_ROWS:
            prompt = encode(tiny_tokenizer, policy_prompt(tiny_tokenizer, r["prompt"]) + r["initial_reason_steps"])
            c = tiny_tokenizer(r["chosen"], add_special_tokens=False)["input_ids"]
            j = tiny_tokenizer(r["rejected"], add_special_tokens=False)["input_ids"]
            margin = (naive_logp(policy, prompt, c) - naive_logp(ref, prompt, c)) - \
                     (naive_logp(policy, prompt, j) - naive_logp(ref, prompt, j))
            expected.append(-math.log(1 / (1 + math.exp(-0.3 * margin))))
    assert loss == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def test_weighted_with_equal_scores_is_outcome(tiny_tokenizer, policy_and_ref):
    policy, ref = policy_and_ref
    equal = [dict(r, chosen_step_scores=[0.7] * len(r["chosen_steps"]),
                  rejected_step_scores=[0.4] * len(r["rejected_steps"])) for r in FULL_ROWS]
    losses = {}
    for mode in ("weighted", "outcome"):
        feats = [T.build_features(tiny_tokenizer, r, mode) for r in equal]
        trainer = make_trainer(policy, tiny_tokenizer, feats, {}, ref_model=ref)
        with torch.no_grad():
            losses[mode] = trainer.compute_loss(policy, B.collate(feats, tiny_tokenizer.pad_token_id, True)).item()
    assert losses["weighted"] == pytest.approx(losses["outcome"], abs=1e-6)


def test_weighted_mode_by_hand(tiny_tokenizer, policy_and_ref):
    """margin = sum_t a_t h_t(chosen) - sum_t b_t h_t(rejected), with h from separate forwards per step."""
    policy, ref = policy_and_ref
    row = FULL_ROWS[0]
    feats = [T.build_features(tiny_tokenizer, row, "weighted")]
    trainer = make_trainer(policy, tiny_tokenizer, feats, {"beta": 0.5}, ref_model=ref)
    with torch.no_grad():
        loss = trainer.compute_loss(policy, B.collate(feats, tiny_tokenizer.pad_token_id, True)).item()
        prompt = encode(tiny_tokenizer, policy_prompt(tiny_tokenizer, row["prompt"]))

        def side(steps, final, weights):
            total, ids = 0.0, list(prompt)
            for k, step in enumerate(steps):
                toks = tiny_tokenizer(step + "\n", add_special_tokens=False)["input_ids"]
                if k == len(steps) - 1:  # the final-answer line and EOS belong to the last step
                    toks += tiny_tokenizer(f"#### {final}", add_special_tokens=False)["input_ids"]
                    toks += [tiny_tokenizer.eos_token_id]
                total += weights[k] * (naive_logp(policy, ids, toks) - naive_logp(ref, ids, toks))
                ids += toks
            return total

        a = [0.9 / 0.75, 0.6 / 0.75]
        b = [0.7 / 0.45, 0.2 / 0.45]
        margin = side(row["chosen_steps"], "35", a) - side(row["rejected_steps"], "36", b)
    assert loss == pytest.approx(math.log(1 + math.exp(-0.5 * margin)), abs=1e-5)


def test_nll_term_adds_mean_chosen_token_nll(tiny_tokenizer, policy_and_ref):
    policy, ref = policy_and_ref
    feats = [T.build_features(tiny_tokenizer, r, "step") for r in STEP_ROWS]
    batch = B.collate(feats, tiny_tokenizer.pad_token_id, True)
    with torch.no_grad():
        base = make_trainer(policy, tiny_tokenizer, feats, {}, ref_model=ref).compute_loss(policy, batch).item()
        with_nll = make_trainer(policy, tiny_tokenizer, feats, {"nll_weight": 2.0}, ref_model=ref).compute_loss(
            policy, batch).item()
        nll = [-naive_logp(policy, f["prompt_ids"], f["chosen_ids"]) / len(f["chosen_ids"]) for f in feats]
    assert with_nll - base == pytest.approx(2.0 * sum(nll) / len(nll), abs=1e-5)
    with torch.no_grad():  # the SFT control: the NLL term alone
        sft = make_trainer(policy, tiny_tokenizer, feats, {"loss": "sft", "nll_weight": 1.0},
                           ref_model=ref).compute_loss(policy, batch).item()
    assert sft == pytest.approx(sum(nll) / len(nll), abs=1e-5)


def test_precomputed_reference_equals_live_reference(tiny_tokenizer, policy_and_ref):
    policy, ref = policy_and_ref
    feats = [T.build_features(tiny_tokenizer, r, "step") for r in STEP_ROWS]
    live = make_trainer(policy, tiny_tokenizer, feats, {}, ref_model=ref)
    with torch.no_grad():
        live_loss = live.compute_loss(policy, B.collate(feats, tiny_tokenizer.pad_token_id, True)).item()
    pre = [dict(f) for f in feats]
    B.precompute_reference(ref, pre, 2, tiny_tokenizer.pad_token_id, True)
    trainer = make_trainer(policy, tiny_tokenizer, pre, {})
    with torch.no_grad():
        pre_loss = trainer.compute_loss(policy, B.collate(pre, tiny_tokenizer.pad_token_id, True)).item()
    assert pre_loss == pytest.approx(live_loss, abs=1e-6)


def test_bf16_runs_the_forward_in_bf16(tiny_tokenizer, policy_and_ref):
    """BF16=true must reach the forward, which sequence_logps runs without model.forward (accelerate's hook)."""
    policy, ref = policy_and_ref
    feats = [T.build_features(tiny_tokenizer, r, "step") for r in STEP_ROWS]
    seen = []
    hook = policy.get_decoder().layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    losses = {}
    for bf16 in (False, True):
        pre = [dict(f) for f in feats]
        B.precompute_reference(ref, pre, 2, tiny_tokenizer.pad_token_id, True, bf16=bf16)
        trainer = make_trainer(policy, tiny_tokenizer, pre, {}, bf16=bf16)
        with torch.no_grad():
            losses[bf16] = trainer.compute_loss(policy, B.collate(pre, tiny_tokenizer.pad_token_id, True)).item()
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert losses[True] == pytest.approx(losses[False], abs=0.05) and losses[True] != losses[False]


def test_accumulation_matches_one_big_batch(tiny_tokenizer, tiny_model):
    rows = [dict(STEP_ROWS[i % 2], chosen=STEP_ROWS[i % 2]["chosen"].replace("apples", "apples" + "!" * i))
            for i in range(8)]
    feats = [T.build_features(tiny_tokenizer, r, "step") for r in rows]
    B.precompute_reference(tiny_model, feats, 8, tiny_tokenizer.pad_token_id, True)
    results = []
    for batch, accum in ((8, 1), (2, 4)):
        model = copy.deepcopy(tiny_model)
        trainer = make_trainer(model, tiny_tokenizer, feats, {"nll_weight": 0.5}, max_steps=1, lr_scheduler_type="constant",
                               per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                               optim="sgd", max_grad_norm=0.0, disable_tqdm=True)
        trainer.train()
        results.append([p.detach().clone() for p in model.parameters()])
    moved = max((a - b).abs().max().item() for a, b in zip(results[0], tiny_model.parameters()))
    assert moved > 1e-4
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5)


def test_load_pairs_names_the_missing_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(STEP_ROWS[0]) + "\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: field 'initial_reason_steps' is missing"):
        T.load_pairs(str(path), "step")
    with pytest.raises(DataError, match=rf"{path}:1: field 'chosen_steps' is missing"):
        T.load_pairs(str(path), "weighted")


def test_lora_reference_is_the_base_with_adapters_disabled(tiny_tokenizer, tiny_model):
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(tiny_model)
    model = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                 target_modules=["q_proj", "v_proj"],
                                                                 task_type="CAUSAL_LM"))
    feats = [T.build_features(tiny_tokenizer, r, "step") for r in STEP_ROWS]
    batch = B.collate(feats, tiny_tokenizer.pad_token_id, True)
    trainer = make_trainer(model, tiny_tokenizer, feats, {}, max_steps=3, lr_scheduler_type="constant",
                           learning_rate=1e-2, disable_tqdm=True)
    base_before = {k: v.clone() for k, v in model.named_parameters() if "lora" not in k}
    trainer.train()
    with torch.no_grad():
        ref_chosen, ref_rejected, _ = trainer.reference_logps(model, batch)
        expected = B.sequence_logps(base, batch)
        trained = B.sequence_logps(model, batch)
    assert torch.allclose(ref_chosen, expected["chosen"], atol=1e-5)
    assert torch.allclose(ref_rejected, expected["rejected"], atol=1e-5)
    assert not torch.allclose(trained["chosen"], expected["chosen"], atol=1e-4)   # the adapters learned
    assert all(torch.equal(v, base_before[k]) for k, v in model.named_parameters() if "lora" not in k)


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


def same_steps(train_setup, tmp_path, flag, cache_suffix=None, **tolerance):
    """Three updates with `flag` train the same steps as the defaults (to `tolerance`, pytest.approx's; 1e-4
    relative by default: other kernels or summation orders); a flag that changes the reference log-probs
    caches them apart (`cache_suffix`)."""
    tolerance = tolerance or {"rel": 1e-4, "abs": 1e-4}
    default, other = tmp_path / "default", tmp_path / "other"
    run(train_args(train_setup, default, "--BATCH_SIZE=8", "--MAX_STEPS=3", "--SAVE_STEPS=100"))
    run(train_args(train_setup, other, "--BATCH_SIZE=8", "--MAX_STEPS=3", "--SAVE_STEPS=100", flag))
    a, b = training_rows(default), training_rows(other)
    assert len(a) == len(b) == 3 and a[-1]["rewards/margins"] != 0.0
    for ra, rb in zip(a, b):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], **tolerance), (ra["step"], key)
    if cache_suffix:
        assert any(p.name.endswith(cache_suffix) for p in (train_setup / "cache" / "reference").iterdir())


def test_gradient_checkpointing_gives_the_same_steps(train_setup, tmp_path):
    same_steps(train_setup, tmp_path, "--GRADIENT_CHECKPOINTING=true", abs=1e-5)


def test_eager_attention_gives_the_same_steps(train_setup, tmp_path):
    """--ATTENTION=eager trains the same steps as the default SDPA kernel; load_model hands the choice to
    transformers."""
    model, _ = load_model(train_setup / "policy", attention="eager")
    assert model.config._attn_implementation == "eager"
    assert load_model(train_setup / "policy")[0].config._attn_implementation == "sdpa"
    same_steps(train_setup, tmp_path, "--ATTENTION=eager", "-eager.json")
    with pytest.raises(SystemExit, match="--ATTENTION must be sdpa or eager"):  # a flash kernel drops the mask
        T.main(train_args(train_setup, tmp_path / "flash", "--ATTENTION=flash_attention_2"))


def test_tree_layout_gives_the_same_steps(train_setup, tmp_path):
    """--TREE=true (a question's pairs share one token tree) trains the same steps as the default layout."""
    same_steps(train_setup, tmp_path, "--TREE=true", "-tree.json")


def test_lora_run_saves_an_adapter_that_load_model_rebuilds(train_setup, tmp_path):
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


def test_plain_preference_rows_and_boxed_rows_become_features(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    row = {"prompt": STEP_ROWS[0]["prompt"], "chosen": "She has 12 + 3 = 15.\n#### 15", "rejected": "#### 16"}
    f = T.build_features(tiny_tokenizer, row, "outcome")
    assert f["chosen_ids"] == tiny_tokenizer(row["chosen"], add_special_tokens=False)["input_ids"] + [eos]
    assert f["rejected_ids"] == tiny_tokenizer("#### 16", add_special_tokens=False)["input_ids"] + [eos]
    assert f["chosen_weights"] == [1.0] * len(f["chosen_ids"])
    boxed = dict(FULL_ROWS[1], chosen="Now she has 5 * 2 = 10 eggs. So \\boxed{10}.", rejected="x")
    boxed["chosen_steps"] = ["Now she has 5 * 2 = 10 eggs. So \\boxed{10}."]
    full = T.build_features(tiny_tokenizer, boxed, "weighted")   # no '#### 10' line after a boxed answer
    assert tiny_tokenizer.decode(full["chosen_ids"][:-1]) == boxed["chosen_steps"][0] + "\n"
    chat = copy.deepcopy(tiny_tokenizer)
    chat.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    step = T.build_features(chat, STEP_ROWS[1], "step", style="boxed")
    assert chat.decode(step["prompt_ids"]).startswith(policy_prompt(chat, STEP_ROWS[1]["prompt"], "boxed"))
    assert "\\boxed{}" in chat.decode(step["prompt_ids"])


def test_step_dpo_from_a_math_step_dpo_parquet_with_eval_and_tensorboard(train_setup, tmp_path):
    """Math-Step-DPO-10K-shaped rows (the committed pairs, their answers in \\boxed{}, plus final-step pairs
    that end in \\boxed{}) in a parquet file; TrainingArguments passed through: held-out evaluation every
    step and TensorBoard events, written offline."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    committed = os.path.join(ROOT, "results", "reference", "round1", "judged", "step_pairs.jsonl")
    pairs = [json.loads(x) for x in open(committed)][:16]
    rows = []
    for r in pairs:
        boxed = {k: r[k].replace(f"#### {r['answer']}", f"The answer is \\boxed{{{r['answer']}}}.")
                 for k in ("full_chosen", "full_rejected")}
        rows.append({"dataset": "bundled", **r, **boxed})
        rows.append({"dataset": "bundled", **r, "initial_reason_steps": r["initial_reason_steps"] + r["chosen"],
                     "chosen": f"The answer is \\boxed{{{r['answer']}}}.\n",
                     "rejected": f"The answer is \\boxed{{{int(r['answer']) + 1}}}.\n"})
    pq.write_table(pa.Table.from_pylist(rows[:24]), str(tmp_path / "train.parquet"))
    pq.write_table(pa.Table.from_pylist(rows[24:]), str(tmp_path / "eval.parquet"))
    out = tmp_path / "run"
    trainer_args = {"report_to": ["tensorboard"], "eval_strategy": "steps", "eval_steps": 1, "save_strategy": "no",
                    "optim": "adamw_torch"}
    trainer = T.main(train_args(train_setup, out, f"--DATA={tmp_path / 'train.parquet'}", "--ANSWER_STYLE=boxed",
                                f"--EVAL_DATA={tmp_path / 'eval.parquet'}", "--BATCH_SIZE=8", "--MAX_STEPS=3",
                                f"--CACHE_DIR={tmp_path / 'cache'}", f"--TRAINER_ARGS={json.dumps(trainer_args)}"))
    assert trainer.args.optim == "adamw_torch" and trainer.args.report_to == ["tensorboard"]
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval_loss" in r] == [1, 2, 3]
    assert [r["step"] for r in logged if "rewards/margins" in r] == [1, 2, 3]
    assert all("rewards/margins" not in r for r in logged if "eval_loss" in r)
    events = list(out.rglob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 100
    config = json.loads((out / "config.json").read_text())
    assert config["TRAINER_ARGS"] == trainer_args and config["n_pairs"] == 24 and config["ANSWER_STYLE"] == "boxed"
    saved = json.loads((out / "model" / "training_args.json").read_text())
    assert saved["eval_strategy"] == "steps" and not (out / "model" / "training_args.bin").exists()


def test_outcome_trains_on_a_plain_trl_preference_file(train_setup, tmp_path):
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"].replace("x\n", "\n".join(r["chosen_steps"]) + "\n"),
             "rejected": r["rejected"].replace("x\n", "\n".join(r["rejected_steps"]) + "\n")} for r in FULL_ROWS]
    (tmp_path / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    T.main(train_args(train_setup, tmp_path / "run", f"--DATA={tmp_path / 'trl.jsonl'}", "--MODE=outcome",
                      "--BATCH_SIZE=4", "--MAX_STEPS=2", f"--CACHE_DIR={tmp_path / 'cache'}"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["n_pairs"] == 8 and math.isfinite(summary["train_loss"])


def test_trainer_args_unknown_field_is_refused(train_setup, tmp_path):
    with pytest.raises(SystemExit, match="^--TRAINER_ARGS: TrainingArguments has no field 'reprot_to'$"):
        T.main(train_args(train_setup, tmp_path / "run", '--TRAINER_ARGS={"reprot_to": ["tensorboard"]}'))
    assert not (tmp_path / "run").exists()


def test_resume_skips_a_checkpoint_whose_trainer_state_was_cut_by_a_kill(train_setup, tmp_path):
    """The trainer state is the last file a save writes, and it is written in place: a kill inside that write
    leaves an empty or cut file. Such a checkpoint is passed over, and the resumed run still equals the
    uninterrupted one."""
    out = tmp_path / "run"
    settings = ("--BATCH_SIZE=8", "--MAX_STEPS=8", "--SAVE_STEPS=4")
    run(train_args(train_setup, out, *settings))
    full = training_rows(out)
    state = out / "checkpoint-8" / "trainer_state.json"
    whole = state.read_text()
    assert T.last_complete_checkpoint(str(out)) == str(out / "checkpoint-8")
    for cut in ("", whole[: len(whole) // 2]):
        state.write_text(cut)
        assert T.last_complete_checkpoint(str(out)) == str(out / "checkpoint-4")
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + '{"step": 9, "lo')  # a cut last line
    run(train_args(train_setup, out, *settings, "--RESUME=true"))
    resumed = training_rows(out)
    assert [r["step"] for r in resumed] == [r["step"] for r in full] == list(range(1, 9))
    for a, b in zip(full, resumed):   # float rounding only, as in test_faults.py's kill tests
        assert {k: pytest.approx(v, rel=1e-5, abs=1e-5) for k, v in a.items()} == b
