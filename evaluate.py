"""Evaluate a policy on the test set: greedy accuracy, pass@k, majority@k and judge best-of-K; and the judge.

    python evaluate.py                                   # models/policy on data/test.jsonl
    python evaluate.py --MODEL=path/or/hub-id --OUT_DIR=results/my_run/eval
    python evaluate.py --PROCESSBENCH=gsm8k.json,math.json --JUDGE=...   # the judge alone, on ProcessBench

Writes OUT_DIR/config.json (the resolved config and the command), metrics.json, samples.jsonl (every
completion with its extracted answer) and passk.png (pass@k and majority@k against k, greedy as a line).
With a JUDGE, the K samples are also reranked by the judge (min, prod and last step score). Where the
problems carry reference step labels (the bundled task: STEP_LABELS), the judge is measured against them
(step AUROC, accuracy at THRESHOLD, ProcessBench F1 of the first-error location), written to JUDGE_EVAL_FILE;
elsewhere those numbers are absent. With PROCESSBENCH, only the judge runs: on each ProcessBench-format split
(Zheng et al. 2024, arXiv 2412.06559) it predicts the first wrong step, scored by ProcessBench's F1, written
to OUT_DIR/processbench.json (JUDGE=labels scores by the files' own labels: a check of the evaluation).
pass@k uses the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374, eq. 1) over the K samples.
"""
import os
import sys
import time

from common import (DiskCache, atomic_write_json, atomic_write_jsonl, cache_key, command_line, config_from_argv,
                    print_json)
from data_utils import answers_match, extract_answer, load_benchmark, load_problems, split_steps
from sources import source_name
from task import label_steps
from metrics import auroc, first_error_auroc, majority_answer, pass_at_k, processbench_f1
from models import default_device, load_model, sample
from pairs import aggregate, first_error
from prompts import policy_prompt
from reward_model import make_judge, score_solutions

# ----------------------------------------------------------------------------- tunables
MODEL = "models/policy"   # local folder, Hub id, or a .gguf file
JUDGE = "models/judge"    # judge for best-of-K reranking ("" = none); folder, Hub id, .gguf or http:// URL
JUDGE_MODEL_NAME = ""     # model name sent to a judge server
JUDGE_TOKENIZER = ""      # judge server: tokenizer whose chat template renders the prompt ("" = plain)
JUDGE_MODE = "check"      # check (the judge writes a check of each step first) | one_pass; the other judge
                          # settings are reward_model.py's defaults (make_judge)
CHECK_VOTES = 1           # checks per solution in check mode, their P(Yes) averaged (reward_model.CHECK_VOTES)
TEST_FILE = "data/test.jsonl"   # a JSONL, JSON or parquet file, or hf:REPO:CONFIG:SPLIT (sources.py)
STEP_DELIMITER = "newline"     # how samples split into steps: newline | blank_line | step | markdown_step
ANSWER_STYLE = "gsm8k"         # the final answer a chat-template policy is asked for: gsm8k (#### x) | boxed
STEP_LABELS = "auto"           # reference step labels for judge quality: task (the bundled task's checker) | none
                               # | auto (task when every test problem is one of the bundled task's)
PROCESSBENCH = ""              # ProcessBench-format files or hf: specs, comma-separated: evaluate the judge only
OUT_DIR = "results/reference/eval_policy"
JUDGE_EVAL_FILE = "results/reference/judge_eval.json"  # judge-vs-reference-labels report ("" = skip)
THRESHOLD = 0.5           # judge score under which a step counts as wrong
CACHE_DIR = "cache"
FIRST_PROBLEM = 0         # index of the first test problem used
N_PROBLEMS = 0            # 0 = all test problems from FIRST_PROBLEM on
K = 8                     # samples per problem for pass@k / majority@k (0 = greedy accuracy only)
TEMPERATURE = 0.7
TOP_P = 1.0
MAX_NEW_TOKENS = 200
BATCH_SIZE = 64
JUDGE_CHUNK = 512                 # solutions per scoring chunk (the cache's unit; reward_model.JUDGE_CHUNK)
SEED = 0
THREADS = 2
DTYPE = "float32"
TRUST_REMOTE_CODE = False
CONFIG_KEYS = [k for k in list(globals()) if k.isupper()]


