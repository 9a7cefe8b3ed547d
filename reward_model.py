"""Step-level preference pairs from the policy's own samples, scored step by step by an LLM judge (judges.py).

    python reward_model.py                                  # sample, judge, build pairs -> OUT_DIR
    python reward_model.py --JUDGE=http://127.0.0.1:8080 --JUDGE_MODEL_NAME=smollm2   # a served judge

1. sample K solutions per problem of the pairs pool from the policy;
2. score every step with the judge (judges.py; GenRM, Zhang et al. 2024, arXiv 2408.15240). JUDGE_MODE=check: the judge
   first writes a check of the step, then P(Yes) / (P(Yes) + P(No)) is read after its answer cue (GenRM-CoT);
   one_pass: it answers right after the step, all steps of a solution in one forward pass;
3. Step-DPO and whole-solution pairs (pairs.py); a rejected step that no other sample answers gets
   RECTIFY_SAMPLES continuations sampled from its prefix (self-rectification).
Samples and scores are cached on disk in fixed chunks: a killed run continues where it stopped and ends with
the same bytes as an uninterrupted one.

Writes OUT_DIR/judged.jsonl (TRL stepwise-supervision shape with float `step_scores`, and the judge's
`checks`), step_pairs.jsonl (the Math-Step-DPO-10K shape), full_pairs.jsonl (whole solutions picked by the
judge), outcome_pairs.jsonl (picked by the final answer alone), counts.json and config.json.
"""
import os
import sys
import time

from common import (DiskCache, atomic_write_json, atomic_write_jsonl, cache_key, chunked_cached, command_line,
                    config_from_argv, print_json)
from data_utils import PAIRS_POOL, load_problems, split_steps
from judges import HTTPCheckJudge, HTTPJudge, LocalCheckJudge, LocalJudge
from judges import ONE_PASS_TEMPLATE as one_pass_template   # lower case: CONFIG_KEYS takes upper-case names as tunables
from task import OracleJudge
from models import default_device, load_model, load_tokenizer, make_policy
from pairs import build_step_pairs, first_error, full_pair, parse_solution
from prompts import policy_prompt, step_text

# ----------------------------------------------------------------------------- tunables
POLICY = "models/policy"          # local folder, Hub id, .gguf file, or the base URL of an OpenAI-compatible server
POLICY_MODEL_NAME = ""            # served policy: model name sent to the server
POLICY_TOKENIZER = ""             # served policy: tokenizer whose chat template renders the prompt ("" = plain)
JUDGE = "models/judge"            # the same, the base URL of an OpenAI-compatible server (http://...), or
                                  # oracle:data/train.jsonl (reference labels instead of a judge: a control)
JUDGE_MODEL_NAME = ""             # model name sent to the server
JUDGE_TOKENIZER = ""              # server judge: tokenizer whose chat template renders the prompt ("" = plain)
JUDGE_API_KEY_ENV = "OPENAI_API_KEY"  # environment variable holding the servers' API key, if they need one
HTTP_TIMEOUT = 30.0               # seconds per request
HTTP_RETRIES = 4                  # retries after the first try (connection errors, timeouts, 429, 5xx)
HTTP_WORKERS = 1                  # requests in flight at once (a vLLM server batches them)
JUDGE_LOGPROBS = 5                # top log-probabilities asked of a served judge (vLLM allows up to 20)
JUDGE_MODE = "check"              # check: the judge writes a check of each step, then answers (GenRM-CoT);
                                  # one_pass: it answers right after each step, all steps in one forward pass
CHECK_TOKENS = 48                 # most tokens of one check; a check cut by it leaves its step unscored
CHECK_VOTES = 1                   # checks per solution, their P(Yes) averaged (1: one greedy check)
CHECK_TEMPERATURE = 0.7           # sampling temperature of the checks when CHECK_VOTES > 1
CHECK_TREE_NODES = 128            # one greedy check: most step-tree nodes a level checked together (fastest of
                                  # 32-256 on the bundled judge, docs/LOG.md); BATCH_SIZE for sampled checks
