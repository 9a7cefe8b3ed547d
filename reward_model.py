"""The LLM step judge, and step-level preference pairs built from the policy's own judged samples.

    python reward_model.py                                  # sample, judge, build pairs -> OUT_DIR
    python reward_model.py --JUDGE=http://127.0.0.1:8080 --JUDGE_MODEL_NAME=smollm2   # a served judge

Steps (each resumable: samples and scores are cached on disk, in fixed chunks, so a killed run continues
where it stopped and ends with the same bytes as an uninterrupted one):
1. sample K solutions per training problem from the policy (problems FIRST_PROBLEM.. skip the gold SFT set);
2. score every step with the judge: P(Yes) / (P(Yes) + P(No)) after the judge prompt (GenRM, Zhang et al.
   2024, arXiv 2408.15240), all steps of a solution in one forward pass (common.pack_judge);
3. Step-DPO pairs (Lai et al. 2024, arXiv 2406.18629): in a sample with a wrong final answer, the judge
   locates the error (the first step scored under THRESHOLD, or its lowest-scored step when it accepts
   them all) and that step is rejected; the chosen step follows the same prefix and comes from a
   continuation that reaches the correct final answer (CHOSEN_ACCEPTED: also judged right), taken from
   another sample or, failing that, from RECTIFY_SAMPLES continuations sampled from the prefix
   (self-rectification);
4. full-solution pairs with their step scores, for the `weighted` and `outcome` training modes.

Writes OUT_DIR/judged.jsonl (TRL stepwise-supervision shape with float `step_scores`), step_pairs.jsonl
(the Math-Step-DPO-10K shape), full_pairs.jsonl, counts.json and config.json.
"""
import hashlib
import json
import math
import os
import sys
import threading
import time
import urllib.error
import urllib.request

from common import (JUDGE_HEADER, JUDGE_NO, JUDGE_STEP, JUDGE_SUFFIX, JUDGE_YES, answer_token_ids,
                    atomic_write_json, atomic_write_jsonl, command_line, config_from_argv, default_device,
                    judge_segments, load_model, load_tokenizer, logits_at, pack_judge, packed_batch,
                    policy_prompt, print_json, sample, truncate_solution)
from data_utils import answers_match, join_solution, label_steps, load_problems, split_steps

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
TRAIN_FILE = "data/train.jsonl"
FIRST_PROBLEM = 4000              # skip the problems the policy was supervised on (sft.SFT_GOLD_SIZE)
N_PROBLEMS = 1000
K = 8                             # samples per problem
TEMPERATURE = 0.7
TOP_P = 1.0
MAX_NEW_TOKENS = 200
THRESHOLD = 0.5                   # a step scored below this is judged wrong
RECTIFY_SAMPLES = 4               # continuations sampled from a prefix when no other sample has a chosen step
CHOSEN_REACHES_ANSWER = True      # a chosen step's continuation must reach the correct final answer (Step-DPO's
                                  # filter); False only prefers such continuations
CHOSEN_ACCEPTED = False           # also require the judge to accept the chosen step (score >= THRESHOLD)
REJECTED_FROM_WRONG = True        # rejected steps come only from samples with a wrong final answer; False also
                                  # takes the first judged error of samples whose answer is right
PACKED = True                     # score all steps of a solution in one forward pass
CHUNK = 64                        # problems per sampling chunk and solutions per scoring chunk (cache unit)
BATCH_SIZE = 64
OUT_DIR = "results/reference/judged"
CACHE_DIR = "cache"
SEED = 0
THREADS = 2
DTYPE = "float32"
TRUST_REMOTE_CODE = False
CONFIG_KEYS = [k for k in list(globals()) if k.isupper()]

