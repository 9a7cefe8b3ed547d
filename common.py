"""Shared pieces: command-line overrides, atomic file output, the prompts, model loading and sampling.

Every prompt the pipeline shows a model is defined here once and imported everywhere else.
"""
import json
import os
import tempfile

# ----------------------------------------------------------------------------- config overrides


def parse_value(key, text, default):
    """Parse `text` as the type of `default`; a clear error otherwise."""
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise SystemExit(f"--{key} expects a boolean (true/false), got {text!r}")
    if isinstance(default, (int, float)):
        try:
            value = type(default)(text)
        except ValueError:
            raise SystemExit(f"--{key} expects {type(default).__name__}, got {text!r}") from None
        return value
    if isinstance(default, (list, tuple, dict)):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise SystemExit(f"--{key} expects JSON ({type(default).__name__}), got {text!r}") from None
        if not isinstance(value, (list, dict) if not isinstance(default, dict) else dict):
            raise SystemExit(f"--{key} expects a JSON {type(default).__name__}, got {text!r}")
        return type(default)(value) if isinstance(default, (list, tuple)) else value
    if default is None:
        return None if text.lower() in ("none", "null", "") else text
    return text


def config_from_argv(defaults, argv):
    """Resolved config: `defaults` (the script's UPPER_CASE tunables) overridden by `--KEY=value` args.
    An unknown key stops the script with the list of valid keys; a value of the wrong type, with the type
    the key expects."""
    cfg = dict(defaults)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"expected --KEY=value, got {arg!r}; valid keys: {', '.join(defaults)}")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise SystemExit(f"unknown key --{key}; valid keys: {', '.join(defaults)}")
        cfg[key] = parse_value(key, text, defaults[key])
    return cfg


# ----------------------------------------------------------------------------- file output


def atomic_write_text(path, text):
    """Write through a temporary file in the same folder and rename: readers never see half a file."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the permissions of a plainly created file, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path, rows):
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def print_json(obj):
    print(json.dumps(obj), flush=True)


def command_line(script, argv):
    """The command that produced a result, for the record: `python SCRIPT ARGS` (the same whether the
    script ran as a program or its main(argv) was called)."""
    return " ".join(["python", os.path.relpath(script)] + list(argv))


# ----------------------------------------------------------------------------- prompts
# Policy: a question in, a solution out (one step per line, then '#### <answer>').
POLICY_TEMPLATE = "Question: {question}\nAnswer:\n"
POLICY_INSTRUCTION = ("Solve the problem step by step. Write one step per line and end with a line "
                      "'#### <answer>'.\n\n{question}")

# Judge (GenRM, Zhang et al. 2024, arXiv 2408.15240): the prompt for step k is the prompt for step k-1
# plus step k plus a fixed question suffix, so that all steps of a solution can be scored in one pass.
# The score is P(Yes) / (P(Yes) + P(No)) for the next token.
JUDGE_HEADER = "Check the last step.\nQuestion: {question}\nSteps:\n"
JUDGE_STEP = "{step}\n"
JUDGE_SUFFIX = "Is the last step correct? Answer:"
JUDGE_YES, JUDGE_NO = "Yes", "No"

_SPLIT = "\u0000"


def chat_wrap(tokenizer):
    """(before, after) text around a user message in the tokenizer's chat template, ending with the
    assistant's turn opening; ('', '') without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return "", ""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SPLIT}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(_SPLIT)
    return before, after


def policy_prompt(tokenizer, question):
    if getattr(tokenizer, "chat_template", None):
        before, after = chat_wrap(tokenizer)
        return before + POLICY_INSTRUCTION.format(question=question) + after
    return POLICY_TEMPLATE.format(question=question)


def judge_segments(tokenizer, question, steps):
    """(head, [step texts], tail): the judge prompt for step k is head + ''.join(steps[:k]) + tail."""
    before, after = chat_wrap(tokenizer)
    head = before + JUDGE_HEADER.format(question=question)
    tail = JUDGE_SUFFIX + after
    return head, [JUDGE_STEP.format(step=s) for s in steps], tail


