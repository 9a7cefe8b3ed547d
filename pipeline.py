"""The whole pipeline on the bundled defaults, stage by stage, then a before/after table.

    python pipeline.py                      # data -> models -> sample, judge, pairs -> train -> evaluate
    python pipeline.py --MODE=weighted      # train with another loss mode
    python pipeline.py --RUN_DIR=results/my_run --STAGE_ARGS='{"train": ["--BETA=0.3"]}'

Each stage is one of the scripts, run as its own process with its outputs under RUN_DIR; a stage's own
tunables can be overridden through STAGE_ARGS. Writes RUN_DIR/summary.json (start vs trained policy:
greedy accuracy, majority@8, judge best-of-8; wall time; the command) and RUN_DIR/summary.md.
"""
import json
import os
import sys
import time

from common import Stages, atomic_write_json, atomic_write_text, command_line, config_from_argv

# ----------------------------------------------------------------------------- tunables
RUN_DIR = "results/reference"
MODE = "step"                     # training mode: step | weighted | outcome
STAGE_ARGS = {}                   # extra --KEY=value per stage: {"sft": [...], "judge": [...], "train": [...]}
CONFIG_KEYS = [k for k in list(globals()) if k.isupper()]


def stages(cfg):
    run = cfg["RUN_DIR"]
    pairs = "step_pairs.jsonl" if cfg["MODE"] == "step" else "full_pairs.jsonl"
    return [
        ("data", ["data_utils.py", "--generate"]),
        ("steps", ["data_utils.py"]),
        ("sft", ["sft.py"]),
        ("eval_start", ["evaluate.py", f"--OUT_DIR={run}/eval_start", f"--JUDGE_EVAL_FILE={run}/judge_eval.json"]),
        ("judge", ["reward_model.py", f"--OUT_DIR={run}/judged"]),
        ("train", ["train_stepwise_dpo.py", f"--DATA={run}/judged/{pairs}", f"--MODE={cfg['MODE']}",
                   f"--OUT_DIR={run}/train"]),
        ("eval_trained", ["evaluate.py", f"--MODEL={run}/train/model", f"--OUT_DIR={run}/eval_trained",
                          "--JUDGE_EVAL_FILE="]),
    ]


def table(start, trained, k):
    rows = [("greedy accuracy", "greedy_acc"), (f"majority@{k}", f"maj_at_{k}"),
            (f"judge best-of-{k}", f"judge_best_of_{k}")]
    lines = ["| test set (bundled) | start policy | trained policy | change |", "|---|---|---|---|"]
    for label, key in rows:
        lines.append(f"| {label} | {start[key]:.1%} | {trained[key]:.1%} | {trained[key] - start[key]:+.1%} |")
    return "\n".join(lines)


def headline(metrics_path):
    """(K, greedy accuracy, majority@K and judge best-of-K by the minimum step score) of an evaluation."""
    with open(metrics_path) as f:
        m = json.load(f)
    k = m["k"]
    return k, {"greedy_acc": m["greedy_acc"], f"maj_at_{k}": m[f"maj_at_{k}"], f"judge_best_of_{k}": m["judge_min"]}


def main(argv):
    cfg = config_from_argv({k: globals()[k] for k in CONFIG_KEYS}, argv)
    t0 = time.time()
    runner = Stages()
    for name, (script, *args) in stages(cfg):
        runner.run(name, script, args + cfg["STAGE_ARGS"].get(name, []))
    run = cfg["RUN_DIR"]
    (k, start), (_, trained) = headline(f"{run}/eval_start/metrics.json"), headline(f"{run}/eval_trained/metrics.json")
    summary = {"start": start, "trained": trained, "mode": cfg["MODE"], "stage_seconds": runner.seconds,
               "wall_seconds": round(time.time() - t0, 1), "command": command_line(__file__, argv)}
    atomic_write_json(os.path.join(run, "summary.json"), summary)
    text = table(start, trained, k)
    atomic_write_text(os.path.join(run, "summary.md"),
                      f"# Reference run\n\n{text}\n\nMode `{cfg['MODE']}`; judge best-of-{k} reranks "
                      f"{k} samples by their minimum step score. Wall time {summary['wall_seconds']:.0f} s."
                      f"\n\nCommand: `{summary['command']}`\n")
    print(text)
    print(f"pipeline finished in {summary['wall_seconds']:.0f} s; summary in {run}/summary.json")


if __name__ == "__main__":
    main(sys.argv[1:])
