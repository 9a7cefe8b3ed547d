import copy
import json
import math

import pytest
import torch
from transformers import TrainingArguments

import train_stepwise_dpo as T
from common import encode, policy_prompt
from data_utils import DataError


def test_preference_loss_by_hand():
    t = lambda *x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    losses, rc, rr = T.preference_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.5)))       # margin 1, beta 0.5
    assert (rc.item(), rr.item()) == pytest.approx((0.25, -0.25))
    ipo, _, _ = T.preference_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.25, loss_type="ipo")
    assert ipo.item() == pytest.approx(1.0)                                    # (1 - 1/(2*0.25))^2
    dpop, _, _ = T.preference_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.5, dpop_lambda=2.0,
                                   policy_chosen_plain=t(-1.5), ref_chosen_plain=t(-1.0))
    assert dpop.item() == pytest.approx(math.log(2))                           # margin 1 - 2 * 0.5 = 0
    no_penalty, _, _ = T.preference_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.5, dpop_lambda=2.0,
                                         policy_chosen_plain=t(-0.5), ref_chosen_plain=t(-1.0))
    assert no_penalty.item() == pytest.approx(losses.item())


def test_step_weights_by_hand():
    assert T.step_weights([1.0, 0.5], "chosen", "weighted") == pytest.approx([4 / 3, 2 / 3])
    assert T.step_weights([0.2, 0.6], "rejected", "weighted") == pytest.approx([4 / 3, 2 / 3])
    assert T.step_weights([0.7, 0.7, 0.7], "chosen", "weighted") == pytest.approx([1.0, 1.0, 1.0])
    assert T.step_weights([1.0, 1.0], "rejected", "weighted") == [1.0, 1.0]      # nothing to weight by
    assert T.step_weights([0.1, 0.9], "chosen", "outcome") == [1.0, 1.0]


STEP_ROWS = [
    {"prompt": "Mia has 12 apples. She finds 3 more apples. How many apples does Mia have now?",
     "initial_reason_steps": "", "chosen": "After that, she has 12 + 3 = 15 apples.\n",
     "rejected": "After that, she has 12 + 3 = 16 apples.\n", "answer": "15"},
    {"prompt": "Ben has 40 coins. He gives away 7 coins. He finds 2 more coins. How many coins does Ben have?",
     "initial_reason_steps": "Then he has 40 - 7 = 33 coins left.\n", "chosen": "After that, he has 33 + 2 = 35 coins.\n",
     "rejected": "After that, he has 33 + 2 = 36 coins.\n", "answer": "35"},
]
FULL_ROWS = [
    {"prompt": "Ben has 40 coins. He gives away 7 coins. He finds 2 more coins. How many coins does Ben have?",
     "chosen_steps": ["Then he has 40 - 7 = 33 coins left.", "After that, he has 33 + 2 = 35 coins."],
     "rejected_steps": ["Then he has 40 - 7 = 34 coins left.", "After that, he has 34 + 2 = 36 coins."],
     "chosen_step_scores": [0.9, 0.6], "rejected_step_scores": [0.3, 0.8], "chosen": "x\n#### 35",
     "rejected": "x\n#### 36", "answer": "35"},
    {"prompt": "Zoe has 5 eggs. She ends up with twice as many eggs. How many eggs does Zoe have now?",
     "chosen_steps": ["Now she has 5 * 2 = 10 eggs."], "rejected_steps": ["Now she has 5 + 2 = 7 eggs."],
     "chosen_step_scores": [0.95], "rejected_step_scores": [0.1], "chosen": "x\n#### 10",
     "rejected": "x\n#### 7", "answer": "10"},
]