TRAIN_FILE = "data/train.jsonl"   # problems: a JSONL, JSON or parquet file, or hf:REPO:CONFIG:SPLIT (sources.py)
STEP_DELIMITER = "newline"        # how samples split into steps: newline | blank_line | step | markdown_step
ANSWER_STYLE = "gsm8k"            # the final answer a chat-template policy is asked for: gsm8k (#### x) | boxed
FIRST_PROBLEM = PAIRS_POOL[0]     # the pairs pool: problems the policy was never supervised on
N_PROBLEMS = 1000
K = 8                             # samples per problem
TEMPERATURE = 0.7
TOP_P = 1.0
MAX_NEW_TOKENS = 200
THRESHOLD = 0.5                   # a step scored below this is judged wrong
JUDGE_PAST_ERROR = True           # False: stop checking a sample at its first rejected step (one greedy check, the
                                  # local judge): Step-DPO pairs need no more, the pool needs 39% fewer checks; the
                                  # later steps stay unscored (null) and no whole-solution pairs are built
RECTIFY_SAMPLES = 4               # continuations sampled from a prefix when no other sample has a chosen step
CHOSEN_REACHES_ANSWER = True      # a chosen step's continuation must reach the correct final answer (Step-DPO's
                                  # filter); False only prefers such continuations
CHOSEN_ACCEPTED = True            # also require the judge to accept the chosen step (score >= THRESHOLD): with
                                  # the checking judge 94% of accepted chosen steps are right, 74% of all (docs/LOG.md)
REJECTED_FROM_WRONG = True        # rejected steps come only from samples with a wrong final answer; False also
                                  # takes the first judged error of samples whose answer is right
PACKED = True                     # score all steps of a solution in one forward pass
CHUNK = 64                        # problems per sampling chunk (the cache's unit)
JUDGE_CHUNK = 512                 # solutions per scoring chunk (the cache's unit): the local judge batches a
                                  # chunk's solutions by their number of steps, so larger chunks waste less
BATCH_SIZE = 64
OUT_DIR = "results/reference/round1/judged"
CACHE_DIR = "cache"
SEED = 0
THREADS = 2
DTYPE = "float32"
TRUST_REMOTE_CODE = False
CONFIG_KEYS = [k for k in list(globals()) if k.isupper()]

JUDGE_KEYS = ["JUDGE_MODEL_NAME", "JUDGE_TOKENIZER", "JUDGE_API_KEY_ENV", "HTTP_TIMEOUT", "HTTP_RETRIES", "HTTP_WORKERS",
              "JUDGE_LOGPROBS", "JUDGE_MODE", "CHECK_TOKENS", "CHECK_VOTES", "CHECK_TEMPERATURE", "CHECK_TREE_NODES", "PACKED",
              "BATCH_SIZE", "DTYPE", "TRUST_REMOTE_CODE", "SEED"]  # what make_judge reads from a script's config

def make_judge(spec, cfg=None):
    """A judge from a spec: an http(s):// base URL (a served model), a local folder / Hub id / .gguf file, or
    oracle:PROBLEMS_FILE (the programmatic reference labels, a control for experiments). Its settings are the
    JUDGE_KEYS of `cfg` (a script's resolved config); the keys it lacks take this script's defaults."""
    c = {k: globals()[k] for k in JUDGE_KEYS} | {k: v for k, v in (cfg or {}).items() if k in JUDGE_KEYS}
    if c["JUDGE_MODE"] not in ("check", "one_pass"):
        raise SystemExit(f"--JUDGE_MODE must be check or one_pass, got {c['JUDGE_MODE']!r}")
    checks = c["JUDGE_MODE"] == "check"
    generation = {"max_tokens": c["CHECK_TOKENS"], "votes": c["CHECK_VOTES"], "temperature": c["CHECK_TEMPERATURE"],
                  "seed": c["SEED"]}
    if spec.startswith("oracle:"):
        return OracleJudge(spec[len("oracle:"):], one_pass_template)
    if spec.startswith(("http://", "https://")):
        tok = load_tokenizer(c["JUDGE_TOKENIZER"], c["TRUST_REMOTE_CODE"]) if c["JUDGE_TOKENIZER"] else None
        served = (spec, c["JUDGE_MODEL_NAME"], tok, os.environ.get(c["JUDGE_API_KEY_ENV"]), c["HTTP_TIMEOUT"],
                  c["HTTP_RETRIES"], 0.5, c["JUDGE_LOGPROBS"], c["HTTP_WORKERS"])
        return HTTPCheckJudge(*served, **generation) if checks else HTTPJudge(*served)
    model, tok = load_model(spec, c["DTYPE"], c["TRUST_REMOTE_CODE"], default_device())
    if checks:
        return LocalCheckJudge(model, tok, spec, c["BATCH_SIZE"], **generation, tree_nodes=c["CHECK_TREE_NODES"])
    return LocalJudge(model, tok, spec, c["PACKED"], c["BATCH_SIZE"])