def score_samples(gold, greedy, samples):
    """Metrics for one policy. gold: [answer]; greedy: [text]; samples: [[text] * K]."""
    n_problems, k = len(gold), len(samples[0])
    greedy_ok = [answers_match(extract_answer(g), a) for g, a in zip(greedy, gold)]
    sample_ok = [[answers_match(extract_answer(s), a) for s in row] for row, a in zip(samples, gold)]
    pass_curve = [sum(pass_at_k(k, sum(ok), j) for ok in sample_ok) / n_problems for j in range(1, k + 1)]
    maj_curve = []
    for j in range(1, k + 1):
        hits = [answers_match(majority_answer([extract_answer(s) for s in row[:j]]), a)
                for row, a in zip(samples, gold)]
        maj_curve.append(sum(hits) / n_problems)
    return {
        "n_problems": n_problems, "k": k,
        "greedy_acc": sum(greedy_ok) / n_problems,
        "sample_acc": sum(map(sum, sample_ok)) / (n_problems * k),
        f"pass_at_{k}": pass_curve[-1], f"maj_at_{k}": maj_curve[-1],
        "pass_at_k": pass_curve, "maj_at_k": maj_curve,
    }


def judge_pick(step_scores, how):
    """Index of the sample with the best aggregated judge score (first on ties)."""
    values = [aggregate(s, how) for s in step_scores]
    return max(range(len(values)), key=lambda i: (values[i], -i))


def judge_metrics(problems, records, judge, cache, threshold, chunk, delimiter="newline", labelled=True):
    """Judge the K samples of every problem; best-of-K by the judge; judge quality against the bundled
    task's reference labels (task.label_steps) when `labelled`, else None."""
    items = [(r["question"], split_steps(s, delimiter)[0]) for r in records for s in r["samples"]]
    results, _ = score_solutions(judge, cache, items, chunk)
    k = len(records[0]["samples"])
    out = {}
    for r, i in zip(records, range(0, len(results), k)):
        r["step_scores"] = [x["scores"] for x in results[i:i + k]]
    for how in ("min", "prod", "last"):
        picks = [judge_pick([[x if x is not None else 0.0 for x in s] for s in r["step_scores"]], how)
                 for r in records]
        out[f"judge_{how}"] = sum(answers_match(r["sample_answers"][p], r["gold"])
                                  for r, p in zip(records, picks)) / len(records)
    if not labelled:
        return out, None
    step_scores, step_labels, predicted, reference, solutions = [], [], [], [], []
    for p, r in zip(problems, records):
        for text, scores in zip(r["samples"], r["step_scores"]):
            steps = split_steps(text, delimiter)[0]
            labels = label_steps(p["answer"], steps)
            scores = [x if x is not None else 0.5 for x in scores]
            step_scores += scores
            step_labels += labels
            solutions.append((steps, labels, scores))
            predicted.append(first_error(scores, threshold))
            reference.append(next((j for j, ok in enumerate(labels) if not ok), -1))
    quality = {"step_auroc": auroc(step_scores, step_labels),
               "step_accuracy": sum((s >= threshold) == y for s, y in zip(step_scores, step_labels)) / len(step_labels),
               "processbench": processbench_f1(predicted, reference),
               "first_error_auroc": first_error_auroc(solutions),
               "n_steps": len(step_labels), "n_wrong_steps": step_labels.count(False),
               "unparseable": sum(x is None for r in records for s in r["step_scores"] for x in s)}
    return out, quality


def task_labelled(problems):
    """Whether the bundled task's checker can label samples of these problems: every one of them is a
    problem of the bundled task (data/train.jsonl, data/test.jsonl). Its labels mean nothing elsewhere."""
    bundled = set()
    for name in ("train.jsonl", "test.jsonl"):
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", name)
        if os.path.exists(path):
            bundled |= {(p["question"], p["answer"]) for p in load_problems(path)}
    return all((p["question"], p["answer"]) in bundled for p in problems)


class ReferenceLabels:
    """Not a judge: a benchmark's own labels as step scores (1.0 before the first wrong step, 0.0 from it on),
    so that the evaluation itself can be checked (its F1 must be 1.0). JUDGE=labels."""

    def __init__(self, rows):
        self.labels = {cache_key(r["problem"], r["steps"]): r["label"] for r in rows}
        self.id, self.template = f"labels@{cache_key(sorted(self.labels.items()))[:16]}", "labels"

    def score(self, items):
        labels = [self.labels[cache_key(q, steps)] for q, steps in items]
        return [{"scores": [float(label == -1 or k < label) for k in range(len(steps))], "raw": None}
                for (_, steps), label in zip(items, labels)]


