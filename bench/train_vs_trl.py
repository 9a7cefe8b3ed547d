"""Training speed and memory: StepwiseDPOTrainer vs TRL's DPOTrainer on the same Step-DPO pairs.

    pip install -r bench/requirements.txt
    python bench/train_vs_trl.py             # -> results/bench/train_vs_trl.json

For each model (the bundled policy and a randomly initialised ~30M-parameter Llama-style model with the
same tokenizer; speed does not depend on the weights) each system runs in each of its configurations, each
run in its own fresh process:
- ours_fp32: `StepwiseDPOTrainer` in its defaults (precomputed reference, prefix-shared forward), DPO loss;
- ours_bf16: the same with bf16 autocast (`--BF16=true`);
- ours_*_tree: the same with the token-tree layout (`--TREE=true`, batching.collate_tree): a batch's pairs of
  one question share its tokens. In the file's order (ORDER=file) a question's pairs are adjacent, so a
  batch holds few questions; `--ORDER=shuffled` measures the order training reads them in, where the tree
  shares less (docs/benchmarks.md);
- trl_default: `trl.DPOTrainer` with its own defaults (bf16 autocast, gradient checkpointing, a reference
  forward every step);
- trl_fp32: fp32, no gradient checkpointing, a reference forward every step;
- trl_fp32_precomputed: fp32, no gradient checkpointing, `precompute_ref_log_probs=True`;
- trl_bf16_precomputed: bf16 autocast, no gradient checkpointing, `precompute_ref_log_probs=True`;
- *_eager: the same with transformers' eager attention (the model loaded with `attn_implementation="eager"`,
  ours through `--ATTENTION=eager`) instead of the default SDPA kernel, for the bf16 runs of both systems:
  which kernel is faster on a CPU depends on the precision and the machine.
Same pairs, same order (sequential), batch size, learning rate, schedule, optimizer and epochs. The runs
repeat REPEATS times, interleaved, and each configuration's fastest run counts (all runs are kept in the
file): on a shared machine the speed of one run varies by 10-15%. Each system's fastest configuration is
named from these measurements, and ours is compared with TRL's fastest. TRL
appends EOS to plain-text completions; ours gets the same text with EOS appended, through its own
tokenization, and both runs assert that they score exactly the same token ids.

Timed: from the pairs to the trained model (tokenization, reference log-probs, every update). Memory:
peak resident memory of the process during that span minus before it (CPU); the peak allocated CUDA
memory on a GPU. The first logged loss is ln 2 for any DPO run that starts at the reference, so the
losses after the first updates and the first step's log-probs are compared too.
"""
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import atomic_write_json, command_line, config_from_argv, print_json  # noqa: E402
from models import load_model  # noqa: E402
from prompts import policy_prompt  # noqa: E402

# ----------------------------------------------------------------------------- tunables
POLICY = "models/policy"
PAIRS = "results/reference/round1/judged/step_pairs.jsonl"   # Math-Step-DPO rows
OUT_FILE = "results/bench/train_vs_trl.json"
MODELS = ["bundled", "llama-30M"]
SYSTEMS = ["ours_fp32", "ours_bf16", "ours_bf16_eager", "ours_fp32_tree", "ours_bf16_tree", "trl_default", "trl_fp32",
           "trl_fp32_precomputed", "trl_bf16_precomputed", "trl_bf16_precomputed_eager"]
N_PAIRS = {"bundled": 512, "llama-30M": 128}            # pairs cycled from PAIRS to this many
ORDER = "file"                                          # file: a question's pairs adjacent, as reward_model.py
                                                        # writes them | shuffled (seed 0), as training reads them
BATCH = {"bundled": 32, "llama-30M": 16}
EPOCHS = 1
LR = 5e-5
BETA = 0.1
COMPARE_STEPS = 4                                       # logged losses compared over the first steps
REPEATS = 2                                             # runs per system, interleaved; the fastest is reported
THREADS = 2
RUN = ""                                                # internal: "model:system" runs one of them here
CONFIG_KEYS = [k for k in list(globals()) if k.isupper()]


