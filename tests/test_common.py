import copy
import json
import os

import pytest
import torch

from common import (answer_token_ids, atomic_write_json, atomic_write_jsonl, chat_wrap, config_from_argv,
                    encode, judge_segments, load_model, pack_judge, packed_batch, policy_prompt, sample,
                    truncate_solution)

DEFAULTS = {"LR": 1e-3, "STEPS": 10, "NAME": "x", "FLAG": False, "SIZES": [1, 2], "OPT": None}


def test_overrides_parse_each_type():
    cfg = config_from_argv(DEFAULTS, ["--LR=0.5", "--STEPS=3", "--NAME=y", "--FLAG=true", "--SIZES=[4]",
                                      "--OPT=z"])
    assert cfg == {"LR": 0.5, "STEPS": 3, "NAME": "y", "FLAG": True, "SIZES": [4], "OPT": "z"}
    assert DEFAULTS["LR"] == 1e-3  # defaults untouched


@pytest.mark.parametrize("arg, message", [
    ("--NOPE=1", "unknown key --NOPE; valid keys: LR, STEPS, NAME, FLAG, SIZES, OPT"),
    ("--STEPS=1.5", "--STEPS expects int, got '1.5'"),
    ("--FLAG=maybe", "--FLAG expects a boolean"),
    ("--SIZES=3", "--SIZES expects a JSON list"),
    ("STEPS=3", "expected --KEY=value"),
])
def test_overrides_refuse_bad_input(arg, message):
    with pytest.raises(SystemExit) as e:
        config_from_argv(DEFAULTS, [arg])
    assert message in str(e.value)