def score_solutions(judge, cache, items, chunk):
    """Judge every step of every (question, steps) item, through the cache. Returns (results, n scored)."""
    keys = [cache_key(judge.id, judge.template, q, steps) for q, steps in items]
    if isinstance(judge, HTTPJudge):
        judge.keep_replies(cache)
    return chunked_cached(cache, keys, lambda idx: judge.score([items[i] for i in idx]), chunk, "judging")


def judge_solutions(judge, cache, questions, solutions, chunk):
    """Score every step of each solution (parse_solution dicts, one question each) through the cache, in
    place: "scores", and "raw" replies or "checks" where the judge gives them. Returns the number scored now."""
    results, n_scored = score_solutions(judge, cache, [(q, s["steps"]) for q, s in zip(questions, solutions)], chunk)
    for s, r in zip(solutions, results):
        s["scores"], s["raw"], s["checks"] = r["scores"], r.get("raw"), r.get("checks")
    return n_scored


def sample_solutions(policy, cache, prompts, seeds, n, cfg, desc="sampling"):
    """n sampled completions per prompt, through the cache."""
    settings = [n, cfg["TEMPERATURE"], cfg["TOP_P"], cfg["MAX_NEW_TOKENS"]]
    keys = [cache_key(policy.id, p, s, *settings) for p, s in zip(prompts, seeds)]

    def compute(idx):
        return policy.sample([prompts[i] for i in idx], n, cfg["TEMPERATURE"], cfg["TOP_P"], cfg["MAX_NEW_TOKENS"],
                             [seeds[i] for i in idx])

    return chunked_cached(cache, keys, compute, cfg["CHUNK"], desc)


