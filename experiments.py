"""Does stepwise DPO with judge-built pairs improve the policy? Methods against controls, on several seeds.

    python experiments.py                    # -> results/experiments/summary.json, summary.md, methods.png

From the same starting policy and the same sampled solutions (reward_model.py on the pairs pool, K samples
per problem), every method trains with the same trainer settings and is scored by greedy accuracy on
the test set:

- sft:             the starting policy (no training; the same number on every seed);
- sft_continued:   more supervised training on the chosen steps of the judge's step pairs (LOSS=sft:
                   only the NLL term) -- is the preference term needed at all?
- outcome_dpo:     plain DPO on whole solutions (right vs wrong final answer), MODE=outcome;
- step_dpo:        Step-DPO on the judge's step pairs, MODE=step;
- weighted_dpo:    whole-solution pairs with each step weighted by the judge's score, MODE=weighted;
- step_dpo_oracle: Step-DPO on pairs built with the task's reference step labels instead of the judge
                   (JUDGE=oracle:...): what a perfect judge would give.

summary.json also says how many step pairs the task's reference step labels agree with (pair_quality:
prefix right, chosen step right, rejected step wrong), a diagnostic of the judge that training never reads.

Every training run makes the same number of updates (TRAIN_STEPS). A seed sets the order of the pairs
and the training randomness; the data is the same for all seeds.
Finished runs are kept (RUN_DIR/runs/<method>-seed<k>/eval.json), so an interrupted experiment continues.
"""
import json
import os
import statistics
import subprocess
import sys
import time

from common import atomic_write_json, atomic_write_text, command_line, config_from_argv, load_model, print_json
from data_utils import arithmetic_slip, label_steps, load_problems, read_jsonl, split_steps

# ----------------------------------------------------------------------------- tunables
POLICY = "models/policy"
JUDGE = "models/judge"
TRAIN_FILE = "data/train.jsonl"
TEST_FILE = "data/test.jsonl"
RUN_DIR = "results/experiments"
SEEDS = [0, 1, 2]
METHODS = ["sft", "sft_continued", "outcome_dpo", "step_dpo", "weighted_dpo", "step_dpo_oracle"]
FIRST_PROBLEM = 4000          # the pairs pool: problems the policy was never supervised on
N_PROBLEMS = 2000
K = 8                         # samples per problem
SAMPLE_TEMPERATURE = 0.7
THRESHOLD = 0.9               # judge score under which a step is wrong (locates the error of a wrong sample)
TRAIN_STEPS = 150             # optimizer updates per training run (batch 32), the same for every method
TRAIN_ARGS = []               # extra --KEY=value for every training run (e.g. ["--LR=1e-4"])
METHOD_ARGS = {}              # extra --KEY=value per method, e.g. {"step_dpo": ["--BETA=0.1"]}
EVAL_BATCH = 128
THREADS = 2
CONFIG_KEYS = [k for k in list(globals()) if k.isupper()]

TRAINING = {  # method -> (pairs folder, trainer overrides)
    "sft_continued": ("judged", ["--MODE=step", "--LOSS=sft"]),
    "outcome_dpo": ("judged", ["--MODE=outcome"]),
    "step_dpo": ("judged", ["--MODE=step"]),
    "weighted_dpo": ("judged", ["--MODE=weighted"]),
    "step_dpo_oracle": ("oracle", ["--MODE=step"]),
}


