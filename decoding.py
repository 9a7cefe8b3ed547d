"""KV-cached inference for token-by-token generation: the policy's sampler and the judge's checks run on it.

A Llama-architecture model (multi-head attention, no biases, default RoPE, SDPA attention: the bundled
policy and judge, and most small Llama-style checkpoints) runs on `LlamaDecoder`, which does transformers'
LlamaModel arithmetic op for op (the same kernels on the same shapes, so the same bits and the same greedy
tokens; tests/test_decoding.py compares) without its per-call machinery: module dispatch, mask building
through generic mask functions, cache objects. A tiny model decodes in a few milliseconds per token, and
that machinery was about a third of it. Any other model runs through its own forward (`ModelDecoder`).

Both keep the same state: every row has the same number of columns, a column is real or padding per row
(`real`), positions are explicit, and a token sees the real columns up to its own.
"""
import torch
import torch.nn.functional as F


def decoder_for(model, n_rows):
    """The fastest decoder that computes exactly what `model` computes."""
    return LlamaDecoder(model, n_rows) if LlamaDecoder.supports(model) else ModelDecoder(model, n_rows)


def _attention_mask(real, q_length):
    """The boolean (rows, 1, q, kv) mask transformers builds for SDPA (True = attend), or None where it
    builds none: no padding, and a single query or a square causal block (then SDPA's is_causal)."""
    kv_length = real.shape[1]
    if (q_length == 1 or q_length == kv_length) and bool(real.all()):
        return None
    q = torch.arange(q_length, device=real.device)[:, None] + (kv_length - q_length)
    causal = torch.arange(kv_length, device=real.device)[None, :] <= q
    return (causal[None, None] & real[:, None, None, :]).expand(real.shape[0], 1, q_length, kv_length)


class LlamaDecoder:
    """transformers' LlamaModel forward for inference with a preallocated KV cache (doubling when full)."""

    @staticmethod
    def supports(model):
        c = getattr(model, "config", None)
        return (c is not None and c.model_type == "llama" and not hasattr(model, "module")
                and c.num_key_value_heads == c.num_attention_heads and not c.attention_bias and not c.mlp_bias
                and c.hidden_act == "silu" and getattr(c, "pretraining_tp", 1) == 1
                and (c.rope_parameters or {}).get("rope_type", "default") == "default"
                and c._attn_implementation == "sdpa" and not model.training)

    def __init__(self, model, n_rows):
        self.model, self.inner = model, model.model
        self.head = model.get_output_embeddings().weight
        c = model.config
        self.heads, self.head_dim = c.num_attention_heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.device = self.head.device
        self.real = torch.zeros((n_rows, 0), dtype=torch.bool, device=self.device)
        self.keys, self.values, self.length = [None] * len(self.inner.layers), [None] * len(self.inner.layers), 0

    @staticmethod
    def _norm(x, norm):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * h.to(dtype)

    @staticmethod
    def _rotate(x, cos, sin):
        half = x.shape[-1] // 2
        return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)

    def _store(self, i, k, v):
        """Append this call's keys and values to layer i's buffers; views of the filled part."""
        end = self.length + k.shape[2]
        if self.keys[i] is None or end > self.keys[i].shape[2]:
            size = max(end, 2 * (self.keys[i].shape[2] if self.keys[i] is not None else 32))
            grown = [x.new_empty((*x.shape[:2], size, x.shape[-1])) for x in (k, v)]
            if self.keys[i] is not None:
                for old, new in zip((self.keys[i], self.values[i]), grown):
                    new[:, :, : self.length] = old[:, :, : self.length]
            self.keys[i], self.values[i] = grown
        self.keys[i][:, :, self.length: end] = k
        self.values[i][:, :, self.length: end] = v
        return self.keys[i][:, :, :end], self.values[i][:, :, :end]

    def forward(self, ids, positions, real):
        """Append (rows, T) tokens at `positions` (`real` False: a padding column); the final-norm hidden
        states of the T new columns (rows, T, hidden)."""
        x = F.embedding(ids, self.inner.embed_tokens.weight)
        cos, sin = self.inner.rotary_emb(x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        self.real = torch.cat([self.real, real.bool()], dim=1)
        mask = _attention_mask(self.real, ids.shape[1])
        shape = (*ids.shape, -1, self.head_dim)
        for i, layer in enumerate(self.inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = self._norm(x, layer.input_layernorm)
            q = F.linear(h, attn.q_proj.weight).view(shape).transpose(1, 2)
            k = F.linear(h, attn.k_proj.weight).view(shape).transpose(1, 2)
            v = F.linear(h, attn.v_proj.weight).view(shape).transpose(1, 2)
            k, v = self._store(i, self._rotate(k, cos, sin), v)
            o = F.scaled_dot_product_attention(self._rotate(q, cos, sin), k, v, attn_mask=mask, dropout_p=0.0,
                                               scale=self.scale, is_causal=mask is None and ids.shape[1] > 1)
            o = o.transpose(1, 2).contiguous().reshape(*ids.shape, -1).contiguous()
            x = x + F.linear(o, attn.o_proj.weight)
            h = self._norm(x, layer.post_attention_layernorm)
            x = x + F.linear(F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight),
                             mlp.down_proj.weight)
        self.length += ids.shape[1]
        return self._norm(x, self.inner.norm)

    def logits(self, hidden):
        return F.linear(hidden, self.head)

    def select(self, rows):
        """Keep only these rows (a LongTensor of indices), in this order."""
        self.real = self.real[rows]
        self.keys = [None if x is None else x.index_select(0, rows) for x in self.keys]
        self.values = [None if x is None else x.index_select(0, rows) for x in self.values]


class ModelDecoder:
    """The same interface through the model's own forward and a growing KV cache (models.growing_cache)."""

    def __init__(self, model, n_rows):
        from models import growing_cache

        self.model, self.cache = model, growing_cache()
        self.device = next(model.parameters()).device
        self.real = torch.zeros((n_rows, 0), dtype=torch.long, device=self.device)
        self.head = model.get_output_embeddings()
        self.plain = self.head is None or hasattr(model, "module") or any(getattr(model.config, a, None) for a in (
            "final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"))

    def forward(self, ids, positions, real):
        self.real = torch.cat([self.real, real.long()], dim=1)
        inputs = dict(input_ids=ids, attention_mask=self.real, position_ids=positions, cache=self.cache, use_cache=True)
        if self.plain:   # a head that does more than a linear map: the full model, logits returned as they are
            out = self.model(**inputs)
            self.cache = out.cache
            return out.logits
        out = self.model.get_decoder()(**inputs)
        self.cache = out.cache
        return out.last_hidden_state

    def logits(self, hidden):
        return hidden if self.plain else self.head(hidden)

    def select(self, rows):
        self.real = self.real[rows]
        self.cache.batch_select_indices(rows)
