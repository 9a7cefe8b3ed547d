"""Judge scoring speed: all steps of a solution in one packed forward vs one prompt per step, and what the
generative mode (a check written before each answer) costs against the one-pass mode.

    python bench/judge_scoring.py            # -> results/bench/judge_scoring.json

Both paths run in this process on the same solutions, model and batch size (in rows: BATCH solutions
packed, or BATCH step prompts), and their scores are compared. The packed path batches solutions of
similar length together; the per-step path batches the step prompts in the order they arise (solution by
solution). Each row records the tokens each path runs, padding included and not, so the share of the
speedup that comes from padding is visible. The two paths alternate REPEATS times and each one's fastest
time counts (the machine's speed drifts between runs). The generative mode (judges.LocalCheckJudge,
greedy checks of at most CHECK_TOKENS tokens) runs on the same solutions; its row records steps per second
and the tokens the judge wrote per step. Models: the bundled judge and a randomly initialised ~30M-parameter
Llama-style model with the same tokenizer (speed does not depend on the weights, but the length of a check
does: the random model never writes the answer cue, so each of its checks runs to CHECK_TOKENS, the most a
check can cost). Solutions come from the bundled test set, cut to exactly 2, 4 and 8 steps.
"""
import os
import sys
import time
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import atomic_write_json, command_line, config_from_argv, print_json  # noqa: E402
from data_utils import load_problems, split_steps  # noqa: E402
from models import load_model  # noqa: E402
from prompts import pack_judge, step_prompt_ids  # noqa: E402
from judges import LocalCheckJudge, LocalJudge  # noqa: E402

# ----------------------------------------------------------------------------- tunables
JUDGE = "models/judge"
TEST_FILE = "data/test.jsonl"
OUT_FILE = "results/bench/judge_scoring.json"
STEPS = [2, 4, 8]
N_SOLUTIONS = 64          # solutions per setting
BATCH = 16                # rows per forward, for both paths
REPEATS = 3               # best of REPEATS timings
CHECK_TOKENS = 48         # most tokens of one check in the generative mode
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


def timed(fns, repeats):
    """Fastest time and last result of each function, run in turns `repeats` times."""
    best, results = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            results[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best, results


def tokens_run(lengths, batch):
    """(with padding, without) tokens of rows of `lengths` batched `batch` at a time in this order."""
    chunks = [lengths[i:i + batch] for i in range(0, len(lengths), batch)]
    return sum(len(c) * max(c) for c in chunks), sum(lengths)


def score(judge, items, packed):
    judge.packed = packed
    return judge.score(items)


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
        checker = LocalCheckJudge(model, tokenizer, cfg["JUDGE"], batch_size=cfg["BATCH"], max_tokens=cfg["CHECK_TOKENS"])
        for n in cfg["STEPS"]:
            items = solutions_with_steps(problems, n, cfg["N_SOLUTIONS"])
            (t_packed, t_step), (packed, per_step) = timed(
                [partial(score, judge, items, True), partial(score, judge, items, False)], cfg["REPEATS"])
            packs = [pack_judge(tokenizer, q, steps) for q, steps in items]
            packed_tokens = tokens_run(sorted(len(p[0]) for p in packs), cfg["BATCH"])
            per_step_tokens = tokens_run([len(step_prompt_ids(p, k)) for p in packs for k in range(len(p[3]))],
                                         cfg["BATCH"])
            diff = max(abs(a - b) for x, y in zip(packed, per_step) for a, b in zip(x["scores"], y["scores"]))
            total = n * len(items)
            (t_check,), (checked,) = timed([partial(checker.score, items)], 1)
            written = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for r in checked for c in r["checks"])
            row = {"steps": n, "model": name, "packed_per_s": round(total / t_packed, 1),
                   "per_step_per_s": round(total / t_step, 1), "speedup": round(t_step / t_packed, 2),
                   "max_abs_diff": diff, "packed_tokens": packed_tokens[0], "per_step_tokens": per_step_tokens[0],
                   "packed_real_tokens": packed_tokens[1], "per_step_real_tokens": per_step_tokens[1],
                   "check_per_s": round(total / t_check, 1), "one_pass_vs_check": round(t_check / t_packed, 1),
                   "check_tokens_per_step": round(written / total, 1),
                   "checks_cut": sum(s is None for r in checked for s in r["scores"])}
            print_json(row)
            rows.append(row)
    atomic_write_json(cfg["OUT_FILE"], {"rows": rows, "batch": cfg["BATCH"], "n_solutions": cfg["N_SOLUTIONS"],
                                        "check_tokens": cfg["CHECK_TOKENS"],
                                        "threads": cfg["THREADS"], "device": "cpu", "torch": torch.__version__,
                                        "command": command_line(__file__, argv)})


if __name__ == "__main__":
    main(sys.argv[1:])