def judge_answer_text(tokenizer, correct):
    """The judge's target reply, as it follows the prompt: ' Yes' after a plain prompt, 'Yes' in a chat turn."""
    word = JUDGE_YES if correct else JUDGE_NO
    return word if getattr(tokenizer, "chat_template", None) else " " + word


# ----------------------------------------------------------------------------- models


def encode(tokenizer, text):
    """Token ids of `text`. Templates render their special tokens as text, so none are added here except a
    BOS the tokenizer asks for."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


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


def load_model(name_or_path, dtype="float32", trust_remote_code=False, device=None):
    """(model, tokenizer) from a Hub id, a local folder, or a GGUF file (dequantized by transformers), moved
    to `device` when one is given. A folder holding a LoRA adapter (adapter_config.json, as
    train_stepwise_dpo.py saves with LORA=true) loads its base model, then the adapter, merged in."""
    import torch
    from transformers import AutoModelForCausalLM

    adapter = os.path.join(str(name_or_path), "adapter_config.json")
    if os.path.isfile(adapter):
        from peft import PeftModel

        with open(adapter) as f:
            base = json.load(f)["base_model_name_or_path"]
        model, tokenizer = load_model(base, dtype, trust_remote_code, device)
        model = PeftModel.from_pretrained(model, str(name_or_path)).merge_and_unload()
        return model.eval(), tokenizer
    path, kwargs = _source(name_or_path, trust_remote_code)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    if "gguf_file" in kwargs:  # plain dense weights (trainable, saveable), never GGUF blocks left packed
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    # weights only from safetensors files (never unpickled); a GGUF file is its own format
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                 use_safetensors=None if "gguf_file" in kwargs else True, **kwargs)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


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


def truncate_solution(text):
    """Cut a generated solution after its '#### <answer>' line."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.strip().startswith("####"):
            return "\n".join(lines[: i + 1]).strip()
    return text.strip()


def _pick_tokens(logits, temperature, top_p, generators):
    """Next token per row: argmax when temperature is 0, else top-p sampling with one uniform draw per row
    from that row's own generator (so a row's sample does not depend on what else is in the batch)."""
    import torch

    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cdf = sorted_probs.cumsum(-1)
    keep = (cdf - sorted_probs) < top_p           # always keeps the most likely token
    sorted_probs = sorted_probs * keep
    cdf = sorted_probs.cumsum(-1)
    u = torch.stack([torch.rand((), generator=g) for g in generators]) * cdf[:, -1]
    idx = (cdf < u[:, None]).sum(-1).clamp(max=cdf.shape[1] - 1)
    return order.gather(1, idx[:, None]).squeeze(1)


def sample(model, tokenizer, prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=200, batch_size=64,
           seed=0, seeds=None, desc="sampling", progress=True):
    """n completions per prompt, as lists of strings (truncated after the final-answer line).

    Sample j of prompt i draws from a generator seeded by (seeds[i], j) (default seeds[i] = seed + i), so
    results do not depend on batch size or order. Left padding with explicit position ids."""
    import torch
    from tqdm import tqdm

    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
    encoded = [encode(tokenizer, p) for p in prompts]
    jobs = sorted(((i, j) for i in range(len(prompts)) for j in range(n)), key=lambda ij: -len(encoded[ij[0]]))
    out = [[None] * n for _ in prompts]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(model.parameters()).device
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        gens = [torch.Generator().manual_seed(seeds[i] * 1_000_003 + j) for i, j in batch]
        width = max(len(encoded[i]) for i, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (i, _) in enumerate(batch):
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generated = torch.full((len(batch), max_new_tokens), pad, dtype=torch.long)
        done = torch.zeros(len(batch), dtype=torch.bool)
        with torch.no_grad():
            result = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1)
            for t in range(max_new_tokens):
                next_ids = _pick_tokens(result.logits[:, -1].cpu(), temperature, top_p, gens)
                next_ids = torch.where(done, torch.full_like(next_ids, pad), next_ids)
                generated[:, t] = next_ids
                done |= next_ids == eos
                if t % 16 == 15:  # a solution also ends at its final-answer line, whatever follows it
                    texts = tokenizer.batch_decode(generated[:, : t + 1], skip_special_tokens=True)
                    done |= torch.tensor(["\n" in s[s.find("####"):] if "####" in s else False for s in texts])
                if bool(done.all()):
                    break
                mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=mask.dtype, device=device)], dim=1)
                positions = positions[:, -1:] + 1
                result = model(input_ids=next_ids[:, None].to(device), attention_mask=mask,
                               position_ids=positions, cache=result.cache, use_cache=True)
        for r, (i, j) in enumerate(batch):
            row = generated[r].tolist()
            row = row[: row.index(eos)] if eos in row else row
            out[i][j] = truncate_solution(tokenizer.decode(row, skip_special_tokens=True))
        bar.update(len(batch))
    bar.close()
    return out


