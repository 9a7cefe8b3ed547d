"""Models: loading (Hub id, local folder, GGUF file, LoRA adapter), weight fingerprints, sampling, and the
policy behind one `.sample` whether it runs here or behind an OpenAI-compatible server.
"""
import hashlib
import json
import os
import time
import urllib.error
import urllib.request

from prompts import answer_finished, encode, left_pad, truncate_solution

# ----------------------------------------------------------------------------- loading


def _source(name_or_path, trust_remote_code):
    """(path, from_pretrained kwargs): a .gguf file becomes its folder plus gguf_file=."""
    path, kwargs = str(name_or_path), {"trust_remote_code": trust_remote_code}
    if path.endswith(".gguf"):
        path, kwargs["gguf_file"] = os.path.split(path)
    return path, kwargs


def load_tokenizer(name_or_path, trust_remote_code=False):
    """The tokenizer of a Hub id, a local folder or a GGUF file, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    path, kwargs = _source(name_or_path, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_device():
    """This process's GPU (cuda:LOCAL_RANK, as accelerate launch numbers them) when there is one, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_model(name_or_path, dtype="float32", trust_remote_code=False, device=None, attention=""):
    """(model, tokenizer) from a Hub id, a local folder, or a GGUF file (dequantized by transformers), moved
    to `device` when one is given. A folder holding a LoRA adapter (adapter_config.json, as
    train_stepwise_dpo.py saves with LORA=true) loads its base model, then the adapter, merged in.
    `attention`: transformers' attn_implementation (eager, sdpa, ...); "" keeps the model's default."""
    import torch
    from transformers import AutoModelForCausalLM

    adapter = os.path.join(str(name_or_path), "adapter_config.json")
    if os.path.isfile(adapter):
        from peft import PeftModel

        with open(adapter) as f:
            base = json.load(f)["base_model_name_or_path"]
        model, tokenizer = load_model(base, dtype, trust_remote_code, device, attention)
        model = PeftModel.from_pretrained(model, str(name_or_path)).merge_and_unload()
        return model.eval(), tokenizer
    path, kwargs = _source(name_or_path, trust_remote_code)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    if "gguf_file" in kwargs:  # plain dense weights (trainable, saveable), never GGUF blocks left packed
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    if attention:
        kwargs["attn_implementation"] = attention
    # weights only from safetensors files (never unpickled); a GGUF file is its own format
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                 use_safetensors=None if "gguf_file" in kwargs else True, **kwargs)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def hub_revision(repo_id, cache_dir=None):
    """The commit of a Hub model as this machine holds it: the snapshot that the Hugging Face cache's ref
    points to, which from_pretrained has just updated (so offline too); None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, filename = (os.path.split(repo_id) if repo_id.endswith(".gguf") else (repo_id, "config.json"))
    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    except ValueError:  # not a Hub id either (a local path that does not exist)
        return None
    return os.path.basename(os.path.dirname(found)) if isinstance(found, str) else None


def fingerprint(path, cache_dir=None):
    """A short id of a model's weights, so that a cache never serves scores of a different checkpoint saved
    under the same name: for a local model, the size and the ends of each weight file; for a Hub id, the
    commit it resolved to (hub_revision), so an updated Hub model gets new scores."""
    files = []
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    elif os.path.isfile(path):
        files = [path]
    h = hashlib.sha256()
    if not os.path.exists(path):
        h.update(f"{path}@{hub_revision(str(path), cache_dir)}".encode())
    for f in files:
        size = os.path.getsize(f)
        h.update(f"{os.path.basename(f)}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read())
    return h.hexdigest()[:16]


def logits_at(model, rows, cols, **inputs):
    """Logits at the (rows, cols) positions only: the decoder runs on every token, the vocabulary projection
    only where it is read (with a 150k vocabulary the full logits of a batch take GBs). A model wrapped for
    distributed training (`.module`), or whose head does more than a linear map (logit soft-capping or
    scaling), takes the plain full-logits path."""
    if not hasattr(model, "module") and not any(getattr(model.config, a, None) for a in (
            "final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")):
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        if decoder is not None and head is not None:
            return head(decoder(**inputs).last_hidden_state[rows, cols])
    return model(**inputs).logits[rows, cols]


def growing_cache():
    """A KV cache for token-by-token decoding that appends in place: each layer's keys and values live in a
    buffer that doubles when full, and attention reads a view of its filled part. transformers' DynamicCache
    concatenates the whole cache with every new token, which is most of a tiny model's decoding time."""
    from transformers.cache_utils import Cache, DynamicLayer

    class GrowingLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.buffers, self.length = None, 0
            end = self.length + key_states.shape[-2]
            if self.buffers is None or end > self.buffers[0].shape[-2]:
                size = max(end, 2 * (self.buffers[0].shape[-2] if self.buffers else 32))
                grown = [x.new_empty((*x.shape[:2], size, x.shape[-1])) for x in (key_states, value_states)]
                for old, new in zip(self.buffers or (), grown):
                    new[:, :, : self.length] = old[:, :, : self.length]
                self.buffers = grown
            for buffer, x in zip(self.buffers, (key_states, value_states)):
                buffer[:, :, self.length: end] = x
            self.length = end
            self.keys, self.values = (buffer[:, :, :end] for buffer in self.buffers)
            return self.keys, self.values

        def batch_select_indices(self, indices):
            if self.is_initialized and self.buffers is not None:
                self.buffers = [buffer.index_select(0, indices) for buffer in self.buffers]
                self.keys, self.values = (buffer[:, :, : self.length] for buffer in self.buffers)

    return Cache(layer_class_to_replicate=GrowingLayer)