def main(argv):
    import torch

    cfg = config_from_argv({k: globals()[k] for k in CONFIG_KEYS}, argv)
    torch.set_num_threads(cfg["THREADS"])
    t0 = time.time()
    problems = load_problems(cfg["TRAIN_FILE"])[cfg["FIRST_PROBLEM"]: cfg["FIRST_PROBLEM"] + cfg["N_PROBLEMS"]]
    if not problems:
        raise SystemExit(f"no problems in {cfg['TRAIN_FILE']} from index {cfg['FIRST_PROBLEM']}")
    policy, tokenizer = make_policy(cfg["POLICY"], cfg["POLICY_MODEL_NAME"], cfg["POLICY_TOKENIZER"],
                                    os.environ.get(cfg["JUDGE_API_KEY_ENV"]), cfg["HTTP_TIMEOUT"], cfg["HTTP_RETRIES"],
                                    cfg["HTTP_WORKERS"], cfg["DTYPE"], cfg["TRUST_REMOTE_CODE"], cfg["BATCH_SIZE"])
    judge = make_judge(cfg["JUDGE"], cfg)
    stopping = not cfg["JUDGE_PAST_ERROR"] and hasattr(judge, "stop_at_errors") and judge.stop_at_errors(cfg["THRESHOLD"])
    samples_cache = DiskCache(os.path.join(cfg["CACHE_DIR"], "samples.jsonl"))
    scores_cache = DiskCache(os.path.join(cfg["CACHE_DIR"], "scores.jsonl"))
    gold = [split_steps(p["answer"])[1] for p in problems]
    questions = [p["question"] for p in problems]
    prompts = [policy_prompt(tokenizer, q, cfg["ANSWER_STYLE"]) for q in questions]
    seeds = [cfg["SEED"] * 1_000_000 + cfg["FIRST_PROBLEM"] + i for i in range(len(problems))]

    # 1-2. sample and judge
    texts, n_sampled = sample_solutions(policy, samples_cache, prompts, seeds, cfg["K"], cfg)
    solutions = [[parse_solution(t, g, delimiter=cfg["STEP_DELIMITER"]) for t in row] for row, g in zip(texts, gold)]
    flat = [s for row in solutions for s in row]
    n_scored = judge_solutions(judge, scores_cache, [q for q, row in zip(questions, solutions) for _ in row], flat,
                               cfg["JUDGE_CHUNK"])

    # 3. step pairs, with self-rectification for the rejected steps no other sample answers
    def rectify(unmatched):
        r_prompts = [prompts[i] + step_text(prefix, bad["sep"]) for i, prefix, bad, _ in unmatched]
        r_seeds = [seeds[i] * 1000 + 7 * e + 1 for i, _, _, e in unmatched]
        r_texts, computed["rectify_samples"] = sample_solutions(policy, samples_cache, r_prompts, r_seeds,
                                                              cfg["RECTIFY_SAMPLES"], cfg, desc="rectifying")
        r_solutions = [[parse_solution(step_text(prefix, bad["sep"]) + t, gold[i], delimiter=cfg["STEP_DELIMITER"])
                        for t in row] for (i, prefix, bad, _), row in zip(unmatched, r_texts)]
        # a continuation that misses the final answer can never be chosen when CHOSEN_REACHES_ANSWER: unjudged
        judged_ones = [(questions[i], s) for (i, *_), row in zip(unmatched, r_solutions) for s in row
                       if s["correct"] or not cfg["CHOSEN_REACHES_ANSWER"]]
        for row in r_solutions:
            for s in row:
                s["scores"], s["raw"], s["checks"] = [None] * len(s["steps"]), None, None
        computed["rectify_scored"] = judge_solutions(judge, scores_cache, [q for q, _ in judged_ones],
                                                     [s for _, s in judged_ones], cfg["JUDGE_CHUNK"])
        return r_solutions

    computed = {"samples": n_sampled, "scored": n_scored}
    step_pairs, attempts, rectified = build_step_pairs(questions, gold, solutions, rectify, cfg["THRESHOLD"],
                                                       cfg["CHOSEN_REACHES_ANSWER"], cfg["REJECTED_FROM_WRONG"],
                                                       cfg["CHOSEN_ACCEPTED"])

    # 4. whole-solution pairs: picked by the judge (weighted DPO), and by the final answer alone (outcome DPO)
    def whole_pairs(by_judge):
        return [p for q, g, row in zip(questions, gold, solutions) if (p := full_pair(q, g, row, by_judge))]

    full_pairs = [] if stopping else whole_pairs(True)   # a judge that stopped at errors left steps unscored
    outcome_pairs = whole_pairs(False)

    out = cfg["OUT_DIR"]
    judged = [{"prompt": q, "completions": s["steps"], "labels": [x is not None and x >= cfg["THRESHOLD"]
                                                                  for x in s["scores"]],
               "step_scores": s["scores"], "final": s["final"], "answer": g, "correct": s["correct"],
               "raw": s["raw"]} | ({"checks": s["checks"]} if s["checks"] is not None else {})
              for q, g, row in zip(questions, gold, solutions) for s in row]
    # the steps the judge checked: all, or up to the first rejected one when it stopped at errors
    checked = [s["scores"][: e + 1] if stopping and (e := first_error(s["scores"], cfg["THRESHOLD"])) >= 0
               else s["scores"] for s in flat]
    counts = {
        "problems": len(problems), "samples": len(flat), "correct_samples": sum(s["correct"] for s in flat),
        "steps_scored": sum(map(len, checked)),
        "unparseable_judge_replies": sum(x is None for scores in checked for x in scores),
        "steps_after_a_rejected_step_unchecked": sum(len(s["scores"]) for s in flat) - sum(map(len, checked)),
        "step_pairs": len(step_pairs),
        "step_pairs_by_source": {src: sum(m["source"] == src for _, m in step_pairs)
                                 for src in ("other_sample", "rectified")},
        "rectification_attempts": attempts,
        "rectification_success_rate": rectified / attempts if attempts else None,
        "full_pairs": len(full_pairs), "outcome_pairs": len(outcome_pairs),
    }
    # what this run computed rather than found in the cache (differs between a resumed and a fresh run)
    run_log = {"computed": computed, "seconds": round(time.time() - t0, 1)}
    atomic_write_json(os.path.join(out, "config.json"), cfg | {"judge_id": judge.id, "judge_template": judge.template,
                                                               "command": command_line(__file__, argv)})
    atomic_write_jsonl(os.path.join(out, "judged.jsonl"), judged)
    atomic_write_jsonl(os.path.join(out, "step_pairs.jsonl"), [row for row, _ in step_pairs])
    atomic_write_jsonl(os.path.join(out, "step_pairs_meta.jsonl"), [meta for _, meta in step_pairs])
    atomic_write_jsonl(os.path.join(out, "full_pairs.jsonl"), full_pairs)
    atomic_write_jsonl(os.path.join(out, "outcome_pairs.jsonl"), outcome_pairs)
    atomic_write_json(os.path.join(out, "counts.json"), counts)
    atomic_write_json(os.path.join(out, "run_log.json"), run_log)
    print_json(counts | run_log)


if __name__ == "__main__":
    main(sys.argv[1:])
