"""Evaluate a policy on the test set: greedy accuracy, pass@k and majority@k from K samples.

    python evaluate.py                                   # models/policy on data/test.jsonl
    python evaluate.py --MODEL=path/or/hub-id --OUT_DIR=results/my_run/eval

Writes OUT_DIR/config.json (the resolved config and the command), metrics.json, samples.jsonl (every
completion with its extracted answer) and passk.png (pass@k and majority@k against k, greedy as a line).
pass@k uses the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374, eq. 1) over the K samples.
"""
import os
import sys
import time
from collections import Counter
from math import comb

from common import (atomic_write_json, atomic_write_jsonl, command_line, config_from_argv, load_model,
                    policy_prompt, print_json, sample)
from data_utils import answers_match, extract_answer, load_problems, normalize_answer, split_steps

# ----------------------------------------------------------------------------- tunables
MODEL = "models/policy"   # local folder, Hub id, or a .gguf file
TEST_FILE = "data/test.jsonl"
OUT_DIR = "results/reference/eval_policy"
N_PROBLEMS = 0            # 0 = all test problems
K = 8                     # samples per problem for pass@k / majority@k
TEMPERATURE = 0.7
TOP_P = 1.0
MAX_NEW_TOKENS = 200
BATCH_SIZE = 64
SEED = 0
THREADS = 2
DTYPE = "float32"
TRUST_REMOTE_CODE = False
CONFIG_KEYS = [k for k in list(globals()) if k.isupper()]


def pass_at_k(n, c, k):
    """Probability that at least one of k samples drawn from n (c of them correct) is correct."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_answer(answers):
    """Most common normalised answer, ties broken by first appearance; None if no sample has an answer."""
    votes = [normalize_answer(a) for a in answers if a is not None]
    if not votes:
        return None
    counts = Counter(votes)
    best = max(counts.values())
    return next(v for v in votes if counts[v] == best)


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


def plot_passk(metrics, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(range(1, metrics["k"] + 1))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, metrics["pass_at_k"], marker="o", label="pass@k")
    ax.plot(ks, metrics["maj_at_k"], marker="s", label="majority@k")
    ax.axhline(metrics["greedy_acc"], color="gray", linestyle="--", label="greedy")
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_policy(model, tokenizer, problems, cfg, desc=""):
    """(metrics, per-problem records) for a loaded policy."""
    prompts = [policy_prompt(tokenizer, p["question"]) for p in problems]
    gold = [split_steps(p["answer"])[1] for p in problems]
    greedy = [row[0] for row in sample(model, tokenizer, prompts, n=1, temperature=0.0,
                                       max_new_tokens=cfg["MAX_NEW_TOKENS"], batch_size=cfg["BATCH_SIZE"],
                                       desc=f"{desc}greedy")]
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
    problems = load_problems(cfg["TEST_FILE"])
    if cfg["N_PROBLEMS"]:
        problems = problems[: cfg["N_PROBLEMS"]]
    model, tokenizer = load_model(cfg["MODEL"], cfg["DTYPE"], cfg["TRUST_REMOTE_CODE"])
    metrics, records = evaluate_policy(model, tokenizer, problems, cfg)
    metrics["seconds"] = round(time.time() - t0, 1)
    out = cfg["OUT_DIR"]
    atomic_write_json(os.path.join(out, "config.json"), cfg | {"command": command_line()})
    atomic_write_jsonl(os.path.join(out, "samples.jsonl"), records)
    atomic_write_json(os.path.join(out, "metrics.json"), metrics)
    plot_passk(metrics, os.path.join(out, "passk.png"), f"{cfg['MODEL']} on {cfg['TEST_FILE']}")
    k = cfg["K"]
    print_json({"model": cfg["MODEL"], "greedy_acc": round(metrics["greedy_acc"], 4),
                f"pass_at_{k}": round(metrics[f"pass_at_{k}"], 4), f"maj_at_{k}": round(metrics[f"maj_at_{k}"], 4),
                "out": out})


if __name__ == "__main__":
    main(sys.argv[1:])