class Rows:
    """Token rows that grow by chunks of different lengths through one KV cache (decoding.decoder_for). feed()
    appends each row's chunk (right-padded: the padding is masked from every later token, and a row's
    positions count only its own tokens) and returns every row's next-token logits after its last token (a
    row fed nothing keeps the logits it had). The generative judge writes its checks on it."""

    def __init__(self, model, n_rows, pad_id):
        import torch

        from decoding import decoder_for

        self.pad_id, self.torch = pad_id, torch
        self.device = next(model.parameters()).device
        self.length = torch.zeros(n_rows, dtype=torch.long, device=self.device)
        self.decoder, self.logits, self.n_rows = decoder_for(model, n_rows), None, n_rows

    def select(self, rows):
        """Keep these rows (a list of indices, in this order; an index given twice copies its row)."""
        index = self.torch.tensor(rows, dtype=self.torch.long, device=self.device)
        self.decoder.select(index)
        self.length, self.n_rows = self.length[index], len(rows)
        self.logits = None if self.logits is None else self.logits[index]

    def feed(self, chunks):
        """chunks: a list of token ids per row, possibly empty. Returns the (rows, vocab) logits."""
        torch = self.torch
        width = max(map(len, chunks))
        if not width:
            return self.logits
        ids = torch.full((len(chunks), width), self.pad_id, dtype=torch.long)
        real = torch.zeros((len(chunks), width), dtype=torch.long)
        for r, chunk in enumerate(chunks):
            ids[r, : len(chunk)], real[r, : len(chunk)] = torch.tensor(chunk, dtype=torch.long), 1
        ids, real = ids.to(self.device), real.to(self.device)
        positions = self.length[:, None] + torch.arange(width, device=self.device)[None]
        fed = real.sum(1)
        hidden = self.decoder.forward(ids, positions, real)
        logits = self.decoder.logits(hidden[torch.arange(len(chunks), device=self.device), (fed - 1).clamp(min=0)])
        self.logits = logits if self.logits is None else torch.where((fed > 0)[:, None], logits, self.logits)
        self.length += fed
        return self.logits


# ----------------------------------------------------------------------------- sampling


def sample_seed(prompt_seed, j):
    """The seed of sample j of a prompt, the same for the local sampler and a served policy."""
    return prompt_seed * 1_000_003 + j


