"""The LLM step judges, and step-level preference pairs built from the policy's own judged samples.

    python reward_model.py                                  # sample, judge, build pairs -> OUT_DIR
    python reward_model.py --JUDGE=http://127.0.0.1:8080 --JUDGE_MODEL_NAME=smollm2   # a served judge

1. sample K solutions per problem of the pairs pool from the policy;
2. score every step with the judge (GenRM, Zhang et al. 2024, arXiv 2408.15240). JUDGE_MODE=check: the judge
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
import hashlib
import json
import math
import os
import sys
import threading
import time

from common import (DiskCache, atomic_write_json, atomic_write_jsonl, cache_key, chunked_cached, command_line,
                    config_from_argv, print_json)
from data_utils import PAIRS_POOL, load_problems, split_steps
from task import OracleJudge
from models import (CompletionsClient, Rows, ServerError, _pick_tokens, default_device, fingerprint, load_model,
                    load_tokenizer, logits_at, make_policy)
from pairs import build_step_pairs, full_pair, parse_solution
from prompts import (ANSWER_CUE, CHECK_CUE, CHECK_HEADER, CHECK_STEP, JUDGE_HEADER, JUDGE_NO, JUDGE_STEP, JUDGE_SUFFIX,
                     JUDGE_YES, answer_token_ids, check_answer, check_head, check_step, encode, judge_segments, left_pad,
                     pack_judge, packed_batch, policy_prompt, step_prompt_ids, step_text)

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
              "JUDGE_LOGPROBS", "JUDGE_MODE", "CHECK_TOKENS", "CHECK_VOTES", "CHECK_TEMPERATURE", "PACKED", "BATCH_SIZE",
              "DTYPE", "TRUST_REMOTE_CODE", "SEED"]  # what make_judge reads from a script's config
ONE_PASS_TEMPLATE = hashlib.sha256(json.dumps([JUDGE_HEADER, JUDGE_STEP, JUDGE_SUFFIX, JUDGE_YES, JUDGE_NO])
                                   .encode()).hexdigest()[:12]


def check_template(max_tokens, votes, temperature, seed):
    """The cache's name for the generative judge's prompts and generation settings."""
    settings = [CHECK_HEADER, CHECK_STEP, CHECK_CUE, ANSWER_CUE, JUDGE_YES, JUDGE_NO, max_tokens, votes]
    return "check-" + cache_key(*settings, *([temperature, seed] if votes > 1 else []))[:12]


# ----------------------------------------------------------------------------- judges


class JudgeError(ServerError):
    """The judge could not score a step after bounded retries."""


def yes_probability(logp_yes, logp_no):
    """P(Yes) / (P(Yes) + P(No)) from the two log-probabilities, computed stably."""
    return 1.0 / (1.0 + math.exp(min(700.0, logp_no - logp_yes)))


class LocalJudge:
    """A transformers causal LM as judge. `packed` scores every step of a solution in one forward pass;
    otherwise each step prompt is its own (left-padded) row, for models that do not take a 4D mask."""

    def __init__(self, model, tokenizer, name, packed=True, batch_size=64):
        import torch

        self.model, self.tokenizer, self.packed, self.batch_size = model, tokenizer, packed, batch_size
        self.yes, self.no = answer_token_ids(tokenizer, JUDGE_YES), answer_token_ids(tokenizer, JUDGE_NO)
        if not self.yes or not self.no:
            raise JudgeError(f"the judge tokenizer has no token for {JUDGE_YES!r} or {JUDGE_NO!r}")
        self.id, self.template = f"{name}@{fingerprint(name)}", ONE_PASS_TEMPLATE
        self.torch = torch

    def _scores(self, logits):
        """(rows, vocab) logits at the answer positions -> list of scores."""
        logp = logits.double().log_softmax(-1)
        lse_yes = logp[:, self.yes].logsumexp(-1)
        lse_no = logp[:, self.no].logsumexp(-1)
        return [yes_probability(a, b) for a, b in zip(lse_yes.tolist(), lse_no.tolist())]

    def score(self, items):
        """items: [(question, steps)] -> [{"scores": [float per step], "raw": None}]."""
        torch = self.torch
        packs = [pack_judge(self.tokenizer, q, steps) for q, steps in items]
        with torch.no_grad():
            if self.packed:
                # solutions of similar length share a batch, so little of it is padding
                order = sorted(range(len(packs)), key=lambda i: len(packs[i][0]))
                out = [None] * len(packs)
                for start in range(0, len(packs), self.batch_size):
                    index = order[start:start + self.batch_size]
                    batch = [packs[i] for i in index]
                    ids, pos, mask = packed_batch(batch, self.tokenizer.pad_token_id, self.model.dtype)
                    ids, pos, mask = ids.to(self.model.device), pos.to(self.model.device), mask.to(self.model.device)
                    rows = torch.tensor([r for r, p in enumerate(batch) for _ in p[3]], dtype=torch.long)
                    cols = torch.tensor([i for p in batch for i in p[3]], dtype=torch.long)
                    logits = logits_at(self.model, rows, cols, input_ids=ids, attention_mask=mask, position_ids=pos)
                    counts = [len(p[3]) for p in batch]
                    for i, chunk in zip(index, logits.split(counts)):
                        out[i] = self._scores(chunk) if len(chunk) else []
            else:
                rows = [(i, step_prompt_ids(p, k)) for i, p in enumerate(packs) for k in range(len(p[3]))]
                flat = []
                for start in range(0, len(rows), self.batch_size):
                    ids, mask = left_pad([ids for _, ids in rows[start:start + self.batch_size]],
                                         self.tokenizer.pad_token_id)
                    pos = (mask.cumsum(-1) - 1).clamp(min=0)
                    ids, pos, mask = ids.to(self.model.device), pos.to(self.model.device), mask.to(self.model.device)
                    logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                        logits_to_keep=1).logits[:, -1]
                    flat += self._scores(logits)
                out = [[] for _ in packs]
                for (i, _), s in zip(rows, flat):
                    out[i].append(s)
        return [{"scores": s, "raw": None} for s in out]


def combine_votes(items, votes, scores, checks):
    """Per item, the mean score of its `votes` checked rows (rows i * votes .. (i + 1) * votes - 1) where they
    scored the step, None where none did; "checks" holds the checks (one list per vote when votes > 1)."""
    out = []
    for i, (_, steps) in enumerate(items):
        mine = range(i * votes, (i + 1) * votes)
        per_step = [[scores[r][k] for r in mine if scores[r][k] is not None] for k in range(len(steps))]
        out.append({"scores": [sum(v) / len(v) if v else None for v in per_step],
                    "checks": checks[i * votes] if votes == 1 else [checks[r] for r in mine]})
    return out


class LocalCheckJudge(LocalJudge):
    """The generative mode of a transformers judge: it writes a check of each step (at most `max_tokens`
    tokens, ended by ANSWER_CUE or EOS), then P(Yes) / (P(Yes) + P(No)) is read after ANSWER_CUE. A check cut
    by the token limit leaves its step unscored (None). votes > 1 samples that many checks per solution at
    `temperature` (each from its own seeded generator) and averages their P(Yes) (GenRM's majority voting)."""

    def __init__(self, model, tokenizer, name, batch_size=64, max_tokens=32, votes=1, temperature=0.7, seed=0):
        super().__init__(model, tokenizer, name, True, batch_size)
        self.max_tokens, self.votes, self.temperature, self.seed = max_tokens, votes, temperature, seed
        self.template = check_template(max_tokens, votes, temperature, seed)
        self.cue = tokenizer(ANSWER_CUE, add_special_tokens=False)["input_ids"]

    def score(self, items):
        """items: [(question, steps)] -> [{"scores": [score per step], "checks": [check text per step]}] (with
        votes > 1, "checks" holds one list of checks per vote)."""
        rows = [(i, v) for i in range(len(items)) for v in range(self.votes)]
        order = sorted(range(len(rows)), key=lambda r: (len(items[rows[r][0]][1]), len(items[rows[r][0]][0])))
        scores, checks = [None] * len(rows), [None] * len(rows)
        with self.torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                index = order[start:start + self.batch_size]
                batch = [(items[rows[r][0]], cache_key(self.seed, *items[rows[r][0]], rows[r][1])) for r in index]
                for r, (s, c) in zip(index, zip(*self.check_batch(batch))):
                    scores[r], checks[r] = s, c
        return combine_votes(items, self.votes, scores, checks)

    def check_batch(self, batch):
        """batch: [((question, steps), seed text)] -> (scores, checks) per row, all rows checked together."""
        torch, tok = self.torch, self.tokenizer
        steps = [s for (_, s), _ in batch]
        gens = [torch.Generator().manual_seed(int(key[:15], 16)) for _, key in batch]
        rows = Rows(self.model, len(batch), tok.pad_token_id)
        pending = [encode(tok, check_head(tok, q)) for (q, _), _ in batch]
        scores, checks = [[None] * len(s) for s in steps], [[None] * len(s) for s in steps]
        for k in range(max(map(len, steps), default=0)):
            live = [r for r in range(len(batch)) if k < len(steps[r])]
            logits = rows.feed([pending[r] + tok(check_step(steps[r][k]), add_special_tokens=False)["input_ids"]
                                if r in live else [] for r in range(len(batch))])
            written, ended = {r: [] for r in live}, {}        # row -> "cue" | "eos" | "cut"
            for _ in range(self.max_tokens):
                writing = [r for r in live if r not in ended]
                if not writing:
                    break
                uniforms = torch.stack([torch.rand((), generator=gens[r]) for r in writing]) if self.votes > 1 else None
                next_ids = _pick_tokens(logits[writing].float().cpu(), self.temperature if self.votes > 1 else 0,
                                        1.0, uniforms).tolist()
                chunks = [[] for _ in batch]
                for r, t in zip(writing, next_ids):
                    if t == tok.eos_token_id:
                        ended[r] = "eos"
                    else:
                        written[r].append(t)
                        chunks[r] = [t]
                logits = rows.feed(chunks)
                for r in writing:
                    if r not in ended and tok.decode(written[r][-len(self.cue) - 2:]).rstrip().endswith(ANSWER_CUE):
                        ended[r] = "cue"
            # a check ended by EOS is followed by the cue, as a server's stop would leave it
            logits = rows.feed([self.cue if ended.get(r) == "eos" else [] for r in range(len(batch))])
            for r in live:
                text = tok.decode(written[r], skip_special_tokens=True)
                checks[r][k] = text[: text.rfind(ANSWER_CUE)] if ended.get(r) == "cue" else text
                if r in ended:
                    scores[r][k] = self._scores(logits[r:r + 1])[0]
                    pending[r] = tok(check_answer(scores[r][k] >= 0.5), add_special_tokens=False)["input_ids"]
                else:  # cut by the token limit: unscored, and the judge's text goes on as if it had said No
                    pending[r] = self.cue + tok(check_answer(False), add_special_tokens=False)["input_ids"]
        return scores, checks


class HTTPJudge(CompletionsClient):
    """An OpenAI-compatible /v1/completions endpoint (vLLM, llama.cpp server) as judge: one
    token, temperature 0, top log-probabilities. The prompt is rendered here (with `tokenizer`'s chat
    template when given) and sent raw, so that a server scores the same text a local judge would."""

    role, error = "judge server", JudgeError
    cache, earlier, cache_lock = None, frozenset(), threading.Lock()

    def __init__(self, base_url, model_name="", tokenizer=None, api_key=None, timeout=30.0, retries=4,
                 backoff=0.5, logprobs=5, workers=1):
        super().__init__(base_url, model_name, api_key, timeout, retries, backoff, workers)
        self.tokenizer, self.logprobs, self.template = tokenizer, logprobs, ONE_PASS_TEMPLATE

    def keep_replies(self, cache):
        """Store every reply in `cache` (a DiskCache) as it arrives and reuse the replies it held before this
        run, so that a rerun after a failure or a kill asks the server only for the steps not scored yet."""
        if cache is not self.cache:
            self.cache, self.earlier = cache, frozenset(cache.entries)

    def post(self, fields):
        """One reply, checked for the shape parse_reply reads, and kept (see keep_replies)."""
        key = cache_key("judge-reply", self.id, fields)
        if key in self.earlier:
            return self.cache[key]
        reply = super().post(fields)
        try:
            parse_reply(reply)
        except (ArithmeticError, AttributeError, IndexError, KeyError, TypeError, ValueError):
            raise JudgeError(f"judge server {self.url} sent a reply of unexpected shape: "
                             f"{json.dumps(reply)[:200]}") from None
        if self.cache is not None:
            with self.cache_lock:
                self.cache.put_many([(key, reply)])
        return reply

    def fields(self, prompt):
        return {"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": self.logprobs}

    def score(self, items):
        prompts = []
        for question, steps in items:
            head, texts, tail = judge_segments(self.tokenizer, question, steps)
            prompts += [head + "".join(texts[: k + 1]) + tail for k in range(len(steps))]
        replies = iter(self.post_all([self.fields(p) for p in prompts]))
        out = []
        for _, steps in items:
            raws = [next(replies) for _ in steps]
            out.append({"scores": [parse_reply(r) for r in raws], "raw": raws})
        return out


class HTTPCheckJudge(HTTPJudge):
    """The generative mode over an OpenAI-compatible server. Per step, one completion writes the check (at
    most `max_tokens` tokens, stopped at ANSWER_CUE), then one token with log-probabilities after the cue
    gives the score. A check cut by the token limit (finish_reason "length") leaves its step unscored (None).
    The steps of a solution are sequential (each check sees the earlier ones); `workers` solutions at once."""

    def __init__(self, base_url, model_name="", tokenizer=None, api_key=None, timeout=30.0, retries=4,
                 backoff=0.5, logprobs=5, workers=1, max_tokens=32, votes=1, temperature=0.7, seed=0):
        super().__init__(base_url, model_name, tokenizer, api_key, timeout, retries, backoff, logprobs, workers)
        self.max_tokens, self.votes, self.temperature, self.seed = max_tokens, votes, temperature, seed
        self.template = check_template(max_tokens, votes, temperature, seed)

    def score(self, items):
        results = self.map(self.check_solution, [(q, steps, v) for q, steps in items for v in range(self.votes)])
        return combine_votes(items, self.votes, [s for s, _ in results], [c for _, c in results])

    def check_solution(self, job):
        question, steps, vote = job
        text, scores, checks = check_head(self.tokenizer, question), [], []
        for step in steps:
            text += check_step(step)
            fields = {"prompt": text, "max_tokens": self.max_tokens, "temperature": 0, "stop": [ANSWER_CUE]}
            if self.votes > 1:
                fields |= {"temperature": self.temperature, "seed": int(cache_key(self.seed, question, vote)[:8], 16)}
            choice = self.post(fields)["choices"][0]
            checks.append(choice.get("text") or "")
            text += checks[-1] + ANSWER_CUE
            score = None if choice.get("finish_reason") == "length" else parse_reply(self.post(self.fields(text)))
            scores.append(score)
            text += check_answer(score is not None and score >= 0.5)
        return scores, checks


def parse_reply(reply):
    """Score from a completions reply: top log-probabilities when present (both the legacy
    `top_logprobs: [{token: logprob}]` and the newer `content: [{top_logprobs: [{token, logprob}]}]`
    shapes), else the reply text (Yes -> 1.0, No -> 0.0); None when it is neither."""
    choice = reply["choices"][0]
    logprobs = choice.get("logprobs") or {}
    candidates = {}
    if logprobs.get("top_logprobs"):
        candidates = logprobs["top_logprobs"][0] or {}
    elif logprobs.get("content"):
        candidates = {t["token"]: t["logprob"] for t in logprobs["content"][0].get("top_logprobs", [])}
    p_yes = sum(math.exp(lp) for t, lp in candidates.items() if t.strip().lower() == JUDGE_YES.lower())
    p_no = sum(math.exp(lp) for t, lp in candidates.items() if t.strip().lower() == JUDGE_NO.lower())
    if p_yes + p_no > 0:
        return p_yes / (p_yes + p_no)
    text = (choice.get("text") or (choice.get("message") or {}).get("content") or "").strip().lower()
    if text.startswith(JUDGE_YES.lower()):
        return 1.0
    if text.startswith(JUDGE_NO.lower()):
        return 0.0
    return None


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
        return OracleJudge(spec[len("oracle:"):], ONE_PASS_TEMPLATE)
    if spec.startswith(("http://", "https://")):
        tok = load_tokenizer(c["JUDGE_TOKENIZER"], c["TRUST_REMOTE_CODE"]) if c["JUDGE_TOKENIZER"] else None
        served = (spec, c["JUDGE_MODEL_NAME"], tok, os.environ.get(c["JUDGE_API_KEY_ENV"]), c["HTTP_TIMEOUT"],
                  c["HTTP_RETRIES"], 0.5, c["JUDGE_LOGPROBS"], c["HTTP_WORKERS"])
        return HTTPCheckJudge(*served, **generation) if checks else HTTPJudge(*served)
    model, tok = load_model(spec, c["DTYPE"], c["TRUST_REMOTE_CODE"], default_device())
    if checks:
        return LocalCheckJudge(model, tok, spec, c["BATCH_SIZE"], **generation)
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
    full_pairs, outcome_pairs = ([p for q, g, row in zip(questions, gold, solutions)
                                  if (p := full_pair(q, g, row, by_judge))] for by_judge in (True, False))

    out = cfg["OUT_DIR"]
    judged = [{"prompt": q, "completions": s["steps"], "labels": [x is not None and x >= cfg["THRESHOLD"]
                                                                  for x in s["scores"]],
               "step_scores": s["scores"], "final": s["final"], "answer": g, "correct": s["correct"],
               "raw": s["raw"]} | ({"checks": s["checks"]} if s["checks"] is not None else {})
              for q, g, row in zip(questions, gold, solutions) for s in row]
    unparseable = sum(x is None for s in flat for x in s["scores"])
    counts = {
        "problems": len(problems), "samples": len(flat), "correct_samples": sum(s["correct"] for s in flat),
        "steps_scored": sum(len(s["scores"]) for s in flat), "unparseable_judge_replies": unparseable,
        "step_pairs": len(step_pairs),
        "step_pairs_by_source": {src: sum(m["source"] == src for _, m in step_pairs)
                                 for src in ("other_sample", "rectified")},
        "rectification_attempts": attempts,
        "rectification_success_rate": rectified / attempts if attempts else None,
        "full_pairs": len(full_pairs), "outcome_pairs": len(outcome_pairs),
    }
    # what this run computed rather than found in the cache (differs between a resumed and a fresh run)
    run_log = {"computed": computed, "seconds": round(time.time() - t0, 1)}
    atomic_write_json(os.path.join(out, "config.json"), cfg | {"judge_id": judge.id, "command": command_line(__file__, argv)})
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
