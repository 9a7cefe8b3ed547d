"""Judge scoring speed: all steps of a solution in one packed forward vs one prompt per step.

    python bench/judge_scoring.py            # -> results/bench/judge_scoring.json

Both paths run in this process on the same solutions, model and batch size (in rows: BATCH solutions
packed, or BATCH step prompts), and their scores are compared. Models: the bundled judge and a randomly
initialised ~30M-parameter Llama-style model with the same tokenizer (speed does not depend on the
weights). Solutions come from the bundled test set, cut to exactly 2, 4 and 8 steps.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import atomic_write_json, command_line, config_from_argv, load_model, print_json  # noqa: E402
from data_utils import load_problems, split_steps  # noqa: E402
from reward_model import LocalJudge  # noqa: E402

# ----------------------------------------------------------------------------- tunables
JUDGE = "models/judge"
TEST_FILE = "data/test.jsonl"
OUT_FILE = "results/bench/judge_scoring.json"
STEPS = [2, 4, 8]
N_SOLUTIONS = 64          # solutions per setting
BATCH = 16                # rows per forward, for both paths
REPEATS = 3               # best of REPEATS timings
THREADS = 2
CONFIG_KEYS = [k for k in list(globals()) if k.isupper()]


def solutions_with_steps(problems, n_steps, count):
    """`count` (question, steps) items with exactly n_steps steps: a solution's steps repeated in order."""
    items = []
    for p in problems:
        steps = split_steps(p["answer"], strip_calc=True)[0]
        items.append((p["question"], (steps * n_steps)[:n_steps]))
        if len(items) == count:
            break
    return items


def timed(fn, repeats):
    best, result = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def main(argv):
    cfg = config_from_argv({k: globals()[k] for k in CONFIG_KEYS}, argv)
    torch.set_num_threads(cfg["THREADS"])
    problems = load_problems(cfg["TEST_FILE"])
    judge_model, tokenizer = load_model(cfg["JUDGE"])
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    big = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, num_hidden_layers=9,
                                       num_attention_heads=8, num_key_value_heads=8, intermediate_size=1408,
                                       max_position_embeddings=2048, tie_word_embeddings=True)).eval()
    models = {"bundled-judge": judge_model,
              f"llama-random-{sum(p.numel() for p in big.parameters()) / 1e6:.0f}M": big}
    rows = []
    for name, model in models.items():
        judge = LocalJudge(model, tokenizer, cfg["JUDGE"], batch_size=cfg["BATCH"])
        for n in cfg["STEPS"]:
            items = solutions_with_steps(problems, n, cfg["N_SOLUTIONS"])
            judge.packed = True
            t_packed, packed = timed(lambda: judge.score(items), cfg["REPEATS"])
            judge.packed = False
            t_step, per_step = timed(lambda: judge.score(items), cfg["REPEATS"])
            diff = max(abs(a - b) for x, y in zip(packed, per_step) for a, b in zip(x["scores"], y["scores"]))
            total = n * len(items)
            row = {"steps": n, "model": name, "packed_per_s": round(total / t_packed, 1),
                   "per_step_per_s": round(total / t_step, 1), "speedup": round(t_step / t_packed, 2),
                   "max_abs_diff": diff}
            print_json(row)
            rows.append(row)
    atomic_write_json(cfg["OUT_FILE"], {"rows": rows, "batch": cfg["BATCH"], "n_solutions": cfg["N_SOLUTIONS"],
                                        "threads": cfg["THREADS"], "device": "cpu", "torch": torch.__version__,
                                        "command": command_line(__file__, argv)})


if __name__ == "__main__":
    main(sys.argv[1:])
