"""The step judges: a transformers model (one forward pass per solution, or a check written per step, GenRM-CoT)
and a served model behind an OpenAI-compatible /v1/completions endpoint (vLLM, llama.cpp's server), each
scoring every step of (question, steps) items. reward_model.make_judge builds one from a spec.
"""
import hashlib
import itertools
import json
import math
import threading

from common import cache_key
from models import CompletionsClient, Rows, ServerError, _pick_tokens, fingerprint, logits_at
from prompts import (ANSWER_CUE, CHECK_CUE, CHECK_HEADER, CHECK_STEP, JUDGE_HEADER, JUDGE_NO, JUDGE_STEP, JUDGE_SUFFIX,
                     JUDGE_YES, answer_token_ids, check_answer, check_head, check_step, encode, judge_segments, left_pad,
                     pack_judge, packed_batch, step_prompt_ids)

ONE_PASS_TEMPLATE = hashlib.sha256(json.dumps([JUDGE_HEADER, JUDGE_STEP, JUDGE_SUFFIX, JUDGE_YES, JUDGE_NO])
                                   .encode()).hexdigest()[:12]


def check_template(max_tokens, votes, temperature, seed):
    """The cache's name for the generative judge's prompts and generation settings."""
    settings = [CHECK_HEADER, CHECK_STEP, CHECK_CUE, ANSWER_CUE, JUDGE_YES, JUDGE_NO, max_tokens, votes]
    return "check-" + cache_key(*settings, *([temperature, seed] if votes > 1 else ["shared prefixes"]))[:12]


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


def tree_batches(items, size):
    """Batches of item indices for checks shared along prefix trees: a question's items stay together, questions
    go in order of their longest solution and their length, and a batch takes questions while no level of
    their trees holds more than `size` nodes (a question with more goes alone)."""
    groups = {}
    for i, (q, _) in enumerate(items):
        groups.setdefault(q, []).append(i)
    batches, width = [[]], []
    for group in sorted(groups.values(), key=lambda g: (max(len(items[i][1]) for i in g), len(items[g[0]][0]))):
        depth = max(len(items[i][1]) for i in group)
        own = [len({tuple(items[i][1][:k + 1]) for i in group if len(items[i][1]) > k}) for k in range(depth)]
        merged = [a + b for a, b in itertools.zip_longest(width, own, fillvalue=0)]
        if batches[-1] and max(merged, default=0) > size:
            batches, merged = batches + [[]], own
        batches[-1], width = batches[-1] + group, merged
    return [b for b in batches if b]