# ----------------------------------------------------------------------------- judge packing
# All n step prompts of one solution in ONE sequence: [head, s1, t1, s2, t2, ..., sn, tn], where t is the
# fixed question suffix. Tail t_k sees head..s_k and itself; s_{k+1} does not see t_k; positions of t_k
# continue from s_k as in the separate prompt. The score of step k is read at the last token of t_k.


def answer_token_ids(tokenizer, word):
    """First-token ids of the spellings a model may use for `word` ('Yes', ' Yes', 'YES', 'yes', ...)."""
    ids = []
    for variant in (word, word.upper(), word.lower()):
        for text in (variant, " " + variant):
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            # a variant split into pieces counts by its first piece only when that piece is a real prefix
            # of the word ('Ye' for 'Yes'), not a lone letter shared with other words
            first = tokenizer.decode(tokens[:1]).strip() if tokens else ""
            if tokens and tokens[0] not in ids and (len(tokens) == 1 or len(first) >= 2):
                ids.append(tokens[0])
    return ids


def pack_judge(tokenizer, question, steps):
    """(input_ids, position_ids, groups, answer_index) lists for one solution. groups: 0 for the shared
    chain (head and steps), k+1 for the tokens of tail k."""
    head, step_texts, tail = judge_segments(tokenizer, question, steps)
    ids = encode(tokenizer, head)
    positions, groups, answer_index = list(range(len(ids))), [0] * len(ids), []
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    chain_end = len(ids)
    for k, text in enumerate(step_texts):
        step_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        positions += range(chain_end, chain_end + len(step_ids))
        ids += step_ids
        groups += [0] * len(step_ids)
        chain_end = positions[-1] + 1
        ids += tail_ids
        positions += range(chain_end, chain_end + len(tail_ids))
        groups += [k + 1] * len(tail_ids)
        answer_index.append(len(ids) - 1)
    return ids, positions, groups, answer_index


def packed_batch(packs, pad_id, dtype=None):
    """Right-padded tensors and the 4D additive mask (batch, 1, L, L): 0 where visible, dtype-min where
    hidden. A boolean 4D mask is not used because eager attention does not reproduce separate forwards
    with it."""
    import torch

    dtype = dtype or torch.float32
    width = max(len(p[0]) for p in packs)
    ids = torch.full((len(packs), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(packs), width), dtype=torch.long)
    grp = torch.full((len(packs), width), -1, dtype=torch.long)  # padding is its own group
    for r, (x, p, g, _) in enumerate(packs):
        ids[r, : len(x)], pos[r, : len(x)], grp[r, : len(x)] = torch.tensor(x), torch.tensor(p), torch.tensor(g)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    visible = causal & ((grp[:, None, :] == 0) | (grp[:, None, :] == grp[:, :, None]))
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return ids, pos, mask[:, None]
