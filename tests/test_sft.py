"""sft.py: the tokenizer, the training examples, a tiny build end to end, and the committed models."""
import json
import os
import random

import pytest
import torch

import sft
from conftest import COMMITTED, ROOT
from data_utils import PAIRS_POOL, POLICY_GOLD, load_problems, split_steps
from task import arithmetic_slip, corrupt_solution, equation_text, generate_task
from common import atomic_write_jsonl
from prompts import encode, judge_answer_text


def test_tokenizer_spells_numbers_digit_by_digit(tiny_tokenizer):
    pieces = tiny_tokenizer.tokenize("Mia has 1234 apples and 56.")
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert len(digit_pieces) == 6 and all(sum(c.isdigit() for c in p) == 1 for p in digit_pieces)
    assert tiny_tokenizer.decode(encode(tiny_tokenizer, "Mia has 1234 apples.\n#### 5")) == "Mia has 1234 apples.\n#### 5"
    assert len(encode(tiny_tokenizer, judge_answer_text(tiny_tokenizer, True))) == 1
    assert len(encode(tiny_tokenizer, judge_answer_text(tiny_tokenizer, False))) == 1


def test_policy_example_masks_the_prompt(tiny_tokenizer):
    ids, labels = sft.policy_example(tiny_tokenizer, "Q?", ["a = 1"], "1")
    n_prompt = len(encode(tiny_tokenizer, "Question: Q?\nAnswer:\n"))
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tiny_tokenizer.eos_token_id


def test_judge_example_targets(tiny_tokenizer):
    (ids, pos, groups, answer_index), targets = sft.judge_example(tiny_tokenizer, "Q?", ["a", "b", "c"],
                                                                  [True, False, False])
    yes, no = encode(tiny_tokenizer, " Yes")[0], encode(tiny_tokenizer, " No")[0]
    assert targets == [yes, no, no] and len(answer_index) == 3 and groups[answer_index[2]] == 3


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """sft.main end to end on 60 problems with tiny shapes and a few steps."""
    folder = tmp_path_factory.mktemp("build")
    train, _ = generate_task(60, 1, seed=11)
    atomic_write_jsonl(folder / "train.jsonl", train)
    args = [f"--TRAIN_FILE={folder / 'train.jsonl'}", f"--MODELS_DIR={folder / 'models'}", "--VOCAB_SIZE=400",
            "--SFT_GOLD_SIZE=20", "--POLICY_STEPS=12", "--POLICY_BATCH=4", "--JUDGE_STEPS=12", "--JUDGE_BATCH=4",
            "--JUDGE_DRILL_STEPS=3", "--JUDGE_DRILL_BATCH=2", "--JUDGE_POLISH_STEPS=2",
            "--WARMUP_STEPS=2"] + [f"--{k}_{d}={v}" for k in ("POLICY", "JUDGE")
                                   for d, v in (("HIDDEN", 32), ("LAYERS", 1), ("HEADS", 2), ("MLP", 64))]
    sft.main(args)
    return folder, args


def test_build_writes_standard_folders(tiny_build):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = tiny_build
    for name in ("policy", "judge"):
        path = folder / "models" / name
        assert (path / "model.safetensors").exists() and (path / "build_config.json").exists()
        model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        init = sft.make_model(tok, 32, 1, 2, 64, 0 if name == "policy" else 1)
        changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), init.parameters())]
        assert all(changed), "every parameter tensor should have moved from its initial value"
        losses = json.loads((path / "train_log.json").read_text())["loss"]
        assert len(losses) == (12 if name == "policy" else 3 + 12 + 2)  # the judge: 3 drill steps, 12 checked, 2 polish
        losses = losses[-14:-2] if name == "judge" else losses  # checked steps weight the answer 20x: another scale
        assert sum(losses[-3:]) < sum(losses[:3])


def test_build_is_skipped_when_up_to_date(tiny_build, capsys):
    folder, args = tiny_build
    before = (folder / "models" / "policy" / "model.safetensors").stat().st_mtime_ns
    sft.main(args)
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == 2
    assert (folder / "models" / "policy" / "model.safetensors").stat().st_mtime_ns == before


def test_committed_models_load_with_auto_classes():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("policy", "judge"):
        path = os.path.join(COMMITTED, name)
        model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        assert model.config.model_type == "llama" and tok.eos_token == "<|endoftext|>"
        total = sum(os.path.getsize(os.path.join(COMMITTED, n, f)) for n in ("policy", "judge")
                    for f in os.listdir(os.path.join(COMMITTED, n)))
        assert total < 20 * 2 ** 20


def test_committed_judge_checks_the_step_where_an_error_was_planted():
    """The committed judge, in the mode it was built for, on 100 test problems with an error planted in each
    (corrupt_solution): it accepts the gold step, rejects the planted arithmetic slips (95% of the policy's
    own first errors; measured 52 of 52 here, gold steps accepted 96 of 100), and its check of the gold step is
    the gold computation. Wrong operands and operators, the other planted kinds, it rejects far less often (29
    of 48): docs/LOG.md."""
    from reward_model import make_judge

    judge = make_judge(os.path.join(COMMITTED, "judge"), {"JUDGE_MODE": "check", "BATCH_SIZE": 100})
    rng, items, planted = random.Random(0), [], []
    problems = load_problems(os.path.join(ROOT, "data", "test.jsonl"))[:100]
    for p in problems:
        steps, final = split_steps(p["answer"], strip_calc=True)
        bad, _, j = corrupt_solution(steps, final, rng, p["question"])
        items += [(p["question"], steps), (p["question"], bad)]
        planted.append((j, arithmetic_slip(bad[j])))
    out = judge.score(items)
    gold, bad = out[0::2], out[1::2]
    assert sum(g["scores"][j] >= 0.5 for g, (j, _) in zip(gold, planted)) >= 90
    slips = [b["scores"][j] < 0.5 for b, (j, slip) in zip(bad, planted) if slip]
    assert len(slips) >= 40 and sum(slips) >= 0.8 * len(slips), (sum(slips), len(slips))
    same = sum(g["checks"][j].startswith(f" {equation_text(split_steps(p['answer'], strip_calc=True)[0][j])};")
               for g, p, (j, _) in zip(gold, problems, planted))
    assert same >= 90, same


def test_pairs_pools_are_held_out_from_the_judge_and_the_policy():
    """The problems whose samples the judge scores for pairs (reward_model.py, experiments.py defaults) lie
    inside the judge's held-out range and outside the policy's gold set, and the committed judge was built
    with that range."""
    import experiments
    import reward_model

    first, end = sft.JUDGE_HELD_OUT
    assert (first, end) == PAIRS_POOL and sft.SFT_GOLD_SIZE == POLICY_GOLD[1] <= first
    for mod in (reward_model, experiments):
        lo, hi = mod.FIRST_PROBLEM, mod.FIRST_PROBLEM + mod.N_PROBLEMS
        assert sft.SFT_GOLD_SIZE <= lo and first <= lo and hi <= end, mod.__name__
    with open(os.path.join(COMMITTED, "judge", "build_config.json")) as f:
        assert json.load(f)["JUDGE_HELD_OUT"] == [first, end]
    assert sft.JUDGE_SAMPLE_PROBLEMS <= min(first, sft.SFT_GOLD_SIZE)