def naive_logp(model, prompt_ids, completion_ids):
    """log pi(completion | prompt) from a separate, plain forward."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return sum(logp[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(completion_ids))


@pytest.fixture(scope="module")
def models(tiny_tokenizer, tiny_model):
    ref = copy.deepcopy(tiny_model)
    policy = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return policy, ref


@pytest.mark.parametrize("sharing", [True, False])
def test_sequence_logps_equal_separate_forwards(tiny_tokenizer, models, sharing):
    policy, _ = models
    feats = [T.build_features(tiny_tokenizer, r, "step") for r in STEP_ROWS]
    feats += [T.build_features(tiny_tokenizer, r, "outcome") for r in FULL_ROWS]
    long_prefix = STEP_ROWS[1] | {"initial_reason_steps": STEP_ROWS[1]["initial_reason_steps"] * 12}
    feats.append(T.build_features(tiny_tokenizer, long_prefix, "step"))
    batch = T.collate(feats, tiny_tokenizer.pad_token_id, prefix_sharing=sharing)
    if sharing:  # shorter pairs share rows in the width of the longest
        assert len(batch["input_ids"]) < len(feats)
    with torch.no_grad():
        got = T.sequence_logps(policy, batch, prefix_sharing=sharing)
        for i, f in enumerate(feats):
            # sums of ~40 float32 log-probs near -6 each: 1e-5 per token is float32's resolution here
            tol = 1e-5 * (len(f["chosen_ids"]) + len(f["rejected_ids"]))
            assert got["chosen"][i].item() == pytest.approx(naive_logp(policy, f["prompt_ids"], f["chosen_ids"]), abs=tol)
            assert got["rejected"][i].item() == pytest.approx(naive_logp(policy, f["prompt_ids"], f["rejected_ids"]),
                                                              abs=tol)
            assert got["chosen_tokens"][i].item() == len(f["chosen_ids"])


class Wrapped(torch.nn.Module):
    """Stands for a model wrapped for distributed training (DDP's `.module`): it has no decoder to call."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, **inputs):
        return self.module(**inputs)


def test_projection_at_scored_positions_equals_full_logits_and_gradients(tiny_tokenizer, models):
    """The head-only-where-scored path (plain model) against the full-logits path (wrapped model): the same
    log-probs and the same gradients."""
    policy, _ = models
    feats = [T.build_features(tiny_tokenizer, r, "step") for r in STEP_ROWS]
    batch = T.collate(feats, tiny_tokenizer.pad_token_id)
    grads = []
    for model in (policy, Wrapped(policy)):
        policy.zero_grad()
        out = T.sequence_logps(model, batch)
        (out["chosen"] - out["rejected"]).sum().backward()
        grads.append([p.grad.clone() for p in policy.parameters()])
        values = torch.stack([out[k] for k in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")])
        grads[-1].append(values.detach())
    policy.zero_grad()
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_pack_rows_first_fit_decreasing_then_balanced():
    assert T.pack_rows([10, 3, 4, 6, 7], 10) == [[0], [4, 1], [3, 2]]   # balancing 3 rows: no shorter
    # first fit: [[0, 4, 1], [3, 2]], fullest row 20; balanced over 2 rows: [[0, 2], [4, 3, 1]], fullest 16
    assert T.pack_rows([10, 3, 4, 6, 7], 20) == [[0, 2], [4, 3, 1]]
    assert sorted(i for row in T.pack_rows([5] * 7, 12) for i in row) == list(range(7))
    assert T.pack_rows([4, 4, 4, 4], 1) == [[0], [1], [2], [3]]


def test_step_features_have_no_eos_and_full_features_end_with_eos(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    step = T.build_features(tiny_tokenizer, STEP_ROWS[1], "step")
    assert eos not in step["chosen_ids"] + step["rejected_ids"]
    assert step["prompt_ids"] == encode(tiny_tokenizer, policy_prompt(tiny_tokenizer, STEP_ROWS[1]["prompt"])
                                        + STEP_ROWS[1]["initial_reason_steps"])
    full = T.build_features(tiny_tokenizer, FULL_ROWS[0], "weighted")
    assert full["chosen_ids"][-1] == eos and full["rejected_ids"][-1] == eos
    assert tiny_tokenizer.decode(full["chosen_ids"][:-1]) == "\n".join(FULL_ROWS[0]["chosen_steps"]) + "\n#### 35"
    assert sorted(set(full["chosen_weights"])) == pytest.approx(sorted({0.9 / 0.75, 0.6 / 0.75}))


def make_trainer(model, tokenizer, feats, dpo, ref_model=None, **args):
    base = dict(output_dir="/tmp/unused", per_device_train_batch_size=len(feats), learning_rate=1e-3,
                report_to=[], use_cpu=True, remove_unused_columns=False, save_strategy="no", seed=0)
    return T.StepwiseDPOTrainer(model=model, args=TrainingArguments(**(base | args)),
                                train_dataset=T.PairDataset(feats), ref_model=ref_model,
                                data_collator=lambda b: T.collate(b, tokenizer.pad_token_id, True),
                                dpo={"beta": 0.1, "loss": "sigmoid", "nll_weight": 0.0, "dpop_lambda": 0.0,
                                     "prefix_sharing": True} | dpo)


def test_step_mode_is_plain_dpo_on_prefix_and_step(tiny_tokenizer, models):
    policy, ref = models
    feats = [T.build_features(tiny_tokenizer, r, "step") for r in STEP_ROWS]
    trainer = make_trainer(policy, tiny_tokenizer, feats, {"beta": 0.3}, ref_model=ref)
    with torch.no_grad():
        loss = trainer.compute_loss(policy, T.collate(feats, tiny_tokenizer.pad_token_id, True)).item()
        expected = []
        for r in STEP_ROWS:
            prompt = encode(tiny_tokenizer, policy_prompt(tiny_tokenizer, r["prompt"]) + r["initial_reason_steps"])
            c = tiny_tokenizer(r["chosen"], add_special_tokens=False)["input_ids"]
            j = tiny_tokenizer(r["rejected"], add_special_tokens=False)["input_ids"]
            margin = (naive_logp(policy, prompt, c) - naive_logp(ref, prompt, c)) - \
                     (naive_logp(policy, prompt, j) - naive_logp(ref, prompt, j))
            expected.append(-math.log(1 / (1 + math.exp(-0.3 * margin))))
    assert loss == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def test_weighted_with_equal_scores_is_outcome(tiny_tokenizer, models):
    policy, ref = models
    equal = [dict(r, chosen_step_scores=[0.7] * len(r["chosen_steps"]),
                  rejected_step_scores=[0.4] * len(r["rejected_steps"])) for r in FULL_ROWS]
    losses = {}
    for mode in ("weighted", "outcome"):
        feats = [T.build_features(tiny_tokenizer, r, mode) for r in equal]
        trainer = make_trainer(policy, tiny_tokenizer, feats, {}, ref_model=ref)
        with torch.no_grad():
            losses[mode] = trainer.compute_loss(policy, T.collate(feats, tiny_tokenizer.pad_token_id, True)).item()
    assert losses["weighted"] == pytest.approx(losses["outcome"], abs=1e-6)


def test_weighted_mode_by_hand(tiny_tokenizer, models):
    """margin = sum_t a_t h_t(chosen) - sum_t b_t h_t(rejected), with h from separate forwards per step."""
    policy, ref = models
    row = FULL_ROWS[0]
    feats = [T.build_features(tiny_tokenizer, row, "weighted")]
    trainer = make_trainer(policy, tiny_tokenizer, feats, {"beta": 0.5}, ref_model=ref)
    with torch.no_grad():
        loss = trainer.compute_loss(policy, T.collate(feats, tiny_tokenizer.pad_token_id, True)).item()
        prompt = encode(tiny_tokenizer, policy_prompt(tiny_tokenizer, row["prompt"]))

        def side(steps, final, weights):
            total, ids = 0.0, list(prompt)
            for k, step in enumerate(steps):
                toks = tiny_tokenizer(step + "\n", add_special_tokens=False)["input_ids"]
                if k == len(steps) - 1:  # the final-answer line and EOS belong to the last step
                    toks += tiny_tokenizer(f"#### {final}", add_special_tokens=False)["input_ids"]
                    toks += [tiny_tokenizer.eos_token_id]
                total += weights[k] * (naive_logp(policy, ids, toks) - naive_logp(ref, ids, toks))
                ids += toks
            return total

        a = [0.9 / 0.75, 0.6 / 0.75]
        b = [0.7 / 0.45, 0.2 / 0.45]
        margin = side(row["chosen_steps"], "35", a) - side(row["rejected_steps"], "36", b)
    assert loss == pytest.approx(math.log(1 + math.exp(-0.5 * margin)), abs=1e-5)


def test_nll_term_adds_mean_chosen_token_nll(tiny_tokenizer, models):
    policy, ref = models
    feats = [T.build_features(tiny_tokenizer, r, "step") for r in STEP_ROWS]
    batch = T.collate(feats, tiny_tokenizer.pad_token_id, True)
    with torch.no_grad():
        base = make_trainer(policy, tiny_tokenizer, feats, {}, ref_model=ref).compute_loss(policy, batch).item()
        with_nll = make_trainer(policy, tiny_tokenizer, feats, {"nll_weight": 2.0}, ref_model=ref).compute_loss(
            policy, batch).item()
        nll = [-naive_logp(policy, f["prompt_ids"], f["chosen_ids"]) / len(f["chosen_ids"]) for f in feats]
    assert with_nll - base == pytest.approx(2.0 * sum(nll) / len(nll), abs=1e-5)
    with torch.no_grad():  # the SFT control: the NLL term alone
        sft = make_trainer(policy, tiny_tokenizer, feats, {"loss": "sft", "nll_weight": 1.0},
                           ref_model=ref).compute_loss(policy, batch).item()
    assert sft == pytest.approx(sum(nll) / len(nll), abs=1e-5)


def test_precomputed_reference_equals_live_reference(tiny_tokenizer, models):
    policy, ref = models
    feats = [T.build_features(tiny_tokenizer, r, "step") for r in STEP_ROWS]
    live = make_trainer(policy, tiny_tokenizer, feats, {}, ref_model=ref)
    with torch.no_grad():
        live_loss = live.compute_loss(policy, T.collate(feats, tiny_tokenizer.pad_token_id, True)).item()
    pre = [dict(f) for f in feats]
    T.precompute_reference(ref, pre, 2, tiny_tokenizer.pad_token_id, True)
    trainer = make_trainer(policy, tiny_tokenizer, pre, {})
    with torch.no_grad():
        pre_loss = trainer.compute_loss(policy, T.collate(pre, tiny_tokenizer.pad_token_id, True)).item()
    assert pre_loss == pytest.approx(live_loss, abs=1e-6)


def test_accumulation_matches_one_big_batch(tiny_tokenizer, tiny_model):
    rows = [dict(STEP_ROWS[i % 2], chosen=STEP_ROWS[i % 2]["chosen"].replace("apples", "apples" + "!" * i))
            for i in range(8)]
    feats = [T.build_features(tiny_tokenizer, r, "step") for r in rows]
    T.precompute_reference(tiny_model, feats, 8, tiny_tokenizer.pad_token_id, True)
    results = []
    for batch, accum in ((8, 1), (2, 4)):
        model = copy.deepcopy(tiny_model)
        trainer = make_trainer(model, tiny_tokenizer, feats, {"nll_weight": 0.5}, max_steps=1, lr_scheduler_type="constant",
                               per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                               optim="sgd", max_grad_norm=0.0, disable_tqdm=True)
        trainer.train()
        results.append([p.detach().clone() for p in model.parameters()])
    moved = max((a - b).abs().max().item() for a, b in zip(results[0], tiny_model.parameters()))
    assert moved > 1e-4
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5)


def test_load_pairs_names_the_missing_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(STEP_ROWS[0]) + "\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: field 'initial_reason_steps' is missing"):
        T.load_pairs(str(path), "step")
    with pytest.raises(DataError, match=rf"{path}:1: field 'chosen_steps' is missing"):
        T.load_pairs(str(path), "weighted")


def test_lora_reference_is_the_base_with_adapters_disabled(tiny_tokenizer, tiny_model):
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(tiny_model)
    model = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                 target_modules=["q_proj", "v_proj"],
                                                                 task_type="CAUSAL_LM"))
    feats = [T.build_features(tiny_tokenizer, r, "step") for r in STEP_ROWS]
    batch = T.collate(feats, tiny_tokenizer.pad_token_id, True)
    trainer = make_trainer(model, tiny_tokenizer, feats, {}, max_steps=3, lr_scheduler_type="constant",
                           learning_rate=1e-2, disable_tqdm=True)
    base_before = {k: v.clone() for k, v in model.named_parameters() if "lora" not in k}
    trainer.train()
    with torch.no_grad():
        ref_chosen, ref_rejected, _ = trainer.reference_logps(model, batch)
        expected = T.sequence_logps(base, batch)
        trained = T.sequence_logps(model, batch)
    assert torch.allclose(ref_chosen, expected["chosen"], atol=1e-5)
    assert torch.allclose(ref_rejected, expected["rejected"], atol=1e-5)
    assert not torch.allclose(trained["chosen"], expected["chosen"], atol=1e-4)   # the adapters learned
    assert all(torch.equal(v, base_before[k]) for k, v in model.named_parameters() if "lora" not in k)
