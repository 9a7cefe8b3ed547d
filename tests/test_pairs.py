"""From step scores to pairs: aggregation, the first error, Step-DPO and whole-solution pairs, pair quality; pairs
from a policy that answers in \\boxed{}."""
import json
import os
import random

import pytest
import torch

import pairs
from common import DiskCache, atomic_write_jsonl
from conftest import COMMITTED, ROOT
from data_utils import answers_match, extract_answer, join_solution, load_problems, split_steps
from task import find_equations, replace_equation


def test_aggregate_and_first_error():
    s = [0.9, 0.5, 0.8]
    assert pairs.aggregate(s, "min") == 0.5 and pairs.aggregate(s, "prod") == pytest.approx(0.36)
    assert pairs.aggregate(s, "mean") == pytest.approx(2.2 / 3) and pairs.aggregate(s, "last") == 0.8
    assert pairs.aggregate([], "min") == 0.0
    with pytest.raises(ValueError):
        pairs.aggregate(s, "max")
    assert pairs.first_error(s, 0.6) == 1 and pairs.first_error(s, 0.5) == -1 and pairs.first_error([], 0.5) == -1


def sol(steps, scores, correct, final="1"):
    return {"steps": steps, "scores": scores, "correct": correct, "final": final}


def test_find_step_pairs_prefers_correct_continuations_when_not_required():
    a = sol(["s1", "bad"], [0.9, 0.1], False, "7")
    b = sol(["s1", "good-wrong-end"], [0.9, 0.95], False, "8")
    c = sol(["s1", "good", "s3"], [0.9, 0.7, 0.8], True, "5")
    d = sol(["other", "x"], [0.2, 0.9], False)
    f = sol(["s1", "good-wrong-end", "z"], [0.9, 0.95, 0.2], False)
    found_pairs, unmatched = pairs.find_step_pairs("Q", "5", [a, b, c, d, f, dict(a)], 0.5, reaches_answer=False,
                                          wrong_only=False, accepted=True)
    assert unmatched == [(["s1", "good-wrong-end"], f, 2)]  # no other sample continues that prefix
    assert len(found_pairs) == 2 and found_pairs[1][0]["rejected"] == "other\n" and found_pairs[1][0]["chosen"] == "s1\n"
    assert found_pairs[1][0]["initial_reason_steps"] == "" and found_pairs[1][0]["full_chosen"] == "s1\ngood\ns3\n#### 5"
    row, meta = found_pairs[0]
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
    found_pairs, unmatched = pairs.find_step_pairs("Q", "5", [a, b, c, e, g, h], 0.5)
    found = {(p[0]["initial_reason_steps"], p[0]["chosen"], p[0]["rejected"]) for p in found_pairs}
    # b's error is its step 2, which no other sample's prefix reaches: left for self-rectification
    assert found == {("s1\n", "good\n", "bad\n"), ("s1\ngood\n", "fine\n", "slip\n")}
    assert unmatched == [(["s1", "other"], b, 2)]
    assert all(m["chosen_correct"] for _, m in found_pairs)
    assert pairs.error_step(h, 0.5) == -1 and pairs.error_step(h, 0.5, wrong_only=False) == 1
    assert pairs.error_step(sol(["a"], [None], False), 0.5) == -1
    # without a right-answer continuation there is no chosen step
    assert pairs.chosen_continuation([b], ["s1"], a, 1, 0.5) is None
    assert pairs.chosen_continuation([b], ["s1"], a, 1, 0.5, reaches_answer=False) is b
    # a right-answer continuation the judge rejects is chosen unless the judge must accept it
    doubted = sol(["s1", "good", "z"], [0.9, 0.2, 0.8], True, "5")
    assert pairs.chosen_continuation([doubted], ["s1"], a, 1, 0.5) is doubted
    assert pairs.chosen_continuation([doubted], ["s1"], a, 1, 0.5, accepted=True) is None


def test_full_pair_needs_a_right_and_a_wrong_sample():
    right = sol(["a", "b"], [0.9, 0.8], True, "5")
    better = sol(["c"], [0.95], True, "5")
    wrong = sol(["d"], [0.3], False, "6")
    pair = pairs.full_pair("Q", "5", [right, better, wrong])
    assert pair["chosen_steps"] == ["c"] and pair["rejected_steps"] == ["d"]
    assert pair["chosen"] == "c\n#### 5" and pair["rejected_step_scores"] == [0.3]
    assert pairs.full_pair("Q", "5", [right, better]) is None


