"""Prompts and their token packing."""
import copy

import pytest
import torch

from prompts import (additive_mask, answer_finished, answer_token_ids, chat_wrap, encode, judge_segments, left_pad,
                     pack_judge, packed_batch, policy_prompt, step_prompt_ids, truncate_solution)


def test_truncate_solution():
    assert truncate_solution("a = 1\nb = 2\n#### 3\nQuestion: more") == "a = 1\nb = 2\n#### 3"
    assert truncate_solution("no answer yet ") == "no answer yet"


@pytest.mark.parametrize("text, finished, cut", [
    ("a = 1\n#### 3", False, "a = 1\n#### 3"),                          # the '####' line may go on
    ("a = 1\n#### 3\nQuestion: more", True, "a = 1\n#### 3"),
    ("so #### is not a line\nb", False, "so #### is not a line\nb"),
    ("So $x = \\boxed{\\frac{\\sqrt{3}}{2}", False, "So $x = \\boxed{\\frac{\\sqrt{3}}{2}"),  # still open
    ("So $x = \\boxed{\\frac{\\sqrt{3}}{2}}$. Then more\ntext", True, "So $x = \\boxed{\\frac{\\sqrt{3}}{2}}$."),
    ("\\[\\boxed{7}\\]\n#### 7\n", True, "\\[\\boxed{7}\\]"),                 # whichever ends first
    ("a\n#### 7\nThe answer is \\boxed{7}.", True, "a\n#### 7"),
])
def test_answer_finished_and_truncate_in_either_style(text, finished, cut):
    assert answer_finished(text) is finished
    assert truncate_solution(text) == cut


def test_boxed_policy_instruction(tiny_tokenizer):
    chat = copy.deepcopy(tiny_tokenizer)
    chat.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert policy_prompt(chat, "Q?", "boxed") == ("Solve the problem step by step. Write one step per line and put "
                                                  "the final answer in \\boxed{}.\n\nQ?")
    assert policy_prompt(tiny_tokenizer, "Q?", "boxed") == policy_prompt(tiny_tokenizer, "Q?")
    with pytest.raises(SystemExit, match="--ANSWER_STYLE must be one of gsm8k, boxed"):
        policy_prompt(chat, "Q?", "latex")


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


def test_left_pad_and_additive_mask():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    visible = torch.tensor([[[True, False], [True, True]]])
    m = additive_mask(visible, torch.float32)
    assert m.shape == (1, 1, 2, 2) and m[0, 0, 1].tolist() == [0.0, 0.0]
    assert m[0, 0, 0, 1].item() == torch.finfo(torch.float32).min and m[0, 0, 0, 0].item() == 0.0


def test_step_prompt_ids_cut_the_separate_prompts_from_a_pack(tiny_tokenizer):
    steps = ["He has 5 * 2 = 10 eggs.", "He has 10 - 1 = 9 eggs."]
    pack = pack_judge(tiny_tokenizer, "Omar has 5 eggs.", steps)
    for k in range(2):
        head, texts, tail = judge_segments(tiny_tokenizer, "Omar has 5 eggs.", steps[: k + 1])
        expected = encode(tiny_tokenizer, head)
        for t in texts + [tail]:
            expected += tiny_tokenizer(t, add_special_tokens=False)["input_ids"]
        assert step_prompt_ids(pack, k) == expected
