"""Model loading, the sampler, and the policy behind one `.sample` (local or served)."""
import json

import pytest
import torch

import models
from conftest import FakeServer, policy_reply
from models import HTTPPolicy, LocalPolicy, PolicyError, load_model, sample
from prompts import encode, policy_prompt, truncate_solution


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


def test_http_policy_samples_with_seeds_retries_and_order():
    with FakeServer() as server:
        run_http_policy_checks(server)


def run_http_policy_checks(server):
    server.plan = ["http503"]
    policy = HTTPPolicy(server.url + "/v1/", "pol", timeout=5, retries=2, backoff=0.01, workers=3)
    out = policy.sample(["P1", "P2"], n=3, temperature=0.7, top_p=0.9, max_new_tokens=50, seeds=[10, 11])
    assert [len(row) for row in out] == [3, 3]
    for prompt, seed, row in zip(["P1", "P2"], [10, 11], out):
        for j, text in enumerate(row):
            reply = json.loads(policy_reply(prompt, seed * 1_000_003 + j))
            assert text == reply["choices"][0]["text"].split("\nQuestion")[0]  # cut after the '####' line
    bodies = [body for path, body, _, _ in server.seen]
    assert len(bodies) == 7 and all(path == "/v1/completions" for path, _, _, _ in server.seen)
    assert {b["seed"] for b in bodies} == {s * 1_000_003 + j for s in (10, 11) for j in range(3)}  # one retried
    assert {(b["model"], b["temperature"], b["top_p"], b["max_tokens"], b["n"]) for b in bodies} == {
        ("pol", 0.7, 0.9, 50, 1)}
    again = HTTPPolicy(server.url, "pol", timeout=5, retries=0).sample(["P1", "P2"], 3, 0.7, 0.9, 50, [10, 11])
    assert again == out  # one worker or three, the same samples in the same order
    server.plan = ["http404"]
    with pytest.raises(PolicyError, match="policy server .* refused the request: HTTP 404"):
        policy.sample(["P1"], 1, 0.7, 1.0, 50, [0])


def test_local_and_served_policies_sample_through_one_interface(tmp_path, tiny_tokenizer, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    local = LocalPolicy(str(tmp_path), batch_size=2)
    prompts = [policy_prompt(tiny_tokenizer, "Mia has 3 apples."), policy_prompt(tiny_tokenizer, "Zoe?")]
    got = local.sample(prompts, 2, 1.0, 0.9, 10, seeds=[3, 4])
    assert got == sample(tiny_model, tiny_tokenizer, prompts, n=2, temperature=1.0, top_p=0.9, max_new_tokens=10,
                         seeds=[3, 4], progress=False)
    assert local.id.startswith(f"{tmp_path}@") and len(local.id) == len(str(tmp_path)) + 17
    with FakeServer() as server:
        served = HTTPPolicy(server.url, "pol").sample(prompts, 2, 1.0, 0.9, 10, seeds=[3, 4])
    assert [len(row) for row in served] == [len(row) for row in got] == [2, 2]


def test_rows_grow_by_chunks_of_different_lengths_like_separate_forwards(tiny_tokenizer, tiny_model):
    """Chunks fed through one cache (rows padded in the middle) give the logits of each row's whole sequence
    in a plain forward."""
    from models import Rows

    texts = [["Mia has 12 apples.", " She finds 3 more.", "", " So 15."], ["Ben", " has 40 coins and more of them.", " x", ""]]
    rows = Rows(tiny_model, 2, tiny_tokenizer.pad_token_id)
    seen = [[], []]
    with torch.no_grad():
        for step in range(4):
            chunks = [tiny_tokenizer(t[step], add_special_tokens=False)["input_ids"] for t in texts]
            logits = rows.feed(chunks)
            for r, chunk in enumerate(chunks):
                seen[r] += chunk
                if chunk:
                    alone = tiny_model(input_ids=torch.tensor([seen[r]])).logits[0, -1]
                    assert torch.allclose(logits[r], alone, atol=1e-5), (step, r)


def test_growing_cache_decodes_as_the_concatenating_cache_does(tiny_model):
    """Token by token past its buffer's doublings, with rows leaving the batch on the way: the same logits as
    transformers' DynamicCache, bit for bit."""
    from transformers import DynamicCache

    from models import growing_cache

    torch.manual_seed(0)
    ids = torch.randint(3, tiny_model.config.vocab_size, (4, 90))
    logits = []
    for cache in (growing_cache(), DynamicCache()):
        rows, seen = ids, []
        with torch.no_grad():
            seen.append(tiny_model(input_ids=rows[:, :20], cache=cache, use_cache=True).logits[:, -1])
            for t in range(20, 90):
                if t == 60:
                    cache.batch_select_indices(torch.tensor([0, 2]))
                    rows = rows[[0, 2]]
                seen.append(tiny_model(input_ids=rows[:, t: t + 1], cache=cache, use_cache=True).logits[:, -1])
        logits.append(seen)
    assert len(logits[0]) == 71 and all(torch.equal(a, b) for a, b in zip(*logits))


def test_hub_fingerprint_follows_the_commit_the_cache_resolved(tmp_path):
    """A Hub id is fingerprinted by the snapshot its cached ref points to (a Hugging Face cache laid out by
    hand: no network): when the Hub model is updated and loaded again, cached scores no longer apply."""
    repo = tmp_path / "models--org--tiny"
    for sha in ("a" * 40, "b" * 40):
        (repo / "snapshots" / sha).mkdir(parents=True)
        (repo / "snapshots" / sha / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert models.hub_revision("org/tiny", cache_dir=tmp_path) == "a" * 40
    first = models.fingerprint("org/tiny", cache_dir=tmp_path)
    (repo / "refs" / "main").write_text("b" * 40)
    assert models.hub_revision("org/tiny", cache_dir=tmp_path) == "b" * 40
    assert models.fingerprint("org/tiny", cache_dir=tmp_path) != first
    assert models.hub_revision("org/absent", cache_dir=tmp_path) is None
    assert models.hub_revision("no/such/local/folder", cache_dir=tmp_path) is None
