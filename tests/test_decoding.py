import torch

from decoding import LlamaDecoder, ModelDecoder, decoder_for


def run(decoder, steps):
    """Feed (ids, positions, real, keep) steps; the logits after every step, all columns."""
    out = []
    with torch.no_grad():
        for ids, positions, real, keep in steps:
            if keep is not None:
                decoder.select(keep)
            out.append(decoder.logits(decoder.forward(ids, positions, real)))
    return out


def decoding_steps(vocab, seed=0):
    """A left-padded prefill, token-by-token steps past the cache's first doubling, chunks of different
    widths with padding columns in the middle, and rows leaving the batch."""
    g = torch.Generator().manual_seed(seed)
    real = torch.ones(3, 12, dtype=torch.long)
    real[1, :5], real[2, :2] = 0, 0
    steps = [(torch.randint(3, vocab, (3, 12), generator=g), (real.cumsum(-1) - 1).clamp(min=0), real, None)]
    length = real.sum(1)
    for t in range(40):
        keep = torch.tensor([0, 2]) if t == 30 else None
        if keep is not None:
            length = length[keep]
        n = len(length)
        width = 3 if t % 10 == 5 else 1
        real = torch.ones(n, width, dtype=torch.long)
        if width > 1:
            real[0, 1:] = 0                                    # row 0 feeds one token, the others three
        steps.append((torch.randint(3, vocab, (n, width), generator=g),
                      length[:, None] + torch.arange(width)[None], real, keep))
        length = length + real.sum(1)
    return steps


def test_llama_decoder_computes_what_the_model_computes_bit_for_bit(tiny_model):
    """The same logits, bit for bit, as the model's own forward with its KV cache, through left padding,
    padding columns in the middle, the cache's growth and rows leaving: greedy tokens cannot differ."""
    assert LlamaDecoder.supports(tiny_model)
    steps = decoding_steps(tiny_model.config.vocab_size)
    ours, theirs = run(LlamaDecoder(tiny_model, 3), steps), run(ModelDecoder(tiny_model, 3), steps)
    assert len(ours) == 41
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and torch.equal(a, b)


def test_llama_decoder_without_padding_matches_too(tiny_model):
    """No padding at all: transformers passes no mask to attention (a causal prefill, then single queries);
    the decoder does the same, so this path is bit-equal as well."""
    ids = torch.randint(3, tiny_model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    steps = [(ids[:, :6], torch.arange(6).expand(2, 6), torch.ones(2, 6), None)]
    steps += [(ids[:, t: t + 1], torch.full((2, 1), t), torch.ones(2, 1), None) for t in range(6, 9)]
    for a, b in zip(run(LlamaDecoder(tiny_model, 2), steps), run(ModelDecoder(tiny_model, 2), steps)):
        assert torch.equal(a, b)


def test_other_architectures_decode_through_their_own_forward(tiny_tokenizer):
    """Grouped-query attention (not handled by LlamaDecoder) and a model in training mode take the model's
    own forward; the result still matches a plain forward over each row's whole sequence."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    gqa = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)).eval()
    assert isinstance(decoder_for(gqa, 1), ModelDecoder)
    assert isinstance(decoder_for(gqa.train(), 1), ModelDecoder)
    gqa.eval()
    steps = decoding_steps(gqa.config.vocab_size, seed=2)[:4]
    logits = run(decoder_for(gqa, 3), steps)
    ids, real = torch.cat([s[0] for s in steps], 1), torch.cat([s[2] for s in steps], 1)
    for r in range(3):
        alone = gqa(input_ids=ids[r][real[r].bool()][None]).logits[0, -1]
        assert torch.allclose(logits[-1][r, -1], alone, atol=1e-5)