def processbench_eval(judge, cache, rows, threshold, chunk):
    """ProcessBench on one split: the judge scores every step of each solution, its predicted first error is
    the first step scored under `threshold` (-1: none); F1 of the accuracies on erroneous and on correct
    solutions (metrics.processbench_f1), and the count of steps the judge left unscored."""
    results, _ = score_solutions(judge, cache, [(r["problem"], r["steps"]) for r in rows], chunk)
    predicted = [first_error(x["scores"], threshold) for x in results]
    return processbench_f1(predicted, [r["label"] for r in rows]) | {
        "n": len(rows), "unparseable": sum(x is None for r in results for x in r["scores"])}


def run_processbench(cfg, argv):
    """evaluate.py with PROCESSBENCH: the judge alone on every split; writes OUT_DIR/processbench.json."""
    splits = {source_name(spec): load_benchmark(spec) for spec in cfg["PROCESSBENCH"].split(",") if spec}
    rows = [r for split in splits.values() for r in split]
    judge = ReferenceLabels(rows) if cfg["JUDGE"] == "labels" else make_judge(cfg["JUDGE"], cfg)
    cache = DiskCache(os.path.join(cfg["CACHE_DIR"], "scores.jsonl"))
    report = {name: processbench_eval(judge, cache, split, cfg["THRESHOLD"], cfg["JUDGE_CHUNK"])
              for name, split in splits.items()}
    f1s = [r["f1"] for r in report.values() if r["f1"] is not None]
    summary = {"mean_f1": sum(f1s) / len(f1s) if f1s else None, "splits": report, "judge": judge.id,
               "threshold": cfg["THRESHOLD"], "command": command_line(__file__, argv)}
    atomic_write_json(os.path.join(cfg["OUT_DIR"], "config.json"), cfg | {"command": command_line(__file__, argv)})
    atomic_write_json(os.path.join(cfg["OUT_DIR"], "processbench.json"), summary)
    f1 = {name: None if r["f1"] is None else round(r["f1"], 4) for name, r in report.items()}
    print_json({"judge": judge.id} | f1 | {"out": cfg["OUT_DIR"]})
    return summary


def plot_passk(metrics, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(range(1, metrics["k"] + 1))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, metrics["pass_at_k"], marker="o", label="pass@k")
    ax.plot(ks, metrics["maj_at_k"], marker="s", label="majority@k")
    ax.axhline(metrics["greedy_acc"], color="gray", linestyle="--", label="greedy")
    if "judge_min" in metrics:
        ax.plot([metrics["k"]], [metrics["judge_min"]], marker="*", markersize=12, linestyle="none",
                label=f"judge best-of-{metrics['k']} (min)")
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def greedy_solutions(model, tokenizer, problems, max_new_tokens=200, batch_size=64, desc="greedy", style="gsm8k"):
    """(greedy completion per problem, greedy accuracy)."""
    prompts = [policy_prompt(tokenizer, p["question"], style) for p in problems]
    greedy = [row[0] for row in sample(model, tokenizer, prompts, n=1, temperature=0.0,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc)]
    ok = [answers_match(extract_answer(g), split_steps(p["answer"])[1]) for g, p in zip(greedy, problems)]
    return greedy, sum(ok) / len(problems)


