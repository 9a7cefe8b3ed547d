import hashlib
import http.server
import json
import math
import threading

import pytest
import torch

import evaluate
import reward_model as rm
from common import judge_segments
from conftest import completions_reply, reply_with_json


def test_aggregate_and_first_error():
    s = [0.9, 0.5, 0.8]
    assert rm.aggregate(s, "min") == 0.5 and rm.aggregate(s, "prod") == pytest.approx(0.36)
    assert rm.aggregate(s, "mean") == pytest.approx(2.2 / 3) and rm.aggregate(s, "last") == 0.8
    assert rm.aggregate([], "min") == 0.0
    with pytest.raises(ValueError):
        rm.aggregate(s, "max")
    assert rm.first_error(s, 0.6) == 1 and rm.first_error(s, 0.5) == -1 and rm.first_error([], 0.5) == -1


def test_yes_probability():
    assert rm.yes_probability(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    assert rm.yes_probability(0.0, -2000.0) == 1.0 and rm.yes_probability(-2000.0, 0.0) == pytest.approx(0.0)


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
    got = rm.parse_reply(reply)
    assert got == score if score is None else got == pytest.approx(score)


@pytest.fixture(scope="module")
def local_judge(tiny_tokenizer, tiny_model):
    return rm.LocalJudge(tiny_model, tiny_tokenizer, "tiny", packed=True, batch_size=3)


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


def test_disk_cache_survives_a_cut_line(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = rm.DiskCache(str(path))
    cache.put_many([("a", [0.5]), ("b", [0.25, 1.0])])
    with open(path, "a") as f:
        f.write('{"key": "c", "value": [0.')  # a kill mid-write
    again = rm.DiskCache(str(path))
    assert again.entries == {"a": [0.5], "b": [0.25, 1.0]} and "c" not in again
    again.put_many([("a", [0.50001]), ("c", [0.75])])  # a key seen before keeps its first value
    assert rm.DiskCache(str(path)).entries == {"a": [0.5], "b": [0.25, 1.0], "c": [0.75]}


def test_chunked_cache_computes_only_missing_chunks(tmp_path):
    cache = rm.DiskCache(str(tmp_path / "c.jsonl"))
    calls = []

    def compute(idx):
        calls.append(idx)
        return [i * 10 for i in idx]

    keys = [f"k{i}" for i in range(7)]
    cache.put_many([("k3", 30), ("k4", 40), ("k5", 40 + 10)])  # the whole chunk 3..5 is done
    values, computed = rm.chunked_cached(cache, keys, compute, 3, "t")
    assert values == [0, 10, 20, 30, 40, 50, 60] and computed == 4 and calls == [[0, 1, 2], [6]]
    assert rm.chunked_cached(rm.DiskCache(str(tmp_path / "c.jsonl")), keys, compute, 3, "t") == (values, 0)


def sol(steps, scores, correct, final="1"):
    return {"steps": steps, "scores": scores, "correct": correct, "final": final}


def test_find_step_pairs_prefers_correct_continuations_when_not_required():
    a = sol(["s1", "bad"], [0.9, 0.1], False, "7")
    b = sol(["s1", "good-wrong-end"], [0.9, 0.95], False, "8")
    c = sol(["s1", "good", "s3"], [0.9, 0.7, 0.8], True, "5")
    d = sol(["other", "x"], [0.2, 0.9], False)
    f = sol(["s1", "good-wrong-end", "z"], [0.9, 0.95, 0.2], False)
    pairs, unmatched = rm.find_step_pairs("Q", "5", [a, b, c, d, f, dict(a)], 0.5, reaches_answer=False,
                                          wrong_only=False, accepted=True)
    assert unmatched == [(["s1", "good-wrong-end"], f, 2)]  # no other sample continues that prefix
    assert len(pairs) == 2 and pairs[1][0]["rejected"] == "other\n" and pairs[1][0]["chosen"] == "s1\n"
    assert pairs[1][0]["initial_reason_steps"] == "" and pairs[1][0]["full_chosen"] == "s1\ngood\ns3\n#### 5"
    row, meta = pairs[0]
    assert row == {"prompt": "Q", "initial_reason_steps": "s1\n", "chosen": "good\n", "rejected": "bad\n",
                   "full_chosen": "good\ns3\n#### 5", "full_rejected": "bad\n#### 7", "answer": "5"}
    assert meta == {"source": "other_sample", "chosen_score": 0.7, "rejected_score": 0.1, "chosen_correct": True,
                    "step_index": 1}


def test_default_step_pairs_reject_wrong_answers_and_choose_right_ones():
    # a: wrong answer, the judge flags step 1; b continues the same prefix but ends wrong; c ends right
    a = sol(["s1", "bad", "x"], [0.9, 0.1, 0.8], False, "7")
    b = sol(["s1", "other", "y"], [0.9, 0.95, 0.3], False, "8")
    c = sol(["s1", "good", "z"], [0.9, 0.7, 0.8], True, "5")
    # e: wrong answer, every step accepted: the lowest-scored step (index 2) is the error
    e = sol(["s1", "good", "slip"], [0.9, 0.8, 0.6], False, "9")
    g = sol(["s1", "good", "fine"], [0.9, 0.8, 0.95], True, "5")
    # h: right answer with a judged error: never rejected by default
    h = sol(["s1", "bad"], [0.9, 0.2], True, "5")
    pairs, unmatched = rm.find_step_pairs("Q", "5", [a, b, c, e, g, h], 0.5)
    found = {(p[0]["initial_reason_steps"], p[0]["chosen"], p[0]["rejected"]) for p in pairs}
    # b's error is its step 2, which no other sample's prefix reaches: left for self-rectification
    assert found == {("s1\n", "good\n", "bad\n"), ("s1\ngood\n", "fine\n", "slip\n")}
    assert unmatched == [(["s1", "other"], b, 2)]
    assert all(m["chosen_correct"] for _, m in pairs)
    assert rm.error_step(h, 0.5) == -1 and rm.error_step(h, 0.5, wrong_only=False) == 1
    assert rm.error_step(sol(["a"], [None], False), 0.5) == -1
    # without a right-answer continuation there is no chosen step
    assert rm.chosen_continuation([b], ["s1"], a, 1, 0.5) is None
    assert rm.chosen_continuation([b], ["s1"], a, 1, 0.5, reaches_answer=False) is b
    # a right-answer continuation the judge rejects is chosen unless the judge must accept it
    doubted = sol(["s1", "good", "z"], [0.9, 0.2, 0.8], True, "5")
    assert rm.chosen_continuation([doubted], ["s1"], a, 1, 0.5) is doubted
    assert rm.chosen_continuation([doubted], ["s1"], a, 1, 0.5, accepted=True) is None


def test_full_pair_needs_a_right_and_a_wrong_sample():
    right = sol(["a", "b"], [0.9, 0.8], True, "5")
    better = sol(["c"], [0.95], True, "5")
    wrong = sol(["d"], [0.3], False, "6")
    pair = rm.full_pair("Q", "5", [right, better, wrong])
    assert pair["chosen_steps"] == ["c"] and pair["rejected_steps"] == ["d"]
    assert pair["chosen"] == "c\n#### 5" and pair["rejected_step_scores"] == [0.3]
    assert rm.full_pair("Q", "5", [right, better]) is None


def policy_reply(prompt, seed):
    """A completions reply with a two-step solution drawn from (prompt, seed), then text past the answer."""
    x = int(hashlib.sha256(f"{prompt}|{seed}".encode()).hexdigest()[:4], 16) % 3
    text = f"She has 2 + {x} = {2 + x} apples.\nSo {2 + x} * 1 = {2 + x}.\n#### {2 + x}\nQuestion: more"
    return json.dumps({"choices": [{"text": text, "index": 0, "finish_reason": "length"}]}).encode()


class FakeCompletions(http.server.BaseHTTPRequestHandler):
    """A small OpenAI-style completions server: answers with logprobs, after failing as told."""
    plan = []
    seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeCompletions.seen.append((self.path, body, self.headers.get("Authorization")))
        action = FakeCompletions.plan.pop(0) if FakeCompletions.plan else "ok"
        if action.startswith("http"):
            self.send_response(int(action[4:]))
            self.end_headers()
            return
        if action == "garbage":
            reply_with_json(self, b"{broken")
        elif body.get("max_tokens", 1) > 1:  # a policy request: a solution that depends on prompt and seed
            reply_with_json(self, policy_reply(body["prompt"], body["seed"]))
        else:
            reply_with_json(self, completions_reply(0.9))

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeCompletions)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    FakeCompletions.plan, FakeCompletions.seen = [], []
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_http_judge_scores_each_step_with_retries(server):
    FakeCompletions.plan = ["http429", "http503", "garbage"]
    judge = rm.HTTPJudge(server, "m", api_key="sk-test", timeout=5, retries=3, backoff=0.01)
    out = judge.score([("Q?", ["a", "b"])])
    assert out[0]["scores"] == pytest.approx([0.9, 0.9]) and len(out[0]["raw"]) == 2
    assert len(FakeCompletions.seen) == 5
    path, body, auth = FakeCompletions.seen[-1]
    assert path == "/v1/completions" and auth == "Bearer sk-test"
    assert body == {"model": "m", "prompt": "Check the last step.\nQuestion: Q?\nSteps:\na\nb\nIs the last step "
                    "correct? Answer:", "max_tokens": 1, "temperature": 0, "logprobs": 5}


def test_http_policy_samples_with_seeds_retries_and_order(server):
    FakeCompletions.plan = ["http503"]
    policy = rm.HTTPPolicy(server + "/v1/", "pol", timeout=5, retries=2, backoff=0.01, workers=3)
    out = policy.sample(["P1", "P2"], n=3, temperature=0.7, top_p=0.9, max_new_tokens=50, seeds=[10, 11])
    assert [len(row) for row in out] == [3, 3]
    for prompt, seed, row in zip(["P1", "P2"], [10, 11], out):
        for j, text in enumerate(row):
            reply = json.loads(policy_reply(prompt, seed * 1_000_003 + j))
            assert text == reply["choices"][0]["text"].split("\nQuestion")[0]  # cut after the '####' line
    bodies = [body for path, body, _ in FakeCompletions.seen]
    assert len(bodies) == 7 and all(path == "/v1/completions" for path, _, _ in FakeCompletions.seen)
    assert {b["seed"] for b in bodies} == {s * 1_000_003 + j for s in (10, 11) for j in range(3)}  # one retried
    assert {(b["model"], b["temperature"], b["top_p"], b["max_tokens"], b["n"]) for b in bodies} == {
        ("pol", 0.7, 0.9, 50, 1)}
    again = rm.HTTPPolicy(server, "pol", timeout=5, retries=0).sample(["P1", "P2"], 3, 0.7, 0.9, 50, [10, 11])
    assert again == out  # one worker or three, the same samples in the same order
    FakeCompletions.plan = ["http404"]
    with pytest.raises(rm.PolicyError, match="policy server .* refused the request: HTTP 404"):
        policy.sample(["P1"], 1, 0.7, 1.0, 50, [0])


def test_reward_model_with_served_policy_and_judge(server, tmp_path):
    args = [f"--POLICY={server}", "--POLICY_MODEL_NAME=pol", f"--JUDGE={server}", "--JUDGE_MODEL_NAME=jud",
            "--N_PROBLEMS=3", "--K=3", "--CHUNK=2", "--HTTP_WORKERS=2", "--JUDGE_LOGPROBS=20",
            "--REJECTED_FROM_WRONG=False",  # the fake judge accepts every step: no pairs, no rectification
            f"--OUT_DIR={tmp_path}/out", f"--CACHE_DIR={tmp_path}/cache"]
    rm.main(args)
    judged = [json.loads(x) for x in (tmp_path / "out" / "judged.jsonl").read_text().splitlines()]
    assert len(judged) == 9 and all(len(r["completions"]) == 2 and r["step_scores"] == pytest.approx([0.9, 0.9])
                                    for r in judged)
    policy_bodies = [b for _, b, _ in FakeCompletions.seen if b["max_tokens"] > 1]
    judge_bodies = [b for _, b, _ in FakeCompletions.seen if b["max_tokens"] == 1]
    assert len(policy_bodies) == 9 and {b["model"] for b in policy_bodies} == {"pol"}
    assert len(judge_bodies) == 18 and {(b["model"], b["logprobs"]) for b in judge_bodies} == {("jud", 20)}
    assert policy_bodies[0]["prompt"].startswith("Question: ")  # no POLICY_TOKENIZER: the plain template
    before = (tmp_path / "out" / "judged.jsonl").read_bytes()
    FakeCompletions.seen = []
    rm.main(args)  # everything comes from the cache now
    assert FakeCompletions.seen == [] and (tmp_path / "out" / "judged.jsonl").read_bytes() == before


def test_spearman_by_hand():
    assert evaluate.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert evaluate.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks with ties: a -> [1, 2.5, 2.5, 4], b -> [1, 2, 3, 4]; Pearson of the ranks = 4.5 / sqrt(4.5 * 5)
    assert evaluate.spearman([0.1, 0.5, 0.5, 0.9], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert evaluate.spearman([1, 1, 1], [1, 2, 3]) is None and evaluate.spearman([1], [2]) is None
    with pytest.raises(ValueError):
        evaluate.spearman([1, 2], [1])


def test_auroc_by_hand():
    assert evaluate.auroc([0.9, 0.8, 0.3, 0.1], [True, True, False, False]) == 1.0
    assert evaluate.auroc([0.1, 0.9], [True, False]) == 0.0
    # pairs (pos, neg): (0.5, 0.5) tie = 0.5, (0.5, 0.2) = 1, (0.9, 0.5) = 1, (0.9, 0.2) = 1 -> 3.5 / 4
    assert evaluate.auroc([0.5, 0.9, 0.5, 0.2], [True, True, False, False]) == pytest.approx(0.875)
    assert evaluate.auroc([0.5], [True]) is None


def test_processbench_f1_by_hand():
    m = evaluate.processbench_f1(predicted=[1, 2, -1, -1, 0], reference=[1, 0, -1, 2, -1])
    assert m["acc_erroneous"] == pytest.approx(1 / 3) and m["acc_correct"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


def test_first_error_auroc_splits_first_errors_by_kind():
    ok, slip, wrong_qty, later = "She has 3 + 4 = 7 apples.", "She has 3 + 4 = 8 apples.", "She has 3 + 5 = 8 apples.", "x"
    solutions = [([ok, slip, later], [True, False, False], [0.9, 0.3, 0.1]),  # slip below every right step
                 ([wrong_qty], [False], [0.95]),                             # other error above every right step
                 ([ok, ok], [True, True], [0.8, 0.7])]
    m = evaluate.first_error_auroc(solutions)
    # only the first error of a solution counts: the later wrong step (0.1) is in neither group
    assert m == {"arithmetic_slip": 1.0, "other": 0.0, "n_right_steps": 3, "n_arithmetic_slip": 1, "n_other": 1}


def test_judge_pick():
    assert evaluate.judge_pick([[0.9, 0.2], [0.5, 0.6], [0.6, 0.5]], "min") == 1
    assert evaluate.judge_pick([[0.9, 0.2], [0.5, 0.6], [0.6, 0.5]], "last") == 1
    assert evaluate.judge_pick([[0.9, 0.2], [0.5, 0.6], [0.6, 0.5]], "prod") == 1
    assert evaluate.judge_pick([[], [0.0]], "min") == 0


def test_oracle_judge_scores_are_the_reference_labels(tmp_path):
    from data_utils import label_steps, split_steps

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
    with pytest.raises(rm.JudgeError, match="not in its problems file"):
        judge.score([("another question", good)])

