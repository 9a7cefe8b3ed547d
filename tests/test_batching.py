"""batching.py: pair packing, the prefix-shared forward against separate forwards, the head-only path."""
import pytest
import torch

import batching as B
import train_stepwise_dpo as T
from conftest import FULL_ROWS, STEP_ROWS, naive_logp


@pytest.mark.parametrize("sharing", [True, False, "tree"])
def test_sequence_logps_equal_separate_forwards(tiny_tokenizer, policy_and_ref, sharing):
    policy, _ = policy_and_ref
    feats = [T.build_features(tiny_tokenizer, r, "step") for r in STEP_ROWS]
    feats += [T.build_features(tiny_tokenizer, r, "outcome") for r in FULL_ROWS]
    long_prefix = STEP_ROWS[1] | {"initial_reason_steps": STEP_ROWS[1]["initial_reason_steps"] * 12}
    feats.append(T.build_features(tiny_tokenizer, long_prefix, "step"))
    # the same question and prefix as pair 1, another rejected step: a tree shares pair 1's chosen path
    feats.append(T.build_features(tiny_tokenizer, STEP_ROWS[1] | {"rejected": "After that, he has 33 + 2 = 31 coins.\n"},
                                  "step"))
    batch = B.collate(feats, tiny_tokenizer.pad_token_id, prefix_sharing=sharing is True, tree=sharing == "tree")
    if sharing is True:  # shorter pairs share rows in the width of the longest
        assert len(batch["input_ids"]) < len(feats)
    if sharing == "tree":  # Ben's four pairs share his question, and pairs 1 and 6 their prefix and chosen step
        shared = B.collate(feats, tiny_tokenizer.pad_token_id)
        tokens = sum(len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in feats)
        assert (shared["part"] < 3).sum() == tokens
        assert batch["visible"].diagonal(dim1=1, dim2=2).all()
        trie = (batch["visible"].sum(-1) > 1).sum() + len(set(f["group"] for f in feats))  # roots see themselves
        assert trie < tokens - 2 * len(feats[0]["prompt_ids"])
    with torch.no_grad():
        got = B.sequence_logps(policy, batch, prefix_sharing=sharing is True)
        for i, f in enumerate(feats):
            # sums of ~40 float32 log-probs near -6 each: 1e-5 per token is float32's resolution here
            tol = 1e-5 * (len(f["chosen_ids"]) + len(f["rejected_ids"]))
            assert got["chosen"][i].item() == pytest.approx(naive_logp(policy, f["prompt_ids"], f["chosen_ids"]), abs=tol)
            assert got["rejected"][i].item() == pytest.approx(naive_logp(policy, f["prompt_ids"], f["rejected_ids"]),
                                                              abs=tol)
            assert got["chosen_tokens"][i].item() == len(f["chosen_ids"])
            assert got["rejected_tokens"][i].item() == len(f["rejected_ids"])


class Wrapped(torch.nn.Module):
    """Stands for a model wrapped for distributed training (DDP's `.module`): it has no decoder to call."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, **inputs):
        return self.module(**inputs)


def test_projection_at_scored_positions_equals_full_logits_and_gradients(tiny_tokenizer, policy_and_ref):
    """The head-only-where-scored path (plain model) against the full-logits path (wrapped model): the same
    log-probs and the same gradients."""
    policy, _ = policy_and_ref
    feats = [T.build_features(tiny_tokenizer, r, "step") for r in STEP_ROWS]
    batch = B.collate(feats, tiny_tokenizer.pad_token_id)
    grads = []
    for model in (policy, Wrapped(policy)):
        policy.zero_grad()
        out = B.sequence_logps(model, batch)
        (out["chosen"] - out["rejected"]).sum().backward()
        grads.append([p.grad.clone() for p in policy.parameters()])
        values = torch.stack([out[k] for k in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")])
        grads[-1].append(values.detach())
    policy.zero_grad()
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_pack_rows_first_fit_decreasing_then_balanced():
    assert B.pack_rows([10, 3, 4, 6, 7], 10) == [[0], [4, 1], [3, 2]]   # balancing 3 rows: no shorter
    # first fit: [[0, 4, 1], [3, 2]], fullest row 20; balanced over 2 rows: [[0, 2], [4, 3, 1]], fullest 16
    assert B.pack_rows([10, 3, 4, 6, 7], 20) == [[0, 2], [4, 3, 1]]
    assert sorted(i for row in B.pack_rows([5] * 7, 12) for i in row) == list(range(7))
    assert B.pack_rows([4, 4, 4, 4], 1) == [[0], [1], [2], [3]]