class LocalCheckJudge(LocalJudge):
    """The generative mode of a transformers judge: it writes a check of each step (at most `max_tokens`
    tokens, ended by ANSWER_CUE or EOS), then P(Yes) / (P(Yes) + P(No)) is read after ANSWER_CUE. A check cut
    by the token limit leaves its step unscored (None). votes > 1 samples that many checks per solution at
    `temperature` (each from its own seeded generator) and averages their P(Yes) (GenRM's majority voting).

    With one greedy check, solutions of one question that begin with the same steps share the checks of those
    steps: the steps form a prefix tree, each node is checked once, and a row of the KV cache is copied where
    the tree branches (the samples of a question share 40% of their steps on the bundled task)."""

    def __init__(self, model, tokenizer, name, batch_size=64, max_tokens=32, votes=1, temperature=0.7, seed=0,
                 tree_nodes=None):
        super().__init__(model, tokenizer, name, True, batch_size)
        self.max_tokens, self.votes, self.temperature, self.seed = max_tokens, votes, temperature, seed
        self.tree_nodes = tree_nodes or batch_size   # the batch of shared checks: most tree nodes a level
        self.template = check_template(max_tokens, votes, temperature, seed)
        self.cue = tokenizer(ANSWER_CUE, add_special_tokens=False)["input_ids"]
        self.stop_below = None

    def stop_at_errors(self, threshold):
        """From now on stop checking a solution at its first step scored under `threshold`: the steps after it
        stay unscored (None) and without a check. One greedy check only; returns whether it applies."""
        if self.votes == 1:
            self.stop_below = threshold
            self.template = check_template(self.max_tokens, 1, self.temperature, self.seed) + f"-stop{threshold}"
        return self.votes == 1

    def score(self, items):
        """items: [(question, steps)] -> [{"scores": [score per step], "checks": [check text per step]}] (with
        votes > 1, "checks" holds one list of checks per vote)."""
        rows = [(i, v) for i in range(len(items)) for v in range(self.votes)]
        if self.votes == 1:   # a question's solutions in one batch, at most tree_nodes tree nodes a level
            batches = tree_batches(items, self.tree_nodes)
        else:
            order = sorted(range(len(rows)), key=lambda r: (len(items[rows[r][0]][1]), len(items[rows[r][0]][0])))
            batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        scores, checks = [None] * len(rows), [None] * len(rows)
        with self.torch.no_grad():
            for index in batches:
                batch = [(items[rows[r][0]], cache_key(self.seed, *items[rows[r][0]], rows[r][1])) for r in index]
                for r, (s, c) in zip(index, zip(*self.check_batch(batch))):
                    scores[r], checks[r] = s, c
        return combine_votes(items, self.votes, scores, checks)

    def check_batch(self, batch):
        """batch: [((question, steps), seed text)] -> (scores, checks) per entry, all checked together. With one
        greedy check, equal step prefixes of one question are checked once (see the class)."""
        torch, tok = self.torch, self.tokenizer
        steps = [s for (_, s), _ in batch]
        shared = self.votes == 1
        gens = [torch.Generator().manual_seed(int(key[:15], 16)) for _, key in batch] if not shared else None
        # the tree: node (level k) of entry e is its key among the level's distinct keys; row[e] its row in the cache
        roots = list(dict.fromkeys(q for (q, _), _ in batch)) if shared else list(range(len(batch)))
        root_row = {q: r for r, q in enumerate(roots)}
        row = [root_row[q] for (q, _), _ in batch] if shared else list(range(len(batch)))
        rows = Rows(self.model, len(roots), tok.pad_token_id)
        pending = [encode(tok, check_head(tok, q if shared else batch[q][0][0])) for q in roots]
        scores, checks = [[None] * len(s) for s in steps], [[None] * len(s) for s in steps]
        stopped = set()                                      # entries past a rejected step (stop_at_errors)
        for k in range(max(map(len, steps), default=0)):
            entries = [e for e in range(len(batch)) if k < len(steps[e]) and e not in stopped]
            if not entries:
                break
            if shared:            # one row per distinct (parent row, step): copy rows where the tree branches
                nodes = list(dict.fromkeys((row[e], steps[e][k]) for e in entries))
                at = {node: n for n, node in enumerate(nodes)}
                parents = [p for p, _ in nodes]
                if parents != list(range(rows.n_rows)):
                    rows.select(parents)
                    pending = [pending[p] for p in parents]
                for e in entries:
                    row[e] = at[(row[e], steps[e][k])]
                live = list(range(len(nodes)))
                text = [step for _, step in nodes]
            else:
                live = entries
                text = [steps[e][k] if k < len(steps[e]) else None for e in range(len(batch))]
            logits = rows.feed([pending[r] + tok(check_step(text[r]), add_special_tokens=False)["input_ids"]
                                if r in live else [] for r in range(rows.n_rows)])
            written, ended = {r: [] for r in live}, {}        # row -> "cue" | "eos" | "cut"
            for _ in range(self.max_tokens):
                writing = [r for r in live if r not in ended]
                if not writing:
                    break
                uniforms = None if shared else torch.stack([torch.rand((), generator=gens[r]) for r in writing])
                next_ids = _pick_tokens(logits[writing].float().cpu(), 0 if shared else self.temperature,
                                        1.0, uniforms).tolist()
                chunks = [[] for _ in range(rows.n_rows)]
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
            logits = rows.feed([self.cue if ended.get(r) == "eos" else [] for r in range(rows.n_rows)])
            got = {}
            for r in live:
                said = tok.decode(written[r], skip_special_tokens=True)
                score = self._scores(logits[r:r + 1])[0] if r in ended else None
                got[r] = (score, said[: said.rfind(ANSWER_CUE)] if ended.get(r) == "cue" else said)
                # a check cut by the token limit is unscored, and the judge's text goes on as if it had said No
                pending[r] = (self.cue if score is None else []) + tok(check_answer(score is not None and score >= 0.5),
                                                                      add_special_tokens=False)["input_ids"]
            for e in entries:
                scores[e][k], checks[e][k] = got[row[e]]
                if self.stop_below is not None and scores[e][k] is not None and scores[e][k] < self.stop_below:
                    stopped.add(e)
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