def _pick_tokens(logits, temperature, top_p, uniforms=None):
    """Next token per row: argmax when temperature is 0, else top-p sampling that turns one uniform number
    per row (drawn from that row's own generator, so that a row's sample does not depend on what else is in
    the batch) into a token."""
    import torch

    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if probs.device.type == "cpu":   # numpy's sort takes a third of torch's time here (the same sorted values)
        import numpy as np

        order = torch.from_numpy(np.argsort(-probs.detach().numpy(), axis=-1))
        sorted_probs = probs.gather(1, order)
    else:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
    cdf = sorted_probs.cumsum(-1)
    keep = (cdf - sorted_probs) < top_p           # always keeps the most likely token
    sorted_probs = sorted_probs * keep
    cdf = sorted_probs.cumsum(-1)
    idx = (cdf < (uniforms * cdf[:, -1])[:, None]).sum(-1).clamp(max=cdf.shape[1] - 1)
    return order.gather(1, idx[:, None]).squeeze(1)


def sample(model, tokenizer, prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=200, batch_size=64,
           seed=0, seeds=None, desc="sampling", progress=True):
    """n completions per prompt, as lists of strings (truncated after the final answer).

    Sample j of prompt i draws its uniform numbers from a generator seeded by sample_seed(seeds[i], j)
    (default seeds[i] = seed + i), one per generated token, so results do not depend on batch size or order.
    Left padding with explicit position ids, decoded by decoding.decoder_for. A row that has finished (EOS, or
    its final answer, checked every 16 tokens) stops writing; finished rows leave the batch and its KV cache
    once they are a quarter of it, so the rest run on fewer rows without copying the cache at every exit."""
    import torch
    from tqdm import tqdm

    from decoding import decoder_for

    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
    encoded = [encode(tokenizer, p) for p in prompts]
    jobs = sorted(((i, j) for i in range(len(prompts)) for j in range(n)), key=lambda ij: -len(encoded[ij[0]]))
    out = [[None] * n for _ in prompts]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(model.parameters()).device
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(
            sample_seed(seeds[i], j))) for i, j in batch]) if temperature > 0 else None
        ids, mask = left_pad([encoded[i] for i, _ in batch], pad)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generated = torch.full((len(batch), max_new_tokens), pad, dtype=torch.long)
        rows = torch.arange(len(batch))              # the batch index of each decoder row
        writing = torch.ones(len(batch), dtype=torch.bool)  # decoder rows still writing
        with torch.no_grad():
            decoder = decoder_for(model, len(batch))
            logits = decoder.logits(decoder.forward(ids, positions, mask)[:, -1:])[:, -1]
            one = torch.ones((len(batch), 1), dtype=torch.bool, device=device)
            for t in range(max_new_tokens):
                next_ids = _pick_tokens(logits.cpu(), temperature, top_p,
                                        uniforms[rows, t] if uniforms is not None else None)
                generated[rows[writing], t] = next_ids[writing]
                finished = writing & (next_ids == eos)
                if t % 16 == 15:  # a solution also ends at its final answer, whatever follows it
                    texts = tokenizer.batch_decode(generated[rows[writing], : t + 1], skip_special_tokens=True)
                    finished[writing.nonzero().squeeze(1)] |= torch.tensor([answer_finished(s) for s in texts])
                writing &= ~finished
                if not bool(writing.any()):
                    break
                # finished rows leave the batch and its KV cache once they are a quarter of it (each removal
                # copies the whole cache); until then they decode on unread
                if 4 * int((~writing).sum()) >= len(rows):
                    keep = writing.nonzero().squeeze(1)
                    rows, writing, next_ids, positions = rows[keep], writing[keep], next_ids[keep], positions[keep]
                    decoder.select(keep.to(device))
                positions = positions[:, -1:] + 1
                logits = decoder.logits(decoder.forward(next_ids[:, None].to(device), positions, one[: len(rows)]))[:, -1]
        for r, (i, j) in enumerate(batch):
            row = generated[r].tolist()
            row = row[: row.index(eos)] if eos in row else row
            out[i][j] = truncate_solution(tokenizer.decode(row, skip_special_tokens=True))
        bar.update(len(batch))
    bar.close()
    return out


# ----------------------------------------------------------------------------- policies


class LocalPolicy:
    """A transformers model as policy (local folder, Hub id or .gguf file)."""

    def __init__(self, spec, dtype="float32", trust_remote_code=False, batch_size=64):
        self.model, self.tokenizer = load_model(spec, dtype, trust_remote_code, default_device())
        self.batch_size, self.id = batch_size, f"{spec}@{fingerprint(spec)}"

    def sample(self, prompts, n, temperature, top_p, max_new_tokens, seeds):
        """n completions per prompt (lists of strings, cut after the final-answer line)."""
        return sample(self.model, self.tokenizer, prompts, n=n, temperature=temperature, top_p=top_p,
                      max_new_tokens=max_new_tokens, batch_size=self.batch_size, seeds=seeds, progress=False)


