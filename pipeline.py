"""The whole pipeline on the bundled defaults, stage by stage, then a before/after table.

    python pipeline.py                      # data -> models -> (sample, judge, pairs -> train) x ROUNDS -> evaluate
    python pipeline.py --MODE=weighted      # train with another loss mode
    python pipeline.py --RUN_DIR=results/my_run --STAGE_ARGS='{"train": ["--BETA=0.3"]}'

Each stage is one of the scripts, run as its own process with its outputs under RUN_DIR; a stage's own
tunables can be overridden through STAGE_ARGS. Round r samples the next N_PROBLEMS problems of the pairs
pool with the policy round r - 1 trained (the starting policy in round 1), and trains that policy on the
pairs (RUN_DIR/round<r>/judged, RUN_DIR/round<r>/train); every round but the last is evaluated by greedy
accuracy (round<r>/eval), the last one in full. Writes RUN_DIR/summary.json (start vs trained policy:
greedy accuracy, majority@K, judge best-of-K; greedy accuracy and pairs per round; wall time; the command),
RUN_DIR/summary.md and RUN_DIR/rounds.png.
"""
import json
import os
import re
import sys
import time

from common import Stages, atomic_write_json, atomic_write_text, command_line, config_from_argv
from data_utils import PAIRS_POOL, TRAIN_FILE
from pairs import pair_quality

# ----------------------------------------------------------------------------- tunables
RUN_DIR = "results/reference"
MODE = "step"                     # training mode: step | weighted | outcome
ROUNDS = 1                        # sample -> judge -> pairs -> train rounds, each from the last round's policy
N_PROBLEMS = 1000                 # pairs-pool problems per round (fresh ones every round)
TRAIN_EPOCHS = 4                  # passes over a round's pairs: 4 beat 2 on validation problems at this size (docs/LOG.md)
TRAIN_LR = 1e-5                   # 4 passes at 1e-5 beat the trainer's 5e-5 on validation problems, 3 seeds (docs/LOG.md)
STAGE_ARGS = {}                   # extra --KEY=value per stage: {"sft": [...], "judge": [...], "train": [...]}
CONFIG_KEYS = [k for k in list(globals()) if k.isupper()]


def stages(cfg):
    """[(name, script, args)] in order. The stages of round r are named judge_r, train_r and eval_r;
    STAGE_ARGS["judge"], ["train"] and ["eval"] apply to them in every round."""
    run, rounds, n = cfg["RUN_DIR"], cfg["ROUNDS"], cfg["N_PROBLEMS"]
    if PAIRS_POOL[0] + rounds * n > PAIRS_POOL[1]:
        raise SystemExit(f"{rounds} rounds of {n} problems need {rounds * n} pool problems; the pairs pool "
                         f"(data_utils.PAIRS_POOL) has {PAIRS_POOL[1] - PAIRS_POOL[0]}")
    files = {"step": "step_pairs.jsonl", "weighted": "full_pairs.jsonl", "outcome": "outcome_pairs.jsonl"}
    if cfg["MODE"] not in files:
        raise SystemExit(f"--MODE must be step, weighted or outcome, got {cfg['MODE']!r}")
    pairs = files[cfg["MODE"]]
    out = [("data", "data_utils.py", ["--generate"]), ("steps", "data_utils.py", []), ("sft", "sft.py", []),
           ("eval_start", "evaluate.py", [f"--OUT_DIR={run}/eval_start", f"--JUDGE_EVAL_FILE={run}/judge_eval.json"])]
    policy = "models/policy"
    for r in range(1, rounds + 1):
        folder = f"{run}/round{r}"
        out += [(f"judge_{r}", "reward_model.py", [f"--POLICY={policy}", f"--FIRST_PROBLEM={PAIRS_POOL[0] + (r - 1) * n}",
                                                   f"--N_PROBLEMS={n}", f"--OUT_DIR={folder}/judged",
                                                   f"--JUDGE_PAST_ERROR={cfg['MODE'] != 'step'}"]),
                (f"train_{r}", "train_stepwise_dpo.py", [f"--MODEL={policy}", f"--DATA={folder}/judged/{pairs}",
                                                         f"--MODE={cfg['MODE']}", f"--EPOCHS={cfg['TRAIN_EPOCHS']}",
                                                         f"--LR={cfg['TRAIN_LR']}",
                                                         f"--OUT_DIR={folder}/train"])]
        policy = f"{folder}/train/model"
        if r < rounds:
            out.append((f"eval_{r}", "evaluate.py", [f"--MODEL={policy}", "--K=0", "--JUDGE=", "--JUDGE_EVAL_FILE=",
                                                     f"--OUT_DIR={folder}/eval"]))
    return out + [("eval_trained", "evaluate.py", [f"--MODEL={policy}", f"--OUT_DIR={run}/eval_trained",
                                                   "--JUDGE_EVAL_FILE="])]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def rounds_record(cfg):
    """Per round: its problems, step and whole-solution pairs, the greedy accuracy of the policy it trained,
    and how many of its step pairs the task's reference step labels agree with (pairs.pair_quality: a
    diagnostic that training never reads)."""
    run, rows = cfg["RUN_DIR"], []
    for r in range(1, cfg["ROUNDS"] + 1):
        counts = read_json(f"{run}/round{r}/judged/counts.json")
        evaluated = f"{run}/round{r}/eval" if r < cfg["ROUNDS"] else f"{run}/eval_trained"
        first = PAIRS_POOL[0] + (r - 1) * cfg["N_PROBLEMS"]
        rows.append({"round": r, "problems": [first, first + cfg["N_PROBLEMS"]], "step_pairs": counts["step_pairs"],
                     "full_pairs": counts["full_pairs"],
                     "greedy_acc": read_json(f"{evaluated}/metrics.json")["greedy_acc"],
                     "step_pair_quality": pair_quality(f"{run}/round{r}/judged/step_pairs.jsonl", TRAIN_FILE)})
    return rows


