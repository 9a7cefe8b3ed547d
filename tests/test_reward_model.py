"""The judges (local, served, oracle) and reward_model.py end to end: outputs, schema, caching, a kill while
sampling (kills while judging: test_faults.py)."""
import copy
import itertools
import json
import math
import random

import pytest
import torch

import judges
import reward_model as rm
import sft
from common import DiskCache, cache_key
from conftest import (JUDGE_RUN_ARGS, JUDGE_RUN_OUTPUTS, FakeServer, check_reply, free_port, kill_when, line_count,
                      prompt_score, run_script)
from data_utils import split_steps
from task import check_text, corrupt_solution, generate_task, label_steps
from prompts import ANSWER_CUE, answer_token_ids, check_answer, check_head, check_step, encode, judge_segments


def test_yes_probability():
    assert judges.yes_probability(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    assert judges.yes_probability(0.0, -2000.0) == 1.0 and judges.yes_probability(-2000.0, 0.0) == pytest.approx(0.0)


@pytest.mark.parametrize("reply, score", [
    ({"choices": [{"text": " Yes", "logprobs": {"top_logprobs": [{" Yes": math.log(0.6), "Yes": math.log(0.1),
                                                                 " No": math.log(0.1), " maybe": -1.0}]}}]}, 0.875),
    ({"choices": [{"text": "No", "logprobs": {"content": [{"token": "No", "logprob": -0.1, "top_logprobs": [
        {"token": "No", "logprob": math.log(0.8)}, {"token": "YES", "logprob": math.log(0.2)}]}]}}]}, 0.2),
    ({"choices": [{"text": " yes, it is"}]}, 1.0),
    ({"choices": [{"message": {"content": "No."}}]}, 0.0),
    ({"choices": [{"text": " Perhaps", "logprobs": {"top_logprobs": [{" Perhaps": -0.1}]}}]}, None),
])
def test_parse_reply(reply, score):
    got = judges.parse_reply(reply)
    assert got == score if score is None else got == pytest.approx(score)


@pytest.fixture(scope="module")
def local_judge(tiny_tokenizer, tiny_model):
    return judges.LocalJudge(tiny_model, tiny_tokenizer, "tiny", packed=True, batch_size=3)


ITEMS = [("Mia has 12 apples. She finds 3 more apples. How many apples does Mia have now?",
          ["After that, she has 12 + 3 = 15 apples."]),
         ("Ben has 40 coins. He gives away 7 coins. How many coins does Ben have now?",
          ["Then he has 40 - 7 = 33 coins left.", "So 33 * 1 = 33.", "Extra 1 + 1 = 2."]),
         ("Zoe?", []),
         ("Omar has 5 eggs.", ["He has 5 * 2 = 10 eggs.", "He has 10 - 1 = 9 eggs."])]


def test_packed_equals_per_step_and_batched_equals_single(local_judge):
    packed = [r["scores"] for r in local_judge.score(ITEMS)]
    single = [local_judge.score([it])[0]["scores"] for it in ITEMS]
    local_judge.packed = False
    try:
        per_step = [r["scores"] for r in local_judge.score(ITEMS)]
    finally:
        local_judge.packed = True
    assert [len(s) for s in packed] == [1, 3, 0, 2]
    for a, b, c in zip(packed, single, per_step):
        assert a == pytest.approx(b, abs=1e-5) and a == pytest.approx(c, abs=1e-5)
    assert all(0.0 < x < 1.0 for s in packed for x in s)


def test_local_score_matches_next_token_probabilities(local_judge, tiny_model, tiny_tokenizer):
    q, steps = ITEMS[3]
    head, texts, tail = judge_segments(tiny_tokenizer, q, steps)
    ids = tiny_tokenizer(head + texts[0], add_special_tokens=False)["input_ids"] + \
        tiny_tokenizer(tail, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        probs = tiny_model(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)
    p_yes, p_no = probs[local_judge.yes].sum(), probs[local_judge.no].sum()
    assert local_judge.score([(q, steps[:1])])[0]["scores"][0] == pytest.approx(float(p_yes / (p_yes + p_no)), abs=1e-6)


@pytest.fixture(scope="module")
def check_judge(tiny_tokenizer):
    """A tiny judge trained in the test, on sft.py's examples, to write checks in the generative judge's
    format (its checks need not be right: what is tested is how they are written and read)."""
    tok = sft.with_answer_tokens(copy.deepcopy(tiny_tokenizer), "check")
    torch.manual_seed(0)
    model = sft.make_model(tok, 32, 2, 2, 64, seed=0)
    rng, examples = random.Random(0), []
    for p in generate_task(40, 1, seed=3)[0]:
        gold, final = split_steps(p["answer"], strip_calc=True)
        steps = corrupt_solution(gold, final, rng, p["question"])[0] if rng.random() < 0.5 else gold
        examples.append(sft.check_example(tok, p["question"], steps, label_steps(p["answer"], steps),
                                          [check_text(gold, k, s) for k, s in enumerate(steps)]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(200):
        ids, mask, labels = sft.collate(rng.sample(examples, 8), tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


def plain_checks(model, tok, question, steps, max_tokens):
    """The generative judge's scores and checks for one solution, decoded token by token with a whole forward
    per token (no cache, no batch): what LocalCheckJudge must reproduce."""
    ids, cue, scores, checks = encode(tok, check_head(tok, question)), tok(ANSWER_CUE)["input_ids"], [], []
    yes, no = answer_token_ids(tok, "Yes"), answer_token_ids(tok, "No")
    with torch.no_grad():
        for step in steps:
            ids += tok(check_step(step))["input_ids"]
            written, ended = [], None
            for _ in range(max_tokens):
                t = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                if t == tok.eos_token_id:
                    ids, ended = ids + cue, "eos"
                    break
                ids, written = ids + [t], written + [t]
                if tok.decode(written[-len(cue) - 2:]).rstrip().endswith(ANSWER_CUE):
                    ended = "cue"
                    break
            text = tok.decode(written, skip_special_tokens=True)
            checks.append(text[: text.rfind(ANSWER_CUE)] if ended == "cue" else text)
            if ended is None:
                scores.append(None)
                ids += cue + tok(check_answer(False))["input_ids"]
                continue
            logp = model(input_ids=torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)
            scores.append(float(1 / (1 + (logp[no].logsumexp(-1) - logp[yes].logsumexp(-1)).exp())))
            ids += tok(check_answer(scores[-1] >= 0.5))["input_ids"]
    return scores, checks


def test_check_judge_writes_checks_as_a_plain_decode_would_batched_or_alone(check_judge):
    model, tok = check_judge
    judge = judges.LocalCheckJudge(model, tok, "tiny-check", batch_size=3, max_tokens=32)
    batched = judge.score(ITEMS)
    for (question, steps), got in zip(ITEMS, batched):
        scores, checks = plain_checks(model, tok, question, steps, 32)
        assert got["checks"] == checks and got["scores"] == pytest.approx(scores, abs=1e-5)
        assert judge.score([(question, steps)])[0]["checks"] == checks
    written = [s for r in batched for s in r["scores"]]
    assert len(written) == 6 and sum(s is not None for s in written) >= 4   # the trained judge reaches its cue
    assert all(c.startswith(" ") and ANSWER_CUE not in c for r in batched for c in r["checks"])
    cut = judges.LocalCheckJudge(model, tok, "tiny-check", max_tokens=2).score(ITEMS[1:2])[0]
    assert cut["scores"] == [None] * 3 and all(len(tok(c)["input_ids"]) <= 2 for c in cut["checks"])


@pytest.mark.parametrize("batch_size, own_forward", [(2, False), (64, False), (64, True)])
def test_check_judge_checks_shared_prefixes_once_with_the_scores_of_a_plain_decode(check_judge, monkeypatch, batch_size,
                                                                                  own_forward):
    model, tok = check_judge
    if own_forward:   # the decoder of models that LlamaDecoder does not take: copying rows of its cache
        import decoding
        monkeypatch.setattr(decoding.LlamaDecoder, "supports", staticmethod(lambda model: False))
    (q1, (a, b, c)), (q2, (d, e)) = ITEMS[1], ITEMS[3]
    items = [(q1, [a, b, c]), (q1, [a, b, e]), (q1, [a, d]), (q2, [a, b]), (q1, [a, b, c]), (q1, [])]
    assert judges.tree_batches(items, batch_size) == ([[3], [0, 1, 2, 4, 5]] if batch_size == 2 else [[3, 0, 1, 2, 4, 5]])
    written = []
    monkeypatch.setattr(judges, "check_step", lambda step: written.append(step) or check_step(step))
    got = judges.LocalCheckJudge(model, tok, "tiny-check", batch_size=batch_size, max_tokens=32).score(items)
    assert len(written) == 7          # q1: a, ab, abc, abe, ad; q2: a, ab -- each distinct prefix checked once
    for (question, steps), result in zip(items, got):
        scores, checks = plain_checks(model, tok, question, steps, 32)
        assert result["checks"] == checks and result["scores"] == pytest.approx(scores, abs=1e-5)


@pytest.mark.parametrize("threshold", [0.5, 1.01])
def test_check_judge_stops_at_the_first_rejected_step_when_asked(check_judge, threshold):
    model, tok = check_judge
    (q1, (a, b, c)), (q2, (d, e)) = ITEMS[1], ITEMS[3]
    items = [(q1, [a, b, c]), (q1, [a, d]), (q2, [d, e, a]), (q2, [e, d])]
    judge = judges.LocalCheckJudge(model, tok, "tiny-check", max_tokens=32)
    plain_template = judge.template
    assert judge.stop_at_errors(threshold) and judge.template != plain_template   # its own cache entries
    stopped = 0
    for (question, steps), got in zip(items, judge.score(items)):
        scores, checks = plain_checks(model, tok, question, steps, 32)
        n = next((k + 1 for k, x in enumerate(scores) if x is not None and x < threshold), len(steps))
        stopped += n < len(steps)
        assert got["checks"] == checks[:n] + [None] * (len(steps) - n)
        assert got["scores"][:n] == pytest.approx(scores[:n], abs=1e-5) and got["scores"][n:] == [None] * (len(steps) - n)
    assert stopped >= (4 if threshold > 1 else 0)    # above 1 every scored step is rejected
    assert not judges.LocalCheckJudge(model, tok, "tiny-check", votes=2).stop_at_errors(0.5)   # sampled checks: all


def test_check_votes_average_sampled_checks_whatever_the_batch(check_judge):
    model, tok = check_judge
    votes = [judges.LocalCheckJudge(model, tok, "tiny-check", batch_size=b, max_tokens=32, votes=3, temperature=1.0,
                                seed=4).score(ITEMS) for b in (2, 12)]
    for a, b in zip(*votes):                        # the same checks; scores to float rounding
        assert a["checks"] == b["checks"] and a["scores"] == pytest.approx(b["scores"], abs=1e-6)
    judge = judges.LocalCheckJudge(model, tok, "tiny-check", max_tokens=32, votes=3, temperature=1.0, seed=4)
    for item, got in zip(ITEMS, votes[0]):
        rows = [judge.check_batch([(item, cache_key(4, *item, v))]) for v in range(3)]
        assert got["checks"] == [checks[0] for _, checks in rows]
        for k in range(len(item[1])):
            scored = [scores[0][k] for scores, _ in rows if scores[0][k] is not None]
            assert got["scores"][k] == (pytest.approx(sum(scored) / len(scored), abs=1e-5) if scored else None)
    one = judges.LocalCheckJudge(model, tok, "tiny-check", max_tokens=32, votes=1).score(ITEMS)
    assert any(v["checks"][0] != o["checks"] for v, o in zip(votes[0], one))   # sampled, not greedy


def test_http_judge_scores_each_step_with_retries():
    with FakeServer(score=lambda prompt: 0.9) as server:
        server.plan = ["http429", "http503", "garbage"]
        judge = judges.HTTPJudge(server.url, "m", api_key="sk-test", timeout=5, retries=3, backoff=0.01)
        out = judge.score([("Q?", ["a", "b"])])
    assert out[0]["scores"] == pytest.approx([0.9, 0.9]) and len(out[0]["raw"]) == 2
    assert len(server.seen) == 5
    path, body, auth, _ = server.seen[-1]
    assert path == "/v1/completions" and auth == "Bearer sk-test"
    assert body == {"model": "m", "prompt": "Check the last step.\nQuestion: Q?\nSteps:\na\nb\nIs the last step "
                    "correct? Answer:", "max_tokens": 1, "temperature": 0, "logprobs": 5}


def test_http_check_judge_writes_each_check_then_reads_the_answer_after_it():
    with FakeServer() as server:
        judge = judges.HTTPCheckJudge(server.url, "m", timeout=5, retries=0, max_tokens=20)
        out = judge.score([("Q?", ["a", "b"])])
    bodies = [body for _, body, _, _ in server.seen]
    assert len(bodies) == 4                      # per step: the check, then one token after the answer cue
    text, checks, scores = check_head(None, "Q?"), [], []
    for k, step in enumerate(["a", "b"]):
        text += check_step(step)
        assert bodies[2 * k] == {"model": "m", "prompt": text, "max_tokens": 20, "temperature": 0,
                                 "stop": [ANSWER_CUE]}
        checks.append(json.loads(check_reply(text))["choices"][0]["text"])
        text += checks[-1] + ANSWER_CUE
        assert bodies[2 * k + 1] == {"model": "m", "prompt": text, "max_tokens": 1, "temperature": 0, "logprobs": 5}
        scores.append(prompt_score(text))
        text += check_answer(scores[-1] >= 0.5)
    assert out == [{"scores": pytest.approx(scores), "checks": checks}]
    assert judge.template.startswith("check-") and judge.template != judges.ONE_PASS_TEMPLATE


def test_reward_model_with_served_policy_and_judge(tmp_path):
    with FakeServer(score=lambda prompt: 0.9) as server:
        check_served_run(server, tmp_path)


def check_served_run(server, tmp_path):
    args = [f"--POLICY={server.url}", "--POLICY_MODEL_NAME=pol", f"--JUDGE={server.url}", "--JUDGE_MODEL_NAME=jud",
            "--N_PROBLEMS=3", "--K=3", "--CHUNK=2", "--HTTP_WORKERS=2", "--JUDGE_LOGPROBS=20",
            "--REJECTED_FROM_WRONG=False", "--JUDGE_MODE=one_pass",  # the fake judge accepts every step: no
            # pairs, no rectification
            f"--OUT_DIR={tmp_path}/out", f"--CACHE_DIR={tmp_path}/cache"]
    rm.main(args)
    judged = [json.loads(x) for x in (tmp_path / "out" / "judged.jsonl").read_text().splitlines()]
    assert len(judged) == 9 and all(len(r["completions"]) == 2 and r["step_scores"] == pytest.approx([0.9, 0.9])
                                    for r in judged)
    policy_bodies = [b for _, b, _, _ in server.seen if b["max_tokens"] > 1]
    judge_bodies = [b for _, b, _, _ in server.seen if b["max_tokens"] == 1]
    assert len(policy_bodies) == 9 and {b["model"] for b in policy_bodies} == {"pol"}
    distinct = {(r["prompt"], tuple(r["completions"])) for r in judged}   # a repeated sample is scored once
    assert len(distinct) < 9 and len(judge_bodies) == 2 * len(distinct)
    assert {(b["model"], b["logprobs"]) for b in judge_bodies} == {("jud", 20)}
    assert policy_bodies[0]["prompt"].startswith("Question: ")  # no POLICY_TOKENIZER: the plain template
    before = (tmp_path / "out" / "judged.jsonl").read_bytes()
    server.seen.clear()
    rm.main(args)  # everything comes from the cache now
    assert server.seen == [] and (tmp_path / "out" / "judged.jsonl").read_bytes() == before


def test_oracle_judge_scores_are_the_reference_labels(tmp_path):
    problem = {"question": "Tom has 3 apples and buys 4 more. He eats 2. How many are left?",
               "answer": "He has 3 + 4 = 7 apples.\nAfter eating he has 7 - 2 = 5.\n#### 5"}
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps(problem) + "\n")
    judge = rm.make_judge(f"oracle:{path}")
    good = split_steps(problem["answer"])[0]
    bad = [good[0], "After eating he has 7 - 2 = 4."]
    out = judge.score([(problem["question"], good), (problem["question"], bad)])
    assert [o["scores"] for o in out] == [[1.0, 1.0], [1.0, 0.0]]
    assert out[1]["scores"] == [float(x) for x in label_steps(problem["answer"], bad)]
    with pytest.raises(KeyError, match="not in its problems file"):
        judge.score([("another question", good)])


def run(folder, extra=(), wait=True):
    """reward_model.py on JUDGE_RUN_ARGS into folder/out and folder/cache: the printed summary, or the Popen
    (wait=False)."""
    args = [*JUDGE_RUN_ARGS, f"--OUT_DIR={folder}/out", f"--CACHE_DIR={folder}/cache", *extra]
    proc = run_script("reward_model.py", args, wait=wait)
    return json.loads(proc.stdout.strip().splitlines()[-1]) if wait else proc


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fresh")
    return folder, run(folder)


def test_outputs_and_counts(fresh):
    folder, printed = fresh
    out = folder / "out"
    judged = [json.loads(x) for x in (out / "judged.jsonl").read_text().splitlines()]
    assert len(judged) == 12 * 4
    for row in judged:
        assert set(row) >= {"prompt", "completions", "labels", "step_scores"}
        assert len(row["completions"]) == len(row["labels"]) == len(row["step_scores"])
        assert all(0.0 <= s <= 1.0 for s in row["step_scores"])
        assert row["labels"] == [s >= 0.5 for s in row["step_scores"]]
    counts = json.loads((out / "counts.json").read_text())
    assert counts["samples"] == 48 and counts["correct_samples"] == sum(r["correct"] for r in judged)
    assert counts["step_pairs"] == sum(counts["step_pairs_by_source"].values())
    distinct = len({(r["prompt"], tuple(r["completions"])) for r in judged})   # a repeated sample is scored once
    assert printed["computed"]["samples"] == 12 and printed["computed"]["scored"] == distinct
    config = json.loads((out / "config.json").read_text())
    assert "reward_model.py" in config["command"] and config["K"] == 4


def test_step_pairs_have_the_step_dpo_schema(fresh):
    import datasets

    folder, _ = fresh
    path = folder / "out" / "step_pairs.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    if not rows:
        pytest.skip("no pairs in this tiny run")
    features = datasets.Features({k: datasets.Value("string") for k in (
        "prompt", "initial_reason_steps", "chosen", "rejected", "full_chosen", "full_rejected", "answer")})
    ds = datasets.load_dataset("json", data_files=str(path), features=features, split="train")
    assert len(ds) == len(rows)
    for row in rows:
        assert row["chosen"].endswith("\n") and row["rejected"].endswith("\n")
        assert "<|endoftext|>" not in row["chosen"] + row["rejected"] + row["full_chosen"]
        assert row["chosen"] != row["rejected"] and row["chosen"].count("\n") == 1


def test_second_run_scores_nothing_and_writes_the_same_bytes(fresh):
    folder, _ = fresh
    before = {name: (folder / "out" / name).read_bytes() for name in JUDGE_RUN_OUTPUTS}
    printed = run(folder)
    assert printed["computed"] == {"samples": 0, "scored": 0, "rectify_samples": 0, "rectify_scored": 0}
    assert {name: (folder / "out" / name).read_bytes() for name in JUDGE_RUN_OUTPUTS} == before


def test_sigkill_while_sampling_then_resume_gives_identical_outputs(fresh, tmp_path):
    folder, _ = fresh
    samples = tmp_path / "cache" / "samples.jsonl"
    kill_when(run(tmp_path, wait=False), lambda: line_count(samples) >= 1)
    done = line_count(samples)
    assert 1 <= done < 12
    printed = run(tmp_path)
    assert printed["computed"]["samples"] == 12 - done // 3 * 3
    for name in JUDGE_RUN_OUTPUTS:
        assert (tmp_path / "out" / name).read_bytes() == (folder / "out" / name).read_bytes(), name


# ----------------------------------------------------------------------------- a served judge that misbehaves
# (rows of docs/faults.md)


TRANSIENT = ["http429", "http500", "http503", "garbage", "no-choices", "sleep0.6", "drop"]


@pytest.mark.parametrize("fault", TRANSIENT)
def test_http_judge_retries_a_transient_fault(fault):
    with FakeServer() as server:
        server.plan = [fault, fault]
        out = judges.HTTPJudge(server.url, "m", timeout=0.3, retries=2, backoff=0.01).score([("Q?", ["a"])])
    prompt = server.seen[-1][1]["prompt"]
    assert len(server.seen) == 3 and out[0]["scores"] == [pytest.approx(prompt_score(prompt))]


@pytest.mark.parametrize("fault, message", [
    ("refused", "URLError: .*Connection refused"), ("http429", "HTTP 429"), ("http500", "HTTP 500"),
    ("http503", "HTTP 503"), ("garbage", "malformed JSON"), ("no-choices", "reply has no choices"),
    ("sleep0.6", "timed out"), ("drop", "Remote end closed connection without response")],
    ids=["refused", "http429", "http500", "http503", "garbage", "no-choices", "timeout", "drop"])
def test_http_judge_gives_up_after_bounded_retries(fault, message):
    with FakeServer(default=fault) as server:
        url = f"http://127.0.0.1:{free_port()}" if fault == "refused" else server.url
        judge = judges.HTTPJudge(url, "m", timeout=0.3, retries=2, backoff=0.01)
        with pytest.raises(judges.JudgeError, match=rf"^judge server {url}/v1/completions failed after 3 tries: "
                                                 rf".*{message}"):
            judge.score([("Q?", ["a"])])
    assert len(server.seen) == (0 if fault == "refused" else 3)


def test_http_judge_does_not_retry_a_refused_request():
    with FakeServer(default="http400") as server, pytest.raises(judges.JudgeError, match="refused the request: HTTP 400"):
        judges.HTTPJudge(server.url, "m", timeout=5, retries=3, backoff=0.01).score([("Q?", ["a"])])
    assert len(server.seen) == 1


def test_http_judge_backs_off_exponentially():
    with FakeServer() as server:
        server.plan = ["http429", "http503", "http500"]
        judges.HTTPJudge(server.url, "m", timeout=5, retries=3, backoff=0.1).score([("Q?", ["a"])])
    times = [t for *_, t in server.seen]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 3 and all(gap >= 0.1 * 2 ** i for i, gap in enumerate(gaps)), gaps


@pytest.mark.parametrize("action, score", [("text-yes", 1.0), ("text-no", 0.0), ("perhaps", None)])
def test_http_judge_reads_text_without_logprobs_and_never_guesses(action, score):
    with FakeServer(default=action) as server:
        out = judges.HTTPJudge(server.url, "m", timeout=5, retries=0).score([("Q?", ["a", "b"])])
    assert out[0]["scores"] == [score, score] and len(server.seen) == 2


def test_http_judge_reply_of_the_wrong_shape_is_an_error_and_not_cached(tmp_path):
    cache = DiskCache(str(tmp_path / "scores.jsonl"))
    with FakeServer(default="wrong-shape") as server:
        judge = judges.HTTPJudge(server.url, "m", timeout=5, retries=3, backoff=0.01)
        judge.keep_replies(cache)
        with pytest.raises(judges.JudgeError, match=r"sent a reply of unexpected shape: .*\"high\""):
            judge.score([("Q?", ["a"])])
    assert len(server.seen) == 1 and cache.entries == {}
