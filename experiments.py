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

How far apart two methods are (COMPARE): the difference of their mean accuracies with a 95% bootstrap
interval that resamples the test problems (paired: both methods on the same draw) and each method's seeds
(metrics.bootstrap_difference), in summary.json and summary.md. An interval that holds 0 is a tie.

summary.json also says how many step pairs the task's reference step labels agree with (pair_quality:
prefix right, chosen step right, rejected step wrong), a diagnostic of the judge that training never reads.

Every training run makes the same number of updates (TRAIN_STEPS). A seed sets the order of the pairs
and the training randomness; the data is the same for all seeds.
Finished runs are kept (RUN_DIR/runs/<method>-seed<k>/eval.json, with the run's right/wrong per problem), so an
interrupted experiment continues.

A recipe is chosen on validation problems, never on the test set: `--EVAL_ON=validation` scores every run on
data_utils.VALIDATION, and VARIANTS names other trainer settings of a method, e.g.

    python experiments.py --RUN_DIR=results/sweep --EVAL_ON=validation --SEEDS='[0, 1]' \\
        --METHODS='["step_dpo", "step_beta0.1"]' --VARIANTS='{"step_beta0.1": ["step_dpo", ["--BETA=0.1"]]}'
"""
import json
import os
import statistics
import sys
import time

from common import (Stages, atomic_write_json, atomic_write_text, command_line, config_from_argv, file_sha256,
                    print_json)
from data_utils import PAIRS_POOL, VALIDATION, answers_match, load_problems
from metrics import bootstrap_difference
from models import fingerprint
from pairs import pair_quality
from sources import read_jsonl

# ----------------------------------------------------------------------------- tunables
POLICY = "models/policy"
JUDGE = "models/judge"
TRAIN_FILE = "data/train.jsonl"
TEST_FILE = "data/test.jsonl"
EVAL_ON = "test"              # test: every problem of TEST_FILE | validation: the problems data_utils.VALIDATION
                              # of TRAIN_FILE, which the policy never learned from: choose a recipe there, not on
                              # the test set
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
VARIANTS = {}                 # name -> [method, [--KEY=value, ...]]: a method with other trainer settings, run when
                              # METHODS names it, e.g. {"step_dpo_lr1e-4": ["step_dpo", ["--LR=1e-4"]]}
COMPARE = [["step_dpo", "sft"], ["step_dpo", "sft_continued"], ["step_dpo", "outcome_dpo"],
           ["step_dpo", "weighted_dpo"], ["step_dpo_oracle", "step_dpo"]]  # [a, b]: a - b with its interval
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


def eval_problems(cfg):
    """(file, first problem, number of problems) the runs are scored on (EVAL_ON)."""
    if cfg["EVAL_ON"] == "validation":
        have = len(load_problems(cfg["TRAIN_FILE"]))
        if have < VALIDATION[1]:
            raise SystemExit(f"--EVAL_ON=validation scores problems {VALIDATION[0]}-{VALIDATION[1] - 1} of "
                             f"{cfg['TRAIN_FILE']}, which has {have}; score on the test set or use a larger file")
        return cfg["TRAIN_FILE"], VALIDATION[0], VALIDATION[1] - VALIDATION[0]
    if cfg["EVAL_ON"] != "test":
        raise SystemExit(f"--EVAL_ON must be test or validation, got {cfg['EVAL_ON']!r}")
    return cfg["TEST_FILE"], 0, len(load_problems(cfg["TEST_FILE"]))


def base_method(cfg, method):
    """The method a METHODS name trains: itself, or the one its VARIANTS entry names."""
    return cfg["VARIANTS"].get(method, (method,))[0]


def training_args(cfg, method):
    """(pairs file, trainer arguments) of a method or a VARIANTS name; None for sft (no training)."""
    base, extra = base_method(cfg, method), cfg["VARIANTS"].get(method, (method, []))[1]
    if base == "sft":
        return None
    pairs_file, overrides = TRAINING[base]
    return pairs_file, [*overrides, *cfg["TRAIN_ARGS"], *cfg["METHOD_ARGS"].get(base, []), *extra]


def trainer_settings(args):
    """train_stepwise_dpo.py's resolved config for these arguments: its defaults with them applied."""
    import train_stepwise_dpo

    return config_from_argv({k: getattr(train_stepwise_dpo, k) for k in train_stepwise_dpo.CONFIG_KEYS}, args)


def same_setting(key, before, now):
    """Whether a finished run's setting is this one. A trainer tunable added since the run, at its default,
    does what the trainer did without it, so it does not make the run stale."""
    if key != "trainer" or not (before and now):
        return before == now
    defaults = trainer_settings([])
    return {k: v for k, v in now.items() if k in before} == before and all(
        v == defaults[k] for k, v in now.items() if k not in before)


def one_run(cfg, runner, method, seed, scored_on):
    """(greedy accuracy, "1"/"0" per problem) of one (method, seed) on `scored_on` (eval_problems), trained and
    evaluated unless a finished run with the same settings is already there: the starting policy's weights,
    the pairs file's content, the trainer's resolved settings (its defaults included) and the evaluation
    problems. A run with other settings (a rebuilt judge, a changed trainer default), or one finished before
    runs kept their per-problem results, is redone."""
    folder = os.path.join(cfg["RUN_DIR"], "runs", f"{method}-seed{seed}")
    done = os.path.join(folder, "eval.json")
    file, first, n = scored_on
    training = training_args(cfg, method)
    data = training and os.path.join(cfg["RUN_DIR"], training[0])
    args = training and [f"--MODEL={cfg['POLICY']}", f"--DATA={data}", f"--OUT_DIR={folder}", f"--SEED={seed}",
                         f"--MAX_STEPS={cfg['TRAIN_STEPS']}", "--SAVE_STEPS=1000000", f"--THREADS={cfg['THREADS']}",
                         *training[1]]
    settings = {"policy": fingerprint(cfg["POLICY"]), "train_args": training and training[1],
                "trainer": training and trainer_settings(args), "pairs_sha256": training and file_sha256(data),
                "train_steps": cfg["TRAIN_STEPS"], "test_file": file, "first_problem": first, "n_problems": n}
    if os.path.exists(done):
        with open(done) as f:
            previous = json.load(f)
        if "greedy_correct" in previous and all(same_setting(k, previous.get(k), v) for k, v in settings.items()):
            return previous["greedy_acc"], previous["greedy_correct"]
    model = cfg["POLICY"]
    if training:
        runner.run(f"{method}-seed{seed}", "train_stepwise_dpo.py", args)
        model = os.path.join(folder, "model")
    runner.run(f"eval-{method}-seed{seed}", "evaluate.py", [
        f"--MODEL={model}", f"--TEST_FILE={file}", f"--FIRST_PROBLEM={first}", f"--N_PROBLEMS={n}", "--K=0",
        "--JUDGE=", "--JUDGE_EVAL_FILE=", f"--BATCH_SIZE={cfg['EVAL_BATCH']}", f"--THREADS={cfg['THREADS']}",
        f"--OUT_DIR={folder}/eval"])
    with open(os.path.join(folder, "eval", "metrics.json")) as f:
        acc = json.load(f)["greedy_acc"]
    correct = "".join("01"[answers_match(r["greedy_answer"], r["gold"])]
                      for r in read_jsonl(os.path.join(folder, "eval", "samples.jsonl")))
    atomic_write_json(done, {"method": method, "seed": seed, "greedy_acc": acc, "greedy_correct": correct,
                             "model": model, **settings})
    print_json({"method": method, "seed": seed, "greedy_acc": acc})
    return acc, correct


def comparisons(cfg, correct):
    """[{a, b, difference, low, high}] for the COMPARE pairs whose methods ran (metrics.bootstrap_difference)."""
    return [{"a": a, "b": b} | bootstrap_difference([list(map(int, c)) for c in correct[a]],
                                                    [list(map(int, c)) for c in correct[b]])
            for a, b in cfg["COMPARE"] if a in correct and b in correct]


def table(methods, seeds):
    base = statistics.mean(methods["sft"]) if "sft" in methods else None
    lines = ["| method | mean greedy acc | vs sft | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|---|" + "---|" * len(seeds)]
    for name, accs in methods.items():
        mean = statistics.mean(accs)
        gain = f"{mean - base:+.1%}" if base is not None else ""
        lines.append(f"| {name} | {mean:.1%} | {gain} | " + " | ".join(f"{a:.1%}" for a in accs) + " |")
    return "\n".join(lines)


def differences_table(differences):
    lines = ["| comparison | difference | 95% interval (problems and seeds resampled) |", "|---|---|---|"]
    lines += [f"| {d['a']} - {d['b']} | {d['difference']:+.1%} | {d['low']:+.1%} to {d['high']:+.1%} |"
              for d in differences]
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
    unknown = [m for m in cfg["METHODS"] + list(cfg["VARIANTS"]) if base_method(cfg, m) not in ("sft", *TRAINING)]
    if unknown:
        raise SystemExit(f"unknown method in METHODS or VARIANTS: {unknown}; known: sft, {', '.join(TRAINING)}, "
                         "or a VARIANTS name whose method is one of them")
    t0 = time.time()
    runner = Stages()
    counts = {"judged": make_pairs(cfg, runner, "judged", cfg["JUDGE"])}
    if "step_dpo_oracle" in [base_method(cfg, m) for m in cfg["METHODS"]]:
        counts["oracle"] = make_pairs(cfg, runner, "oracle", f"oracle:{cfg['TRAIN_FILE']}")
    scored_on = file, first, n_problems = eval_problems(cfg)
    runs = {m: [one_run(cfg, runner, m, s, scored_on) for s in cfg["SEEDS"]] for m in cfg["METHODS"]}
    methods = {m: [acc for acc, _ in r] for m, r in runs.items()}
    differences = comparisons(cfg, {m: [c for _, c in r] for m, r in runs.items()})
    summary = {"seeds": cfg["SEEDS"], "methods": methods,
               "mean": {m: statistics.mean(a) for m, a in methods.items()}, "differences": differences,
               "pairs": {name: {k: c[k] for k in ("step_pairs", "full_pairs", "samples", "correct_samples")}
                         | {"step_pair_quality": pair_quality(os.path.join(cfg["RUN_DIR"], name, "step_pairs.jsonl"),
                                                              cfg["TRAIN_FILE"])}
                         for name, c in counts.items()},
               "settings": {k: cfg[k] for k in CONFIG_KEYS}, "wall_seconds": round(time.time() - t0, 1),
               "command": command_line(__file__, argv)}
    atomic_write_json(os.path.join(cfg["RUN_DIR"], "summary.json"), summary)
    text = table(methods, cfg["SEEDS"]) + ("\n\n" + differences_table(differences) if differences else "")
    atomic_write_text(os.path.join(cfg["RUN_DIR"], "summary.md"),
                      f"# Methods against controls\n\n{text}\n\nGreedy accuracy on {n_problems} problems "
                      f"({file} from problem {first}). Wall time {summary['wall_seconds']:.0f} s.\n\n"
                      f"Command: `{summary['command']}`\n")
    plot(methods, cfg["SEEDS"], os.path.join(cfg["RUN_DIR"], "methods.png"))
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