def plot_rounds(start_acc, rounds, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(range(len(rounds) + 1), [start_acc] + [r["greedy_acc"] for r in rounds], marker="o")
    ax.set_xticks(range(len(rounds) + 1))
    ax.set_xlabel("round (0 = starting policy)")
    ax.set_ylabel("test greedy accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(start, trained, k):
    rows = [("greedy accuracy", "greedy_acc"), (f"majority@{k}", f"maj_at_{k}"),
            (f"judge best-of-{k}", f"judge_best_of_{k}")]
    lines = ["| test set (bundled) | start policy | trained policy | change |", "|---|---|---|---|"]
    for label, key in rows:
        lines.append(f"| {label} | {start[key]:.1%} | {trained[key]:.1%} | {trained[key] - start[key]:+.1%} |")
    return "\n".join(lines)


def headline(metrics_path):
    """(K, greedy accuracy, majority@K and judge best-of-K by the minimum step score) of an evaluation."""
    m = read_json(metrics_path)
    k = m["k"]
    return k, {"greedy_acc": m["greedy_acc"], f"maj_at_{k}": m[f"maj_at_{k}"], f"judge_best_of_{k}": m["judge_min"]}


def main(argv):
    cfg = config_from_argv({k: globals()[k] for k in CONFIG_KEYS}, argv)
    t0 = time.time()
    runner = Stages()
    for name, script, args in stages(cfg):
        runner.run(name, script, args + cfg["STAGE_ARGS"].get(re.sub(r"_\d+$", "", name), []))
    run = cfg["RUN_DIR"]
    (k, start), (_, trained) = headline(f"{run}/eval_start/metrics.json"), headline(f"{run}/eval_trained/metrics.json")
    rounds = rounds_record(cfg)
    summary = {"start": start, "trained": trained, "rounds": rounds, "mode": cfg["MODE"],
               "stage_seconds": runner.seconds, "wall_seconds": round(time.time() - t0, 1),
               "command": command_line(__file__, argv)}
    atomic_write_json(os.path.join(run, "summary.json"), summary)
    plot_rounds(start["greedy_acc"], rounds, os.path.join(run, "rounds.png"))
    text = table(start, trained, k)
    per_round = ", ".join(f"round {r['round']} {r['greedy_acc']:.1%} ({r['step_pairs']} step pairs)" for r in rounds)
    atomic_write_text(os.path.join(run, "summary.md"),
                      f"# Reference run\n\n{text}\n\nMode `{cfg['MODE']}`; judge best-of-{k} reranks {k} samples by "
                      f"their minimum step score. Greedy accuracy after each round: {per_round}. Wall time "
                      f"{summary['wall_seconds']:.0f} s.\n\nCommand: `{summary['command']}`\n")
    print(text)
    print(f"pipeline finished in {summary['wall_seconds']:.0f} s; summary in {run}/summary.json")


if __name__ == "__main__":
    main(sys.argv[1:])