class ServerError(RuntimeError):
    """An OpenAI-compatible server could not answer after bounded retries, or refused the request."""


class PolicyError(ServerError):
    """A served policy could not sample after bounded retries."""


def completions_url(base_url):
    """The /v1/completions address of a server given by its base URL (with or without /v1)."""
    base = base_url.rstrip("/")
    return base + ("/completions" if base.endswith("/v1") else "/v1/completions")


class CompletionsClient:
    """POSTs to an OpenAI-compatible /v1/completions endpoint with bounded retries and exponential backoff
    (connection errors, timeouts, 429, 5xx and malformed replies are retried; other 4xx are not).
    `workers` requests run at once (a server such as vLLM batches them); results keep their order."""

    role, error = "server", ServerError

    def __init__(self, base_url, model_name="", api_key=None, timeout=30.0, retries=4, backoff=0.5, workers=1):
        self.url = completions_url(base_url)
        self.model_name, self.api_key = model_name, api_key
        self.timeout, self.retries, self.backoff, self.workers = timeout, retries, backoff, max(1, workers)
        self.id = f"{base_url}#{model_name}"

    def post(self, fields):
        """The parsed JSON reply to {"model": model_name, **fields}."""
        body = json.dumps({"model": self.model_name, **fields}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    reply = json.loads(resp.read().decode("utf-8"))
                if not isinstance(reply, dict) or not reply.get("choices"):
                    last = "reply has no choices"
                    continue
                return reply
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code != 429 and e.code < 500:
                    raise self.error(f"{self.role} {self.url} refused the request: {last}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                last = f"malformed JSON ({e})"
        raise self.error(f"{self.role} {self.url} failed after {self.retries + 1} tries: {last}")

    def map(self, fn, jobs):
        """[fn(job) for job in jobs], `workers` at once, in order."""
        if self.workers == 1 or len(jobs) < 2:
            return [fn(job) for job in jobs]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(fn, jobs))

    def post_all(self, requests):
        """Replies to a list of request bodies, in order."""
        return self.map(self.post, requests)


class HTTPPolicy(CompletionsClient):
    """A policy served behind an OpenAI-compatible /v1/completions endpoint (vLLM, llama.cpp server): one
    request per sample with its own seed (sample_seed, as the local sampler), so a rerun draws the same
    samples on a server that honours per-request seeds. Prompts arrive rendered (with the policy
    tokenizer's chat template when it has one) and are sent raw."""

    role, error = "policy server", PolicyError

    def __init__(self, base_url, model_name="", api_key=None, timeout=120.0, retries=4, backoff=0.5, workers=1):
        super().__init__(base_url, model_name, api_key, timeout, retries, backoff, workers)

    def sample(self, prompts, n, temperature, top_p, max_new_tokens, seeds):
        """n completions per prompt (lists of strings, cut after the final-answer line)."""
        requests = [{"prompt": p, "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                     "n": 1, "seed": sample_seed(s, j)} for p, s in zip(prompts, seeds) for j in range(n)]
        texts = [truncate_solution(r["choices"][0].get("text") or "") for r in self.post_all(requests)]
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def make_policy(spec, model_name="", tokenizer="", api_key=None, timeout=120.0, retries=4, workers=1,
                dtype="float32", trust_remote_code=False, batch_size=64):
    """(policy, tokenizer) from a spec: an http(s):// base URL (a served model; its tokenizer, for the chat
    template, is `tokenizer` or None) or a local folder / Hub id / .gguf file."""
    if spec.startswith(("http://", "https://")):
        tok = load_tokenizer(tokenizer, trust_remote_code) if tokenizer else None
        return HTTPPolicy(spec, model_name, api_key, timeout, retries, workers=workers), tok
    policy = LocalPolicy(spec, dtype, trust_remote_code, batch_size)
    return policy, policy.tokenizer