def test_atomic_write_leaves_only_the_file(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_jsonl(tmp_path / "rows.jsonl", [{"x": "é"}, {"x": 2}])
    assert json.loads(target.read_text()) == {"a": 1}
    assert (tmp_path / "rows.jsonl").read_text(encoding="utf-8") == '{"x": "é"}\n{"x": 2}\n'
    assert sorted(os.listdir(tmp_path)) == ["rows.jsonl", "sub"] and os.listdir(tmp_path / "sub") == ["out.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "out.jsonl"
    atomic_write_jsonl(target, [{"a": 1}])
    with pytest.raises(TypeError):
        atomic_write_jsonl(target, [{"a": object()}])
    assert target.read_text() == '{"a": 1}\n' and os.listdir(tmp_path) == ["out.jsonl"]


def test_truncate_solution():
    assert truncate_solution("a = 1\nb = 2\n#### 3\nQuestion: more") == "a = 1\nb = 2\n#### 3"
    assert truncate_solution("no answer yet ") == "no answer yet"


def test_plain_prompts(tiny_tokenizer):
    assert chat_wrap(tiny_tokenizer) == ("", "")
    assert policy_prompt(tiny_tokenizer, "Q?") == "Question: Q?\nAnswer:\n"
    head, steps, tail = judge_segments(tiny_tokenizer, "Q?", ["a", "b"])
    assert head + "".join(steps) + tail == "Check the last step.\nQuestion: Q?\nSteps:\na\nb\nIs the last step correct? Answer:"


def test_chat_template_wraps_prompts(tiny_tokenizer):
    chat = copy.deepcopy(tiny_tokenizer)  # the fixture is shared: change a copy
    chat.chat_template = ("{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}"
                          "{% if add_generation_prompt %}<a>{% endif %}")
    assert chat_wrap(chat) == ("<u>", "</u><a>")
    assert policy_prompt(chat, "Q?").startswith("<u>Solve the problem step by step.")
    assert policy_prompt(chat, "Q?").endswith("\n\nQ?</u><a>")
    head, steps, tail = judge_segments(chat, "Q?", ["a"])
    assert head.startswith("<u>Check the last step.") and tail.endswith("Answer:</u><a>")


def test_answer_token_ids(tiny_tokenizer):
    yes, no = answer_token_ids(tiny_tokenizer, "Yes"), answer_token_ids(tiny_tokenizer, "No")
    assert len(encode(tiny_tokenizer, " Yes")) == 1 and encode(tiny_tokenizer, " Yes")[0] in yes
    assert len(encode(tiny_tokenizer, " No")) == 1 and encode(tiny_tokenizer, " No")[0] in no
    assert not set(yes) & set(no)
    decoded = {tiny_tokenizer.decode([i]).strip() for i in yes}
    assert decoded <= {"Yes", "YES", "yes", "Ye", "YE", "ye"} and "Yes" in decoded


def test_packed_judge_equals_separate_prompts(tiny_tokenizer, tiny_model):
    questions = ["Mia has 12 apples. She finds 3 more apples. How many apples does Mia have now?",
                 "Ben has 40 coins. He gives away 7 coins. How many coins does Ben have now?"]
    solutions = [["After that, she has 12 + 3 = 15 apples."],
                 ["Then he has 40 - 7 = 33 coins left.", "So 33 * 1 = 33.", "Extra 1 + 1 = 2."]]
    packs = [pack_judge(tiny_tokenizer, q, s) for q, s in zip(questions, solutions)]
    ids, pos, mask = packed_batch(packs, tiny_tokenizer.pad_token_id)
    for impl in ("eager", "sdpa"):
        tiny_model.config._attn_implementation = impl
        with torch.no_grad():
            packed = tiny_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            for r, (q, steps) in enumerate(zip(questions, solutions)):
                for k in range(len(steps)):
                    head, texts, tail = judge_segments(tiny_tokenizer, q, steps[: k + 1])
                    sep = encode(tiny_tokenizer, head)
                    for t in texts + [tail]:
                        sep += tiny_tokenizer(t, add_special_tokens=False)["input_ids"]
                    alone = tiny_model(input_ids=torch.tensor([sep])).logits[0, -1]
                    assert torch.allclose(alone, packed[r, packs[r][3][k]], atol=1e-5)
    tiny_model.config._attn_implementation = "sdpa"


def test_sampling_is_independent_of_batching(tiny_tokenizer, tiny_model):
    prompts = [policy_prompt(tiny_tokenizer, q) for q in ["Mia has 3 apples.", "Ben has 40 coins and more.",
                                                         "Zoe?"]]
    kw = dict(n=3, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=5, progress=False)
    a = sample(tiny_model, tiny_tokenizer, prompts, batch_size=9, **kw)
    b = sample(tiny_model, tiny_tokenizer, prompts, batch_size=2, **kw)
    c = sample(tiny_model, tiny_tokenizer, prompts, batch_size=4, **(kw | {"seed": 6}))
    assert a == b and a != c
    assert len(a) == 3 and all(len(row) == 3 for row in a)
    greedy = sample(tiny_model, tiny_tokenizer, prompts, n=1, max_new_tokens=12, batch_size=1, progress=False)
    assert greedy == sample(tiny_model, tiny_tokenizer, prompts, n=1, max_new_tokens=12, batch_size=3,
                            progress=False)


def test_greedy_sampling_matches_argmax_decoding(tiny_tokenizer, tiny_model):
    prompt = policy_prompt(tiny_tokenizer, "Ben has 40 coins.")
    ids = encode(tiny_tokenizer, prompt)
    for _ in range(8):
        with torch.no_grad():
            ids.append(int(tiny_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    expected = tiny_tokenizer.decode(ids[len(encode(tiny_tokenizer, prompt)):], skip_special_tokens=True)
    got = sample(tiny_model, tiny_tokenizer, [prompt, "Question: a longer prompt to force left padding here\n"],
                 n=1, max_new_tokens=8, progress=False)[0][0]
    assert got == truncate_solution(expected)


def test_load_model_from_local_folder(tmp_path, tiny_tokenizer, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    model, tok = load_model(str(tmp_path))
    assert tok("Mia has 12")["input_ids"] == tiny_tokenizer("Mia has 12")["input_ids"]
    for a, b in zip(model.parameters(), tiny_model.parameters()):
        assert torch.equal(a, b)