def test_pair_quality_counts_clean_pairs_slips_and_the_judges_chosen_auroc(tmp_path):
    problem = load_problems(os.path.join(ROOT, "data", "test.jsonl"))[0]
    step = split_steps(problem["answer"], strip_calc=True)[0][0]
    lhs, value = find_equations(step)[-1]
    slip = [replace_equation(step, lhs, value, lhs, value + d) for d in (1, 2)]
    steps, final = split_steps(problem["answer"], strip_calc=True)
    rows = [{"prompt": problem["question"], "initial_reason_steps": "", "chosen": c + "\n", "rejected": r + "\n",
             "full_chosen": join_solution([c] + steps[1:], final)} for c, r in ((step, slip[0]), (slip[0], slip[1]))]
    atomic_write_jsonl(str(tmp_path / "problems.jsonl"), [problem])
    atomic_write_jsonl(str(tmp_path / "step_pairs.jsonl"), rows)
    atomic_write_jsonl(str(tmp_path / "step_pairs_meta.jsonl"), [{"chosen_score": 0.9}, {"chosen_score": 0.2}])
    q = pairs.pair_quality(str(tmp_path / "step_pairs.jsonl"), str(tmp_path / "problems.jsonl"))
    # the second pair's continuation repeats the gold steps after its slipped first step: wrong as a whole
    assert q == {"pairs": 2, "clean": 1, "prefix_right": 2, "chosen_right": 1, "rejected_wrong": 2,
                 "chosen_continuation_right": 1, "chosen_wrong_arithmetic_slip": 1, "chosen_score_auroc": 1.0}


@pytest.fixture(scope="module")
def boxed_policy(tmp_path_factory):
    """The committed policy fine-tuned to end its solutions with '\\boxed{ x}' instead of '#### x', as
    instruct models do: '\\boxed{' becomes one new token that starts from the embedding of '####', and only
    the embeddings of it and of '}' learn, from the final line alone (its arithmetic stays as it was)."""
    import sft
    from models import load_model
    from prompts import encode, policy_prompt

    torch.manual_seed(0)
    model, tok = load_model(os.path.join(COMMITTED, "policy"))
    tok.add_tokens(["\\boxed{"])
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    new, close = len(tok) - 1, tok.convert_tokens_to_ids("}")
    model.requires_grad_(False)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[new] = emb[tok.convert_tokens_to_ids("####")]
    emb.requires_grad_(True)
    learns = torch.zeros(emb.shape[0], 1)
    learns[[new, close]] = 1.0
    emb.register_hook(lambda grad: grad * learns)
    examples = []
    for p in load_problems(os.path.join(ROOT, "data", "train.jsonl"))[:64]:
        steps, final = split_steps(p["answer"], strip_calc=True)
        prompt = encode(tok, policy_prompt(tok, p["question"], "boxed") + "\n".join(steps) + "\n")
        line = encode(tok, f"\\boxed{{ {final}}}") + [tok.eos_token_id]
        examples.append((prompt + line, [-100] * len(prompt) + line))
    batches = sft.length_grouped_batches(examples, 16, random.Random(0))

    def batch_loss(model, step):
        ids, mask, labels = sft.collate(next(batches), tok.pad_token_id)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    sft.train_lm(model, batch_loss, 150, 2e-2, 5, 0.0, "boxed SFT")
    folder = tmp_path_factory.mktemp("boxed") / "policy"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_boxed_policy_gets_pairs_and_the_same_grades_as_evaluation(boxed_policy, tmp_path):
    import reward_model as rm
    from prompts import answer_end

    rm.main([f"--POLICY={boxed_policy}", f"--JUDGE={os.path.join(COMMITTED, 'judge')}", "--N_PROBLEMS=12", "--K=4",
             "--CHUNK=12", "--RECTIFY_SAMPLES=2", "--MAX_NEW_TOKENS=120", "--ANSWER_STYLE=boxed",
             f"--OUT_DIR={tmp_path / 'out'}", f"--CACHE_DIR={tmp_path / 'cache'}"])
    judged = [json.loads(x) for x in (tmp_path / "out" / "judged.jsonl").read_text().splitlines()]
    texts = [t for row in list(DiskCache(str(tmp_path / "cache" / "samples.jsonl")).entries.values())[:12] for t in row]
    assert len(texts) == len(judged) == 48
    # every sample stopped at its boxed answer, and was graded as evaluate.py grades it
    assert sum(answer_end(t) == len(t) and t.endswith("}") and "\\boxed{" in t for t in texts) >= 30
    graded = [answers_match(extract_answer(t), r["answer"]) for t, r in zip(texts, judged)]
    assert graded == [r["correct"] for r in judged]
    assert 0 < sum(r["correct"] for r in judged) < 48 and all(r["final"] for r in judged if r["correct"])
    counts = json.loads((tmp_path / "out" / "counts.json").read_text())
    pairs = [json.loads(x) for x in (tmp_path / "out" / "step_pairs.jsonl").read_text().splitlines()]
    assert counts["step_pairs"] == len(pairs) > 0
    assert all("####" not in p["full_chosen"] and "\\boxed{" in p["full_chosen"] for p in pairs)