def random_llama(tokenizer, folder):
    """A ~30M-parameter Llama-style model with random weights, saved once (safetensors) so every run loads
    the same one."""
    if not os.path.exists(os.path.join(folder, "config.json")):
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=512, num_hidden_layers=9, num_attention_heads=8,
            num_key_value_heads=8, intermediate_size=1408, max_position_embeddings=2048, tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def pair_rows(cfg, name):
    """N_PAIRS[name] Step-DPO rows, cycled from PAIRS (in ORDER)."""
    import random

    with open(cfg["PAIRS"]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if cfg["ORDER"] == "shuffled":
        random.Random(0).shuffle(rows)
    elif cfg["ORDER"] != "file":
        raise SystemExit(f"--ORDER must be file or shuffled, got {cfg['ORDER']!r}")
    return [rows[i % len(rows)] for i in range(cfg["N_PAIRS"][name])]


def pair_texts(cfg, name, tokenizer):
    """TRL's prompt/chosen/rejected text for the same rows."""
    return [{"prompt": policy_prompt(tokenizer, r["prompt"]) + r["initial_reason_steps"], "chosen": r["chosen"],
             "rejected": r["rejected"]} for r in pair_rows(cfg, name)]


def training_args(cfg, name, out, cls, **extra):
    common = dict(output_dir=out, per_device_train_batch_size=cfg["BATCH"][name], learning_rate=cfg["LR"],
                  num_train_epochs=cfg["EPOCHS"], lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                  max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], seed=0,
                  train_sampling_strategy="sequential", remove_unused_columns=False, disable_tqdm=True,
                  use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
    return cls(**(common | extra))


def logged(trainer, key):
    return [r[key] for r in trainer.state.log_history if key in r]


def rss_mb(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak_rss():
    """Linux: writing 5 to clear_refs resets the peak resident set size to the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def tokenize_with_trl(cfg, name, folder, out):
    """TRL's own token ids for the pairs (prompt, chosen + EOS, rejected + EOS), saved for every run."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = load_model(folder)
    trainer = DPOTrainer(model=model, train_dataset=datasets.Dataset.from_list(
        pair_texts(cfg, name, tokenizer)), processing_class=tokenizer, args=training_args(
        cfg, name, out, DPOConfig, bf16=False, gradient_checkpointing=False))
    return [{k: list(r[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in trainer.train_dataset]


def trl_trainer(cfg, name, model, tokenizer, system, out):
    import datasets
    from trl import DPOConfig, DPOTrainer

    extra = {"beta": cfg["BETA"], "loss_type": ["sigmoid"]}
    if system != "trl_default":
        extra |= {"bf16": "bf16" in system, "gradient_checkpointing": False,
                  "precompute_ref_log_probs": "precomputed" in system}
    return DPOTrainer(model=model, args=training_args(cfg, name, out, DPOConfig, **extra),
                      train_dataset=datasets.Dataset.from_list(pair_texts(cfg, name, tokenizer)),
                      processing_class=tokenizer)


def our_trainer(cfg, name, model, tokenizer, ids, out, bf16, tree):
    """Ours from the Step-DPO rows through the training script's own tokenization (build_features), with
    EOS appended to the completion text as TRL does; checked to give exactly TRL's token ids."""
    from transformers import TrainingArguments

    from batching import collate, precompute_reference
    from train_stepwise_dpo import DPOSettings, PairDataset, StepwiseDPOTrainer, build_features

    rows = [r | {"chosen": r["chosen"] + tokenizer.eos_token, "rejected": r["rejected"] + tokenizer.eos_token}
            for r in pair_rows(cfg, name)]
    features = [build_features(tokenizer, r, "step") for r in rows]
    assert [{k: f[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for f in features] == ids, \
        "our tokenization differs from TRL's"
    precompute_reference(model, features, cfg["BATCH"][name], tokenizer.pad_token_id, True, bf16=bf16, tree=tree)
    return StepwiseDPOTrainer(
        model=model, args=training_args(cfg, name, out, TrainingArguments, bf16=bf16), train_dataset=PairDataset(features),
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id, True, tree=tree),
        dpo=DPOSettings(beta=cfg["BETA"], loss="sigmoid", nll_weight=0.0, dpop_lambda=0.0, prefix_sharing=True))


def run_one(cfg, name, system, ids_file):
    """One timed run in this process; prints a RESULT line of JSON."""
    import tempfile

    torch.set_num_threads(cfg["THREADS"])
    torch.manual_seed(0)
    folder = model_folder(cfg, name)
    with tempfile.TemporaryDirectory() as out:
        if system == "tokenize":
            ids = tokenize_with_trl(cfg, name, folder, out)
            atomic_write_json(ids_file, ids)
            return
        with open(ids_file) as f:
            ids = json.load(f)
        model, tokenizer = load_model(folder, attention="eager" if system.endswith("_eager") else "")
        base = rss_mb("VmRSS")
        reset_peak_rss()
        t0 = time.perf_counter()
        if system.startswith("ours"):
            trainer = our_trainer(cfg, name, model, tokenizer, ids, out, "bf16" in system, "tree" in system)
        else:
            trainer = trl_trainer(cfg, name, model, tokenizer, system, out)
            same = [{k: list(r[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in trainer.train_dataset]
            assert same == ids, "TRL tokenized the pairs differently from the saved ids"
        trainer.train()
        seconds = time.perf_counter() - t0
    pairs = cfg["N_PAIRS"][name] * cfg["EPOCHS"]
    result = {"model": name, "system": system, "pairs": pairs, "seconds": seconds, "pairs_per_s": pairs / seconds,
              "peak_mb": rss_mb("VmHWM") - base, "loss": logged(trainer, "loss")[: cfg["COMPARE_STEPS"]],
              "logps_chosen_step0": logged(trainer, "logps/chosen")[0],
              "logps_rejected_step0": logged(trainer, "logps/rejected")[0]}
    if torch.cuda.is_available():
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print("RESULT " + json.dumps(result), flush=True)


def model_folder(cfg, name):
    return cfg["POLICY"] if name == "bundled" else os.path.join(ROOT, "cache", "bench", name)


def main(argv):
    cfg = config_from_argv({k: globals()[k] for k in CONFIG_KEYS}, argv)
    ids_file = os.path.join(ROOT, "cache", "bench", "{}-pair-ids.json")
    if cfg["RUN"]:
        name, system = cfg["RUN"].split(":")
        return run_one(cfg, name, system, ids_file.format(name))
    missing = sorted({"ours_fp32", "trl_fp32_precomputed"} - set(cfg["SYSTEMS"]))
    if missing:  # checked before any run: the summary row compares these two
        raise SystemExit(f"SYSTEMS must include {missing}: the fp32 comparison and the loss check use them")
    _, tokenizer = load_model(cfg["POLICY"])
    random_llama(tokenizer, model_folder(cfg, "llama-30M"))
    results, runs = {}, []
    for name in cfg["MODELS"]:
        for system in ["tokenize"] + cfg["SYSTEMS"] * cfg["REPEATS"]:
            child = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, f"--RUN={name}:{system}"],
                                   capture_output=True, text=True, cwd=os.getcwd())
            lines = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
            if child.returncode or (system != "tokenize" and not lines):
                raise SystemExit(f"{name}:{system} failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
            if system == "tokenize":
                continue
            runs.append(json.loads(lines[-1][len("RESULT "):]))
            print_json({k: v for k, v in runs[-1].items() if k != "loss"})
            if (name, system) not in results or runs[-1]["pairs_per_s"] > results[name, system]["pairs_per_s"]:
                results[name, system] = runs[-1]
    rows = []
    for name in cfg["MODELS"]:
        best = {side: max((results[name, s] for s in cfg["SYSTEMS"] if s.startswith(side)),
                          key=lambda r: r["pairs_per_s"]) for side in ("ours", "trl")}
        ours, trl = best["ours"], best["trl"]
        ours_fp32, trl_fp32 = results[name, "ours_fp32"], results[name, "trl_fp32_precomputed"]
        rows.append({"model": name, "ours_fastest": ours["system"], "trl_fastest": trl["system"],
                     **{f"{s}_pairs_per_s": round(results[name, s]["pairs_per_s"], 1) for s in cfg["SYSTEMS"]},
                     "speedup_fastest_vs_fastest": round(ours["pairs_per_s"] / trl["pairs_per_s"], 2),
                     "speedup_fp32_vs_fp32": round(ours_fp32["pairs_per_s"] / trl_fp32["pairs_per_s"], 2),
                     "ours_fastest_peak_mb": round(ours["peak_mb"], 1), "trl_fastest_peak_mb": round(trl["peak_mb"], 1),
                     "loss_step0_abs_diff_fp32": abs(ours_fp32["loss"][0] - trl_fp32["loss"][0]),
                     "loss_first_steps_max_abs_diff_fp32": max(abs(a - b) for a, b in zip(ours_fp32["loss"],
                                                                                           trl_fp32["loss"])),
                     "logps_step0_max_abs_diff_fp32": max(abs(ours_fp32[k] - trl_fp32[k]) for k in
                                                          ("logps_chosen_step0", "logps_rejected_step0"))})
        if (name, "ours_fp32_tree") in results:  # the tree layout computes the same losses
            tree = results[name, "ours_fp32_tree"]
            rows[-1]["loss_first_steps_max_abs_diff_fp32_tree"] = max(abs(a - b) for a, b in zip(tree["loss"],
                                                                                                trl_fp32["loss"]))
        print_json(rows[-1])
    atomic_write_json(cfg["OUT_FILE"], {
        "rows": rows, "runs": runs, "repeats": cfg["REPEATS"], "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": cfg["THREADS"], "epochs": cfg["EPOCHS"], "batch": cfg["BATCH"], "beta": cfg["BETA"],
        "torch": torch.__version__, "command": command_line(__file__, argv)})


if __name__ == "__main__":
    main(sys.argv[1:])