TEMPLATE_ID = hashlib.sha256(json.dumps([JUDGE_HEADER, JUDGE_STEP, JUDGE_SUFFIX, JUDGE_YES, JUDGE_NO])
                             .encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- aggregation


def aggregate(scores, how):
    """Solution score from step scores: min and prod (Lightman et al. 2023, arXiv 2305.20050), mean, last.
    Unscored steps (None: the judge's reply was neither Yes nor No) are left out; no scores give 0."""
    scores = [s for s in scores if s is not None]
    if not scores:
        return 0.0
    if how == "min":
        return min(scores)
    if how == "prod":
        return math.prod(scores)
    if how == "mean":
        return sum(scores) / len(scores)
    if how == "last":
        return scores[-1]
    raise ValueError(f"unknown aggregation {how!r}; use min, prod, mean or last")


def first_error(scores, threshold):
    """Index of the first step scored under `threshold` (ProcessBench's label convention), -1 if none.
    An unscored step (None) is not an error."""
    return next((k for k, s in enumerate(scores) if s is not None and s < threshold), -1)


# ----------------------------------------------------------------------------- judges


class ServerError(RuntimeError):
    """An OpenAI-compatible server could not answer after bounded retries, or refused the request."""


class JudgeError(ServerError):
    """The judge could not score a step after bounded retries."""


class PolicyError(ServerError):
    """A served policy could not sample after bounded retries."""


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
        self.id = f"{name}@{fingerprint(name)}"
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
                    batch = [ids for _, ids in rows[start:start + self.batch_size]]
                    width = max(map(len, batch))
                    ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
                    mask = torch.zeros((len(batch), width), dtype=torch.long)
                    for r, x in enumerate(batch):
                        ids[r, width - len(x):], mask[r, width - len(x):] = torch.tensor(x), 1
                    pos = (mask.cumsum(-1) - 1).clamp(min=0)
                    ids, pos, mask = ids.to(self.model.device), pos.to(self.model.device), mask.to(self.model.device)
                    logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                        logits_to_keep=1).logits[:, -1]
                    flat += self._scores(logits)
                out = [[] for _ in packs]
                for (i, _), s in zip(rows, flat):
                    out[i].append(s)
        return [{"scores": s, "raw": None} for s in out]


def step_prompt_ids(pack, k):
    """Token ids of the separate prompt for step k, cut from a pack: the shared chain up to step k and
    tail k (the same tokens the packed pass uses)."""
    ids, _, groups, answer_index = pack
    return [t for i, (t, g) in enumerate(zip(ids, groups)) if i <= answer_index[k] and g in (0, k + 1)]


def completions_url(base_url):
    """The /v1/completions address of a server given by its base URL (with or without /v1)."""
    base = base_url.rstrip("/")
    return base + ("/completions" if base.endswith("/v1") else "/v1/completions")


class CompletionsClient:
    """POSTs to an OpenAI-compatible /v1/completions endpoint with bounded retries and exponential backoff
    (connection errors, timeouts, 429, 5xx and malformed replies are retried; other 4xx are not).
    `workers` requests run at once (a server such as vLLM batches them); results keep their order."""

    role, error = "server", ServerError

    def __init__(self, base_url, model_name="", api_key=None, timeout=30.0, retries=4, backoff=0.5, workers=1):
        self.url = completions_url(base_url)
        self.model_name, self.api_key = model_name, api_key
        self.timeout, self.retries, self.backoff, self.workers = timeout, retries, backoff, max(1, workers)

    def post(self, fields):
        """The parsed JSON reply to {"model": model_name, **fields}."""
        body = json.dumps({"model": self.model_name, **fields}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    reply = json.loads(resp.read().decode("utf-8"))
                if not isinstance(reply, dict) or not reply.get("choices"):
                    last = "reply has no choices"
                    continue
                return reply
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code != 429 and e.code < 500:
                    raise self.error(f"{self.role} {self.url} refused the request: {last}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                last = f"malformed JSON ({e})"
        raise self.error(f"{self.role} {self.url} failed after {self.retries + 1} tries: {last}")

    def post_all(self, requests):
        """Replies to a list of request bodies, in order."""
        if self.workers == 1 or len(requests) < 2:
            return [self.post(r) for r in requests]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.post, requests))


