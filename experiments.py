"""Does stepwise DPO with judge-built pairs improve the policy? Methods against controls, on several seeds.

    python experiments.py                    # -> results/experiments/summary.json, summary.md, methods.png

From the same starting policy and the same sampled solutions (reward_model.py on the pairs pool, K samples
per problem), every method trains with the same trainer settings and is scored by greedy accuracy on
the test set:

- sft:             the starting policy (no training; the same number on every seed);
- sft_continued:   more supervised training on the chosen steps of the judge's step pairs (LOSS=sft:
                   only the NLL term) -- is the preference term needed at all?
- outcome_dpo:     plain DPO on whole solutions, the first right against the first wrong sample (the final
                   answer alone, no judge), MODE=outcome;
- step_dpo:        Step-DPO on the judge's step pairs, MODE=step;
- weighted_dpo:    whole-solution pairs picked by the judge, each step weighted by its score, MODE=weighted;
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
import sys
import time

from common import Stages, atomic_write_json, atomic_write_text, command_line, config_from_argv, print_json
from data_utils import PAIRS_POOL, load_problems
from pairs import pair_quality

# ----------------------------------------------------------------------------- tunables
POLICY = "models/policy"
JUDGE = "models/judge"
TRAIN_FILE = "data/train.jsonl"
TEST_FILE = "data/test.jsonl"
RUN_DIR = "results/experiments"
SEEDS = [0, 1, 2]
METHODS = ["sft", "sft_continued", "outcome_dpo", "step_dpo", "weighted_dpo", "step_dpo_oracle"]
FIRST_PROBLEM = PAIRS_POOL[0]  # the pairs pool: problems the policy was never supervised on
N_PROBLEMS = PAIRS_POOL[1] - PAIRS_POOL[0]
K = 8                         # samples per problem
SAMPLE_TEMPERATURE = 0.7
THRESHOLD = 0.5               # judge score under which a step is wrong, as in reward_model.py and evaluate.py
TRAIN_STEPS = 150             # optimizer updates per training run (batch 32), the same for every method
PAIR_ARGS = []                # extra --KEY=value for reward_model.py, for the judge's and the oracle's pairs alike
TRAIN_ARGS = []               # extra --KEY=value for every training run (e.g. ["--LR=1e-4"])
METHOD_ARGS = {}              # extra --KEY=value per method, e.g. {"step_dpo": ["--BETA=0.1"]}
EVAL_BATCH = 128
THREADS = 2
CONFIG_KEYS = [k for k in list(globals()) if k.isupper()]

TRAINING = {  # method -> (pairs file, trainer overrides)
    "sft_continued": ("judged/step_pairs.jsonl", ["--MODE=step", "--LOSS=sft"]),
    "outcome_dpo": ("judged/outcome_pairs.jsonl", ["--MODE=outcome"]),
    "step_dpo": ("judged/step_pairs.jsonl", ["--MODE=step"]),
    "weighted_dpo": ("judged/full_pairs.jsonl", ["--MODE=weighted"]),
    "step_dpo_oracle": ("oracle/step_pairs.jsonl", ["--MODE=step"]),
}


def make_pairs(cfg, runner, name, judge):
    """reward_model.py on the pairs pool with `judge`; samples are cached, so both pair sets share them."""
    out = os.path.join(cfg["RUN_DIR"], name)
    runner.run(f"pairs_{name}", "reward_model.py", [
        f"--POLICY={cfg['POLICY']}", f"--JUDGE={judge}", f"--TRAIN_FILE={cfg['TRAIN_FILE']}",
        f"--FIRST_PROBLEM={cfg['FIRST_PROBLEM']}", f"--N_PROBLEMS={cfg['N_PROBLEMS']}", f"--K={cfg['K']}",
        f"--TEMPERATURE={cfg['SAMPLE_TEMPERATURE']}", f"--THRESHOLD={cfg['THRESHOLD']}", f"--OUT_DIR={out}",
        *cfg["PAIR_ARGS"]])
    with open(os.path.join(out, "counts.json")) as f:
        return json.load(f)


def one_run(cfg, runner, method, seed, n_problems):
    """Test greedy accuracy of one (method, seed), trained and evaluated unless already done."""
    folder = os.path.join(cfg["RUN_DIR"], "runs", f"{method}-seed{seed}")
    done = os.path.join(folder, "eval.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)["greedy_acc"]
    model = cfg["POLICY"]
    if method != "sft":
        pairs_file, overrides = TRAINING[method]
        data = os.path.join(cfg["RUN_DIR"], pairs_file)
        runner.run(f"{method}-seed{seed}", "train_stepwise_dpo.py", [
            f"--MODEL={cfg['POLICY']}", f"--DATA={data}", f"--OUT_DIR={folder}", f"--SEED={seed}",
            f"--MAX_STEPS={cfg['TRAIN_STEPS']}", "--SAVE_STEPS=1000000", f"--THREADS={cfg['THREADS']}", *overrides,
            *cfg["TRAIN_ARGS"], *cfg["METHOD_ARGS"].get(method, [])])
        model = os.path.join(folder, "model")
    runner.run(f"eval-{method}-seed{seed}", "evaluate.py", [
        f"--MODEL={model}", f"--TEST_FILE={cfg['TEST_FILE']}", "--K=0", "--JUDGE=", "--JUDGE_EVAL_FILE=",
        f"--BATCH_SIZE={cfg['EVAL_BATCH']}", f"--THREADS={cfg['THREADS']}", f"--OUT_DIR={folder}/eval"])
    with open(os.path.join(folder, "eval", "metrics.json")) as f:
        acc = json.load(f)["greedy_acc"]
    atomic_write_json(done, {"method": method, "seed": seed, "greedy_acc": acc, "model": model,
                             "test_file": cfg["TEST_FILE"], "n_problems": n_problems})
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
    runner = Stages()
    counts = {"judged": make_pairs(cfg, runner, "judged", cfg["JUDGE"])}
    if "step_dpo_oracle" in cfg["METHODS"]:
        counts["oracle"] = make_pairs(cfg, runner, "oracle", f"oracle:{cfg['TRAIN_FILE']}")
    n_problems = len(load_problems(cfg["TEST_FILE"]))
    methods = {m: [one_run(cfg, runner, m, s, n_problems) for s in cfg["SEEDS"]] for m in cfg["METHODS"]}
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
                      f"# Methods against controls\n\n{text}\n\nTest greedy accuracy on {n_problems} problems "
                      f"({cfg['TEST_FILE']}). Wall time {summary['wall_seconds']:.0f} s.\n\n"
                      f"Command: `{summary['command']}`\n")
    plot(methods, cfg["SEEDS"], os.path.join(cfg["RUN_DIR"], "methods.png"))
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