def evaluate_policy(model, tokenizer, problems, cfg, desc=""):
    """(metrics, per-problem records) for a loaded policy."""
    style = cfg.get("ANSWER_STYLE", ANSWER_STYLE)
    prompts = [policy_prompt(tokenizer, p["question"], style) for p in problems]
    gold = [split_steps(p["answer"])[1] for p in problems]
    greedy, greedy_acc = greedy_solutions(model, tokenizer, problems, cfg["MAX_NEW_TOKENS"], cfg["BATCH_SIZE"],
                                          f"{desc}greedy", style)
    if not cfg["K"]:  # greedy accuracy only
        records = [{"question": p["question"], "gold": g, "greedy": gr, "greedy_answer": extract_answer(gr)}
                   for p, g, gr in zip(problems, gold, greedy)]
        return {"n_problems": len(problems), "k": 0, "greedy_acc": greedy_acc}, records
    samples = sample(model, tokenizer, prompts, n=cfg["K"], temperature=cfg["TEMPERATURE"], top_p=cfg["TOP_P"],
                     max_new_tokens=cfg["MAX_NEW_TOKENS"], batch_size=cfg["BATCH_SIZE"], seed=cfg["SEED"],
                     desc=f"{desc}samples")
    records = [{"question": p["question"], "gold": g, "greedy": gr, "greedy_answer": extract_answer(gr),
                "samples": s, "sample_answers": [extract_answer(x) for x in s]}
               for p, g, gr, s in zip(problems, gold, greedy, samples)]
    return score_samples(gold, greedy, samples), records


def main(argv):
    import torch

    cfg = config_from_argv({k: globals()[k] for k in CONFIG_KEYS}, argv)
    torch.set_num_threads(cfg["THREADS"])
    t0 = time.time()
    if cfg["STEP_LABELS"] not in ("auto", "task", "none"):
        raise SystemExit(f"--STEP_LABELS must be auto, task or none, got {cfg['STEP_LABELS']!r}")
    if cfg["PROCESSBENCH"]:
        return run_processbench(cfg, argv)
    problems = load_problems(cfg["TEST_FILE"])[cfg["FIRST_PROBLEM"]:]
    if cfg["N_PROBLEMS"]:
        problems = problems[: cfg["N_PROBLEMS"]]
    model, tokenizer = load_model(cfg["MODEL"], cfg["DTYPE"], cfg["TRUST_REMOTE_CODE"], default_device())
    metrics, records = evaluate_policy(model, tokenizer, problems, cfg)
    out = cfg["OUT_DIR"]
    if cfg["JUDGE"] and cfg["K"]:
        judge = make_judge(cfg["JUDGE"], cfg)
        cache = DiskCache(os.path.join(cfg["CACHE_DIR"], "scores.jsonl"))
        labelled = cfg["STEP_LABELS"] == "task" or (cfg["STEP_LABELS"] == "auto" and task_labelled(problems))
        best_of, quality = judge_metrics(problems, records, judge, cache, cfg["THRESHOLD"], cfg["JUDGE_CHUNK"],
                                         cfg["STEP_DELIMITER"], labelled)
        metrics |= best_of | ({"judge_quality": quality} if quality else {})
        if cfg["JUDGE_EVAL_FILE"] and quality:
            atomic_write_json(cfg["JUDGE_EVAL_FILE"], {
                "step_auroc": quality["step_auroc"], "step_accuracy": quality["step_accuracy"],
                "processbench_f1": quality["processbench"]["f1"],
                "best_of_n": {"n": cfg["K"], **best_of, "majority": metrics[f"maj_at_{cfg['K']}"],
                              "greedy": metrics["greedy_acc"], "random": metrics["sample_acc"]},
                "processbench": quality["processbench"], "first_error_auroc": quality["first_error_auroc"],
                "n_problems": len(problems),
                "n_steps": quality["n_steps"], "n_wrong_steps": quality["n_wrong_steps"],
                "unparseable": quality["unparseable"], "policy": cfg["MODEL"], "judge": judge.id,
                "judge_mode": cfg["JUDGE_MODE"],
                "threshold": cfg["THRESHOLD"], "seed": cfg["SEED"], "temperature": cfg["TEMPERATURE"],
                "command": command_line(__file__, argv)})
    metrics["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(os.path.join(out, "config.json"), cfg | {"command": command_line(__file__, argv)})
    atomic_write_jsonl(os.path.join(out, "samples.jsonl"), records)
    atomic_write_json(os.path.join(out, "metrics.json"), metrics)
    if cfg["K"]:
        plot_passk(metrics, os.path.join(out, "passk.png"), f"{cfg['MODEL']} on {cfg['TEST_FILE']}")
    k = cfg["K"]
    shown = ["greedy_acc", f"pass_at_{k}", f"maj_at_{k}", "judge_min", "judge_prod", "judge_last"]
    print_json({"model": cfg["MODEL"]} | {m: round(metrics[m], 4) for m in shown if m in metrics} | {"out": out})


if __name__ == "__main__":
    main(sys.argv[1:])