class HTTPJudge(CompletionsClient):
    """An OpenAI-compatible /v1/completions endpoint (vLLM, llama.cpp server, hosted APIs) as judge: one
    token, temperature 0, top log-probabilities. The prompt is rendered here (with `tokenizer`'s chat
    template when given) and sent raw, so that a server scores the same text a local judge would."""

    role, error = "judge server", JudgeError
    cache, earlier, cache_lock = None, frozenset(), threading.Lock()

    def __init__(self, base_url, model_name="", tokenizer=None, api_key=None, timeout=30.0, retries=4,
                 backoff=0.5, logprobs=5, workers=1):
        super().__init__(base_url, model_name, api_key, timeout, retries, backoff, workers)
        self.tokenizer, self.logprobs = tokenizer, logprobs
        self.id = f"{base_url}#{model_name}"

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


class HTTPPolicy(CompletionsClient):
    """A policy served behind an OpenAI-compatible /v1/completions endpoint (vLLM, llama.cpp server): one
    request per sample with its own seed (seeds[i] * 1_000_003 + j, as the local sampler), so a rerun
    draws the same samples on a server that honours per-request seeds. Prompts arrive rendered (with the
    policy tokenizer's chat template when it has one) and are sent raw."""

    role, error = "policy server", PolicyError

    def __init__(self, base_url, model_name="", api_key=None, timeout=120.0, retries=4, backoff=0.5, workers=1):
        super().__init__(base_url, model_name, api_key, timeout, retries, backoff, workers)
        self.id = f"{base_url}#{model_name}"

    def sample(self, prompts, n, temperature, top_p, max_new_tokens, seeds):
        """n completions per prompt (lists of strings, cut after the final-answer line)."""
        requests = [{"prompt": p, "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                     "n": 1, "seed": s * 1_000_003 + j} for p, s in zip(prompts, seeds) for j in range(n)]
        texts = [truncate_solution(r["choices"][0].get("text") or "") for r in self.post_all(requests)]
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


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


def fingerprint(path):
    """A short id of a local model's weights (size and the ends of each weight file), so that a cache
    never serves scores of a different checkpoint saved under the same name. Hub ids map to themselves."""
    files = []
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    elif os.path.isfile(path):
        files = [path]
    h = hashlib.sha256()
    for f in files:
        size = os.path.getsize(f)
        h.update(f"{os.path.basename(f)}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read())
    return h.hexdigest()[:16]


class OracleJudge:
    """Not an LLM: the bundled task's programmatic reference labels (data_utils.label_steps) as step scores
    (1.0 right, 0.0 wrong), looked up by question in a problems file. The ceiling a judge can reach; used by
    the experiments as a control (spec "oracle:data/train.jsonl")."""

    def __init__(self, problems_file):
        self.answers = {p["question"]: p["answer"] for p in load_problems(problems_file)}
        self.id = f"oracle:{problems_file}@{fingerprint(problems_file)}"

    def score(self, items):
        out = []
        for question, steps in items:
            if question not in self.answers:
                raise JudgeError(f"oracle judge: question not in its problems file: {question[:80]!r}")
            out.append({"scores": [float(ok) for ok in label_steps(self.answers[question], steps)], "raw": None})
        return out


def make_judge(spec, model_name="", tokenizer="", api_key_env="OPENAI_API_KEY", timeout=30.0, retries=4,
               packed=True, batch_size=64, dtype="float32", trust_remote_code=False, logprobs=5, workers=1):
    """A judge from a spec: an http(s):// base URL (served model), a local folder / Hub id / .gguf file, or
    oracle:PROBLEMS_FILE (the programmatic reference labels, a control for experiments)."""
    if spec.startswith("oracle:"):
        return OracleJudge(spec[len("oracle:"):])
    if spec.startswith(("http://", "https://")):
        tok = load_tokenizer(tokenizer, trust_remote_code) if tokenizer else None
        return HTTPJudge(spec, model_name, tok, os.environ.get(api_key_env), timeout, retries, logprobs=logprobs,
                         workers=workers)
    model, tok = load_model(spec, dtype, trust_remote_code, default_device())
    return LocalJudge(model, tok, spec, packed, batch_size)


# ----------------------------------------------------------------------------- cache


class DiskCache:
    """Append-only JSONL of {key: value} entries. A line cut short by a kill is ignored on load; every
    write is flushed and fsynced before the run moves on, so finished work is never redone."""

    def __init__(self, path):
        self.path, self.entries = path, {}
        if os.path.exists(path):
            with open(path, "rb+") as f:  # drop a line cut short by a kill, so appends start on a new line
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(entry, dict) and "key" in entry:
                        self.entries[entry["key"]] = entry["value"]

    def __contains__(self, key):
        return key in self.entries

    def __getitem__(self, key):
        return self.entries[key]

    def put_many(self, items):
        """Store new entries. A key already present keeps its first value: the same solution scored again
        in another batch differs in the last float bits, and a run must read back what it used."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for key, value in items:
                if key in self.entries:
                    continue
                f.write(json.dumps({"key": key, "value": value}) + "\n")
                self.entries[key] = value
            f.flush()
            os.fsync(f.fileno())


def cache_key(*parts):
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


def chunked_cached(cache, keys, compute, chunk, desc):
    """Values for `keys`, computing missing ones with compute(indices) -> values in fixed chunks of the
    full key list. Chunks are the same on every run, so a resumed run batches exactly as a fresh one and
    produces bit-identical numbers. Returns (values, number computed)."""
    from tqdm import tqdm

    todo = [start for start in range(0, len(keys), chunk)
            if any(k not in cache for k in keys[start:start + chunk])]
    computed = 0
    for start in tqdm(todo, desc=desc, disable=not todo):
        idx = list(range(start, min(start + chunk, len(keys))))
        values = compute(idx)
        cache.put_many([(keys[i], v) for i, v in zip(idx, values)])
        computed += len(idx)
    return [cache[k] for k in keys], computed


def score_solutions(judge, cache, items, chunk):
    """Judge every step of every (question, steps) item, through the cache. Returns (results, n scored)."""
    keys = [cache_key(judge.id, TEMPLATE_ID, q, steps) for q, steps in items]
    if isinstance(judge, HTTPJudge):
        judge.keep_replies(cache)
    return chunked_cached(cache, keys, lambda idx: judge.score([items[i] for i in idx]), chunk, "judging")


def make_policy(cfg):
    """(policy, tokenizer, policy id) from POLICY: a served model (http(s):// base URL; the tokenizer, for
    the chat template, is POLICY_TOKENIZER or None) or a local folder / Hub id / .gguf file."""
    spec = cfg["POLICY"]
    if spec.startswith(("http://", "https://")):
        tokenizer = None
        if cfg["POLICY_TOKENIZER"]:
            tokenizer = load_tokenizer(cfg["POLICY_TOKENIZER"], cfg["TRUST_REMOTE_CODE"])
        policy = HTTPPolicy(spec, cfg["POLICY_MODEL_NAME"], os.environ.get(cfg["JUDGE_API_KEY_ENV"]),
                            cfg["HTTP_TIMEOUT"], cfg["HTTP_RETRIES"], workers=cfg["HTTP_WORKERS"])
        return policy, tokenizer, policy.id
    policy, tokenizer = load_model(spec, cfg["DTYPE"], cfg["TRUST_REMOTE_CODE"], default_device())
    return policy, tokenizer, f"{spec}@{fingerprint(spec)}"


def sample_solutions(policy, tokenizer, policy_id, cache, prompts, seeds, n, cfg, desc="sampling"):
    """n sampled completions per prompt, through the cache."""
    settings = [n, cfg["TEMPERATURE"], cfg["TOP_P"], cfg["MAX_NEW_TOKENS"]]
    keys = [cache_key(policy_id, p, s, *settings) for p, s in zip(prompts, seeds)]

    def compute(idx):
        if isinstance(policy, HTTPPolicy):
            return policy.sample([prompts[i] for i in idx], n, cfg["TEMPERATURE"], cfg["TOP_P"],
                                 cfg["MAX_NEW_TOKENS"], [seeds[i] for i in idx])
        return sample(policy, tokenizer, [prompts[i] for i in idx], n=n, temperature=cfg["TEMPERATURE"],
                      top_p=cfg["TOP_P"], max_new_tokens=cfg["MAX_NEW_TOKENS"], batch_size=cfg["BATCH_SIZE"],
                      seeds=[seeds[i] for i in idx], progress=False)

    return chunked_cached(cache, keys, compute, cfg["CHUNK"], desc)


# ----------------------------------------------------------------------------- pairs


def step_text(steps):
    """Steps as the policy writes them: one per line, each ending in a newline and never in EOS."""
    return "".join(s + "\n" for s in steps)


def error_step(sol, threshold, wrong_only=True):
    """The step a Step-DPO pair rejects in `sol`, or -1 for none. wrong_only: only a sample whose final
    answer is wrong has one: its first step scored under `threshold`, or, when the judge accepts every step,
    the lowest-scored one (a wrong answer means some step is wrong). Otherwise any sample's first judged
    error. A step the judge left unscored (None) is never picked."""
    if wrong_only and sol["correct"]:
        return -1
    e = first_error(sol["scores"], threshold)
    if e >= 0 or not wrong_only:
        return e
    scored = [k for k, s in enumerate(sol["scores"]) if s is not None]
    return min(scored, key=lambda k: sol["scores"][k]) if scored else -1


def find_step_pairs(question, gold, solutions, threshold, reaches_answer=True, wrong_only=True, accepted=False):
    """Step-DPO pairs among one problem's judged samples.

    solutions: [{"steps", "scores", "correct"}]. For each sample with an error step e (error_step), the
    chosen step is step e of another sample with the same first e steps (chosen_continuation). Returns
    (pairs, unmatched) where unmatched lists (prefix, rejected solution, e) needing self-rectification."""
    pairs, unmatched, seen = [], [], set()
    for bad in solutions:
        e = error_step(bad, threshold, wrong_only)
        if e < 0 or None in bad["scores"][: e + 1]:
            continue
        prefix = bad["steps"][:e]
        if (tuple(prefix), bad["steps"][e]) in seen:
            continue
        seen.add((tuple(prefix), bad["steps"][e]))
        good = chosen_continuation(solutions, prefix, bad, e, threshold, reaches_answer, accepted)
        if good:
            pairs.append(make_step_pair(question, gold, prefix, good, bad, e, "other_sample"))
        else:
            unmatched.append((prefix, bad, e))
    return pairs, unmatched


def chosen_continuation(candidates, prefix, bad, e, threshold, reaches_answer=True, accepted=False):
    """The candidate whose step e follows `prefix` and differs from `bad`'s step e; if `reaches_answer`, it
    must end in the correct final answer (as Step-DPO's chosen continuations do), and if `accepted`, the judge
    must accept its step e. Preferred: the correct final answer, then the higher min score of the steps from
    e on. None when there is none."""
    options = [s for s in candidates if len(s["steps"]) > e and s["steps"][:e] == prefix
               and s["steps"][e] != bad["steps"][e] and s["scores"][e] is not None
               and (s["scores"][e] >= threshold or not accepted) and (s["correct"] or not reaches_answer)]
    return max(options, key=lambda s: (s["correct"], aggregate(s["scores"][e:], "min"))) if options else None


def make_step_pair(question, gold, prefix, good, bad, e, source):
    row = {"prompt": question, "initial_reason_steps": step_text(prefix),
           "chosen": step_text([good["steps"][e]]), "rejected": step_text([bad["steps"][e]]),
           "full_chosen": join_solution(good["steps"][e:], good["final"]),
           "full_rejected": join_solution(bad["steps"][e:], bad["final"]), "answer": gold}
    meta = {"source": source, "chosen_score": good["scores"][e], "rejected_score": bad["scores"][e],
            "chosen_correct": good["correct"], "step_index": e}
    return row, meta


def full_pair(question, gold, solutions):
    """A whole-solution pair for `weighted`/`outcome` DPO: the best correct sample (by min step score)
    against the worst incorrect one; None when the samples are all right or all wrong."""
    scored = [s for s in solutions if s["steps"] and None not in s["scores"]]
    right = [s for s in scored if s["correct"]]
    wrong = [s for s in scored if not s["correct"]]
    if not right or not wrong:
        return None
    good = max(right, key=lambda s: aggregate(s["scores"], "min"))
    bad = min(wrong, key=lambda s: aggregate(s["scores"], "min"))
    return {"prompt": question, "chosen": join_solution(good["steps"], good["final"]),
            "rejected": join_solution(bad["steps"], bad["final"]), "chosen_steps": good["steps"],
            "rejected_steps": bad["steps"], "chosen_step_scores": good["scores"],
            "rejected_step_scores": bad["scores"], "answer": gold}


def parse_solution(text, gold, scores=None):
    steps, final = split_steps(text)
    return {"text": text, "steps": steps, "final": final if final is not None else "",
            "correct": answers_match(final, gold), "scores": scores}


def main(argv):
    import torch

    cfg = config_from_argv({k: globals()[k] for k in CONFIG_KEYS}, argv)
    torch.set_num_threads(cfg["THREADS"])
    t0 = time.time()
    problems = load_problems(cfg["TRAIN_FILE"])[cfg["FIRST_PROBLEM"]: cfg["FIRST_PROBLEM"] + cfg["N_PROBLEMS"]]
    if not problems:
        raise SystemExit(f"no problems in {cfg['TRAIN_FILE']} from index {cfg['FIRST_PROBLEM']}")
    policy, tokenizer, policy_id = make_policy(cfg)
    judge = make_judge(cfg["JUDGE"], cfg["JUDGE_MODEL_NAME"], cfg["JUDGE_TOKENIZER"], cfg["JUDGE_API_KEY_ENV"],
                       cfg["HTTP_TIMEOUT"], cfg["HTTP_RETRIES"], cfg["PACKED"], cfg["BATCH_SIZE"], cfg["DTYPE"],
                       cfg["TRUST_REMOTE_CODE"], cfg["JUDGE_LOGPROBS"], cfg["HTTP_WORKERS"])
    samples_cache = DiskCache(os.path.join(cfg["CACHE_DIR"], "samples.jsonl"))
    scores_cache = DiskCache(os.path.join(cfg["CACHE_DIR"], "scores.jsonl"))
    gold = [split_steps(p["answer"])[1] for p in problems]
    questions = [p["question"] for p in problems]
    prompts = [policy_prompt(tokenizer, q) for q in questions]
    seeds = [cfg["SEED"] * 1_000_000 + cfg["FIRST_PROBLEM"] + i for i in range(len(problems))]

    # 1-2. sample and judge
    texts, n_sampled = sample_solutions(policy, tokenizer, policy_id, samples_cache, prompts, seeds, cfg["K"], cfg)
    solutions = [[parse_solution(t, g) for t in row] for row, g in zip(texts, gold)]
    items = [(q, s["steps"]) for q, row in zip(questions, solutions) for s in row]
    results, n_scored = score_solutions(judge, scores_cache, items, cfg["CHUNK"])
    flat = [s for row in solutions for s in row]
    for s, r in zip(flat, results):
        s["scores"], s["raw"] = r["scores"], r["raw"]

    # 3. step pairs, then self-rectification for the rejected steps no other sample answers
    step_pairs, unmatched = [], []
    for i, (q, g, row) in enumerate(zip(questions, gold, solutions)):
        found, missing = find_step_pairs(q, g, row, cfg["THRESHOLD"], cfg["CHOSEN_REACHES_ANSWER"],
                                         cfg["REJECTED_FROM_WRONG"], cfg["CHOSEN_ACCEPTED"])
        step_pairs += found
        unmatched += [(i, *m) for m in missing]
    r_prompts = [prompts[i] + step_text(prefix) for i, prefix, _, _ in unmatched]
    r_seeds = [seeds[i] * 1000 + 7 * e + 1 for i, _, _, e in unmatched]
    r_texts, n_rect_sampled = sample_solutions(policy, tokenizer, policy_id, samples_cache, r_prompts, r_seeds,
                                               cfg["RECTIFY_SAMPLES"], cfg, desc="rectifying")
    r_solutions = [[parse_solution(step_text(prefix) + t, gold[i]) for t in row]
                   for (i, prefix, _, _), row in zip(unmatched, r_texts)]
    r_items = [(questions[i], s["steps"]) for (i, _, _, _), row in zip(unmatched, r_solutions) for s in row]
    r_results, n_rect_scored = score_solutions(judge, scores_cache, r_items, cfg["CHUNK"])
    for s, r in zip([s for row in r_solutions for s in row], r_results):
        s["scores"], s["raw"] = r["scores"], r["raw"]
    rectified = 0
    for (i, prefix, bad, e), row in zip(unmatched, r_solutions):
        good = chosen_continuation(row, prefix, bad, e, cfg["THRESHOLD"], cfg["CHOSEN_REACHES_ANSWER"],
                                   cfg["CHOSEN_ACCEPTED"])
        if good:
            step_pairs.append(make_step_pair(questions[i], gold[i], prefix, good, bad, e, "rectified"))
            rectified += 1

    # 4. full-solution pairs
    full_pairs = [p for p in (full_pair(q, g, row) for q, g, row in zip(questions, gold, solutions)) if p]

    out = cfg["OUT_DIR"]
    judged = [{"prompt": q, "completions": s["steps"], "labels": [x is not None and x >= cfg["THRESHOLD"]
                                                                  for x in s["scores"]],
               "step_scores": s["scores"], "final": s["final"], "answer": g, "correct": s["correct"],
               "raw": s["raw"]} for q, g, row in zip(questions, gold, solutions) for s in row]
    unparseable = sum(x is None for s in flat for x in s["scores"])
    counts = {
        "problems": len(problems), "samples": len(flat), "correct_samples": sum(s["correct"] for s in flat),
        "steps_scored": sum(len(s["scores"]) for s in flat), "unparseable_judge_replies": unparseable,
        "step_pairs": len(step_pairs),
        "step_pairs_by_source": {src: sum(m["source"] == src for _, m in step_pairs)
                                 for src in ("other_sample", "rectified")},
        "rectification_attempts": len(unmatched),
        "rectification_success_rate": rectified / len(unmatched) if unmatched else None,
        "full_pairs": len(full_pairs),
    }
    # what this run computed rather than found in the cache (differs between a resumed and a fresh run)
    run_log = {"computed": {"samples": n_sampled, "scored": n_scored, "rectify_samples": n_rect_sampled,
                            "rectify_scored": n_rect_scored}, "seconds": round(time.time() - t0, 1)}
    atomic_write_json(os.path.join(out, "config.json"), cfg | {"judge_id": judge.id, "command": command_line(__file__, argv)})
    atomic_write_jsonl(os.path.join(out, "judged.jsonl"), judged)
    atomic_write_jsonl(os.path.join(out, "step_pairs.jsonl"), [row for row, _ in step_pairs])
    atomic_write_jsonl(os.path.join(out, "step_pairs_meta.jsonl"), [meta for _, meta in step_pairs])
    atomic_write_jsonl(os.path.join(out, "full_pairs.jsonl"), full_pairs)
    atomic_write_json(os.path.join(out, "counts.json"), counts)
    atomic_write_json(os.path.join(out, "run_log.json"), run_log)
    print_json(counts | run_log)


if __name__ == "__main__":
    main(sys.argv[1:])