def run(args):
    print(f"==> python {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable] + args)
    if proc.returncode:
        raise SystemExit(f"failed with exit status {proc.returncode}: python {' '.join(args)}")


def make_pairs(cfg, name, judge):
    """reward_model.py on the pairs pool with `judge`; samples are cached, so both pair sets share them."""
    out = os.path.join(cfg["RUN_DIR"], name)
    run(["reward_model.py", f"--POLICY={cfg['POLICY']}", f"--JUDGE={judge}", f"--TRAIN_FILE={cfg['TRAIN_FILE']}",
         f"--FIRST_PROBLEM={cfg['FIRST_PROBLEM']}", f"--N_PROBLEMS={cfg['N_PROBLEMS']}", f"--K={cfg['K']}",
         f"--TEMPERATURE={cfg['SAMPLE_TEMPERATURE']}", f"--THRESHOLD={cfg['THRESHOLD']}", f"--OUT_DIR={out}"])
    with open(os.path.join(out, "counts.json")) as f:
        return json.load(f)


def pair_quality(pairs_file, problems_file):
    """How many Step-DPO pairs the task's reference step labels agree with: the prefix right, the chosen
    step right and the rejected step wrong ("clean"), and each part alone; how many whole chosen
    continuations (full_chosen, which reach the right final answer by default) have every step right; how
    many wrong chosen steps are arithmetic slips; and how well the judge's score of the chosen step
    (step_pairs_meta.jsonl) separates right from wrong chosen steps (AUROC; 0.5 is chance). A diagnostic
    of the pairs only: nothing in training reads it."""
    from evaluate import auroc

    gold = {p["question"]: p["answer"] for p in load_problems(problems_file)}
    meta_file = pairs_file.replace("step_pairs.jsonl", "step_pairs_meta.jsonl")
    metas = read_jsonl(meta_file) if os.path.exists(meta_file) else None
    counts = dict.fromkeys(("pairs", "clean", "prefix_right", "chosen_right", "rejected_wrong",
                            "chosen_continuation_right", "chosen_wrong_arithmetic_slip"), 0)
    chosen_scores, chosen_ok = [], []
    for k, row in enumerate(read_jsonl(pairs_file)):
        prefix = split_steps(row["initial_reason_steps"])[0]
        chosen = label_steps(gold[row["prompt"]], prefix + [row["chosen"].strip()])
        rejected = label_steps(gold[row["prompt"]], prefix + [row["rejected"].strip()])
        parts = {"prefix_right": all(chosen[:-1]), "chosen_right": chosen[-1], "rejected_wrong": not rejected[-1]}
        counts["pairs"] += 1
        counts["clean"] += all(parts.values())
        for key, v in parts.items():
            counts[key] += v
        continuation = prefix + split_steps(row["full_chosen"])[0]
        counts["chosen_continuation_right"] += all(label_steps(gold[row["prompt"]], continuation))
        counts["chosen_wrong_arithmetic_slip"] += not chosen[-1] and arithmetic_slip(row["chosen"].strip())
        if metas and metas[k]["chosen_score"] is not None:
            chosen_scores.append(metas[k]["chosen_score"])
            chosen_ok.append(chosen[-1])
    counts["chosen_score_auroc"] = auroc(chosen_scores, chosen_ok) if chosen_scores else None
    return counts


def greedy_accuracy(cfg, model_path, problems):
    import torch

    from evaluate import greedy_solutions

    torch.set_num_threads(cfg["THREADS"])
    model, tokenizer = load_model(model_path)
    return greedy_solutions(model, tokenizer, problems, batch_size=cfg["EVAL_BATCH"], desc=model_path)[1]


def one_run(cfg, method, seed, problems):
    """Test greedy accuracy of one (method, seed), trained and evaluated unless already done."""
    folder = os.path.join(cfg["RUN_DIR"], "runs", f"{method}-seed{seed}")
    done = os.path.join(folder, "eval.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)["greedy_acc"]
    model = cfg["POLICY"]
    if method != "sft":
        pairs_dir, overrides = TRAINING[method]
        data = os.path.join(cfg["RUN_DIR"], pairs_dir,
                            "step_pairs.jsonl" if "--MODE=step" in overrides else "full_pairs.jsonl")
        run(["train_stepwise_dpo.py", f"--MODEL={cfg['POLICY']}", f"--DATA={data}", f"--OUT_DIR={folder}",
             f"--SEED={seed}", f"--MAX_STEPS={cfg['TRAIN_STEPS']}", "--SAVE_STEPS=1000000",
             f"--THREADS={cfg['THREADS']}", *overrides,
             *cfg["TRAIN_ARGS"], *cfg["METHOD_ARGS"].get(method, [])])
        model = os.path.join(folder, "model")
    acc = greedy_accuracy(cfg, model, problems)
    atomic_write_json(done, {"method": method, "seed": seed, "greedy_acc": acc, "model": model,
                             "test_file": cfg["TEST_FILE"], "n_problems": len(problems)})
    print_json({"method": method, "seed": seed, "greedy_acc": acc})
    return acc


def table(methods, seeds):
    base = statistics.mean(methods["sft"]) if "sft" in methods else None
    lines = ["| method | mean greedy acc | vs sft | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|---|" + "---|" * len(seeds)]
    for name, accs in methods.items():
        mean = statistics.mean(accs)
        gain = f"{mean - base:+.1%}" if base is not None else ""
        lines.append(f"| {name} | {mean:.1%} | {gain} | " + " | ".join(f"{a:.1%}" for a in accs) + " |")
    return "\n".join(lines)


def plot(methods, seeds, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(methods)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(names)), [statistics.mean(methods[n]) for n in names], color="#9ecae1", label="mean")
    for i, n in enumerate(names):
        ax.scatter([i] * len(seeds), methods[n], color="#08519c", s=14, zorder=3,
                   label="one seed" if i == 0 else None)
    if "sft" in methods:
        ax.axhline(statistics.mean(methods["sft"]), color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.set_ylabel("test greedy accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    cfg = config_from_argv({k: globals()[k] for k in CONFIG_KEYS}, argv)
    unknown = [m for m in cfg["METHODS"] if m != "sft" and m not in TRAINING]
    if unknown:
        raise SystemExit(f"unknown METHODS {unknown}; known: sft, {', '.join(TRAINING)}")
    t0 = time.time()
    counts = {"judged": make_pairs(cfg, "judged", cfg["JUDGE"])}
    if "step_dpo_oracle" in cfg["METHODS"]:
        counts["oracle"] = make_pairs(cfg, "oracle", f"oracle:{cfg['TRAIN_FILE']}")
    problems = load_problems(cfg["TEST_FILE"])
    methods = {m: [one_run(cfg, m, s, problems) for s in cfg["SEEDS"]] for m in cfg["METHODS"]}
    summary = {"seeds": cfg["SEEDS"], "methods": methods,
               "mean": {m: statistics.mean(a) for m, a in methods.items()},
               "pairs": {name: {k: c[k] for k in ("step_pairs", "full_pairs", "samples", "correct_samples")}
                         | {"step_pair_quality": pair_quality(os.path.join(cfg["RUN_DIR"], name, "step_pairs.jsonl"),
                                                              cfg["TRAIN_FILE"])}
                         for name, c in counts.items()},
               "settings": {k: cfg[k] for k in CONFIG_KEYS}, "wall_seconds": round(time.time() - t0, 1),
               "command": command_line(__file__, argv)}
    atomic_write_json(os.path.join(cfg["RUN_DIR"], "summary.json"), summary)
    text = table(methods, cfg["SEEDS"])
    atomic_write_text(os.path.join(cfg["RUN_DIR"], "summary.md"),
                      f"# Methods against controls\n\n{text}\n\nTest greedy accuracy on {len(problems)} problems "
                      f"({cfg['TEST_FILE']}). Wall time {summary['wall_seconds']:.0f} s.\n\n"
                      f"Command: `{summary['command']}`\n")
    plot(methods, cfg["SEEDS"], os.path.join(cfg["RUN_DIR"], "methods.png"))
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
