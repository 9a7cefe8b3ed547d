"""Build the bundled tiny models from scratch: a tokenizer, a policy and a step judge.

    python sft.py                       # builds models/{policy,judge} unless they are already up to date
    python sft.py --FORCE=true          # rebuild anyway
    python sft.py --BUILD=policy        # only one of them

The tokenizer is a byte-level BPE trained on the bundled data, with digits split one by one (so numbers are
spelled digit by digit, which is what lets a tiny model do arithmetic). Both models are small Llama-style
decoders saved as standard Hugging Face folders (config.json, model.safetensors, tokenizer files) that
AutoModelForCausalLM / AutoTokenizer load as they are.

- The policy is fine-tuned on a deliberately small gold set (SFT_GOLD_SIZE problems): it solves part of
  the test set, which leaves preference optimization room to help, and the rest of the training problems
  reach training only through the policy's own samples and the judge.
- The judge is trained GenRM-style (Zhang et al. 2024, arXiv 2408.15240) to answer the judge prompt from
  prompts.py with Yes/No, on gold solutions, on automatically corrupted ones (task.corrupt_solution)
  and on the policy's own samples of gold-set problems, all labelled by the programmatic checker. In check
  mode (the default) it first writes a check of each step (GenRM-CoT), in three phases: arithmetic drills
  (JUDGE_DRILL_STEPS), checks (JUDGE_STEPS), then a short warm restart at a low lr with more planted errors
  (JUDGE_POLISH_STEPS). A one-pass judge can also learn to write gold solutions (JUDGE_SFT_BATCH).
  It learns from every training problem except the pairs pool (JUDGE_HELD_OUT) and never from the test
  set, so no label it learned from belongs to a problem whose samples it later judges.

Each model folder keeps build_config.json; a build whose config matches it is skipped.
"""
import json
import math
import os
import random
import sys
import time

import torch

from common import atomic_write_json, command_line, config_from_argv, file_sha256, print_json
from data_utils import PAIRS_POOL, POLICY_GOLD, join_solution, load_problems, split_steps
from task import check_text, corrupt_solution, drill_equation, label_steps
from models import fingerprint, load_model, sample
from prompts import (ANSWER_CUE, CHECK_CUE, check_answer, check_head, check_step, encode, judge_answer_text,
                     judge_segments, pack_judge, packed_batch, policy_prompt)

# ----------------------------------------------------------------------------- tunables
TRAIN_FILE = "data/train.jsonl"
MODELS_DIR = "models"
BUILD = "both"            # policy | judge | both
FORCE = False             # rebuild even when build_config.json matches
SEED = 0
THREADS = 2               # torch CPU threads
# tokenizer
VOCAB_SIZE = 512
# policy: Llama-style decoder
POLICY_HIDDEN = 192
POLICY_LAYERS = 4
POLICY_HEADS = 6
POLICY_MLP = 512
SFT_GOLD_SIZE = POLICY_GOLD[1]  # gold solutions the policy is trained on (the first ones of TRAIN_FILE)
POLICY_STEPS = 800        # optimizer steps
POLICY_BATCH = 32
POLICY_LR = 1e-3
# judge: a separate decoder (same shape by default; larger ones are slow to build on 2 CPU cores)
JUDGE_HIDDEN = 192
JUDGE_LAYERS = 4
JUDGE_HEADS = 6
JUDGE_MLP = 512
JUDGE_STEPS = 1800
JUDGE_BATCH = 32
JUDGE_LR = 1e-3
CORRUPT_PROB = 0.5        # share of gold-derived judge examples drawn from a corrupted solution
SAMPLE_PROB = 0.5         # share of judge examples drawn from the policy's own samples (below)
JUDGE_SAMPLE_PROBLEMS = 2000  # policy samples of the first problems (inside the policy's gold set, so
JUDGE_SAMPLE_K = 4            # disjoint from the pairs pool of reward_model.py) labelled by the checker
JUDGE_SAMPLE_TEMPERATURE = 0.7
JUDGE_SFT_BATCH = 0       # gold solutions per step the judge also learns to write (GenRM's joint training; a one-pass
                          # judge needs its dense next-token signal, a checking judge has its checks and drills)
JUDGE_HELD_OUT = list(PAIRS_POOL)  # [first, end) of the training problems the judge never learns from
JUDGE_MODE = "check"      # check: it learns to write a check of each step before its answer (GenRM-CoT); the
                          # checks in its training data are written from the reference solution (task.check_text)
                          # one_pass: it learns to answer right after each step
JUDGE_MAX_LEN = 768       # tokens of one judge example (a checked solution is about 2.5 times the solution)
JUDGE_ANSWER_WEIGHT = 20.0  # check mode: loss weight of the Yes/No answer against a token of the check (the answer
                            # is one token in twenty; unweighted, it learned to agree with almost every step)
JUDGE_DRILL_STEPS = 2000  # check mode: steps of arithmetic drills alone before the checks ('Check: 34 + 12 = 46',
JUDGE_DRILL_BATCH = 16    # the result learned; task.drill_equation), and drill sequences per step in both phases:
DRILL_LINES = 16          # the computation its checks make, as a dense target; drills per sequence
JUDGE_POLISH_STEPS = 600  # then a warm restart at a low lr (the judge measured under-trained after JUDGE_STEPS,
JUDGE_POLISH_LR = 2e-4    # docs/LOG.md 2026-12-03), with its own draws (SEED + 3), no drills (the sums are learned
JUDGE_POLISH_CORRUPT = 0.8  # by then) and more planted errors: the steps after an error are where it is weakest
# shared optimizer details
WARMUP_STEPS = 50
WEIGHT_DECAY = 0.01
MAX_LEN = 320             # tokens; longer examples are dropped
CONFIG_KEYS = [k for k in list(globals()) if k.isupper()]

SPECIAL = {"eos": "<|endoftext|>", "pad": "<|pad|>"}


def train_tokenizer(texts, vocab_size, max_len=MAX_LEN):
    """Byte-level BPE with single-digit pre-splitting, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # words keep their leading space (' apples'), each digit is its own piece (' 4', '7' for ' 47')
    pieces = Regex(r" ?\d| ?[A-Za-z]+| ?[^\sA-Za-z\d]+|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(pieces, behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                          use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"],
                                   bos_token=SPECIAL["eos"], model_max_length=max_len)


def tokenizer_corpus(problems):
    """Questions and solutions as the models see them, plus the prompt scaffolding and the judge's two
    answers often enough for BPE to give each answer word a single token."""
    texts = [p["question"] for p in problems] + [join_solution(*split_steps(p["answer"], strip_calc=True))
                                                 for p in problems]
    head, _, tail = judge_segments(None, "x", [])
    return texts + [policy_prompt(None, "x"), head + tail + judge_answer_text(None, True),
                    head + tail + judge_answer_text(None, False)] * 500


def with_answer_tokens(tokenizer, mode="one_pass"):
    """The judge's tokenizer: the shared one plus, as single tokens where BPE did not already make them so,
    the judge's two answers (a reply must be one token for P(Yes) / (P(Yes) + P(No)) to be read directly)
    and, for the generative judge, its two cues (each check then ends on one token)."""
    import copy

    from tokenizers import AddedToken

    words = [judge_answer_text(tokenizer, ok) for ok in (True, False)]
    words += [CHECK_CUE, ANSWER_CUE] if mode == "check" else []
    if all(len(encode(tokenizer, w)) == 1 for w in words):
        return tokenizer
    judge_tokenizer = copy.deepcopy(tokenizer)
    judge_tokenizer.add_tokens([AddedToken(w, normalized=False, single_word=False) for w in words])
    return judge_tokenizer


def make_model(tokenizer, hidden, layers, heads, mlp, seed, max_len=MAX_LEN):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=mlp,
                         max_position_embeddings=max_len * 2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def policy_example(tokenizer, question, steps, final):
    """(input_ids, labels): the prompt is masked out of the loss; the solution ends with EOS."""
    prompt = encode(tokenizer, policy_prompt(tokenizer, question))
    solution = encode(tokenizer, join_solution(steps, final)) + [tokenizer.eos_token_id]
    return prompt + solution, [-100] * len(prompt) + solution


def judge_example(tokenizer, question, steps, labels):
    """One packed sequence holding the judge prompt of every step (prompts.pack_judge) and the Yes/No
    answer token expected at the end of each."""
    pack = pack_judge(tokenizer, question, steps)
    targets = [encode(tokenizer, judge_answer_text(tokenizer, ok))[0] for ok in labels]
    return pack, targets


def check_example(tokenizer, question, steps, labels, checks):
    """(input_ids, labels) of one verification written out in full, as the generative judge writes it: the
    head and each step are read (masked out of the loss); each check, the answer cue and the answer are
    learned. Tokenized piece by piece, as the judge's text is fed at judging time."""
    ids = encode(tokenizer, check_head(tokenizer, question))
    targets = [-100] * len(ids)
    for step, ok, check in zip(steps, labels, checks):
        read = tokenizer(check_step(step), add_special_tokens=False)["input_ids"]
        written = tokenizer(check + ANSWER_CUE, add_special_tokens=False)["input_ids"]
        written += tokenizer(check_answer(ok), add_special_tokens=False)["input_ids"]
        ids += read + written
        targets += [-100] * len(read) + written
    return ids, targets


def drill_example(tokenizer, rng, lines):
    """(input_ids, labels) of `lines` arithmetic drills written as checks ('Check: 34 + 12 = 46'), only the
    results learned: the computation a check makes, on equations of the task's ranges (task.drill_equation)."""
    ids, targets = [], []
    for _ in range(lines):
        lhs, result = drill_equation(rng).split(" = ")
        read = tokenizer(CHECK_CUE + f" {lhs} =", add_special_tokens=False)["input_ids"]
        written = tokenizer(f" {result}\n", add_special_tokens=False)["input_ids"]
        ids += read + written
        targets += [-100] * len(read) + written
    return ids, targets


def collate(examples, pad_id):
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, (x, y) in enumerate(examples):
        ids[r, : len(x)], labels[r, : len(y)], mask[r, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, mask, labels


def length_grouped_batches(examples, batch_size, rng, pool=8):
    """Endless batches, each of examples of similar length (less padding): shuffle, sort within pools of
    `pool` batches, shuffle the batches."""
    while True:
        order = rng.sample(examples, len(examples))
        batches = []
        for start in range(0, len(order) - batch_size + 1, batch_size * pool):
            chunk = sorted(order[start:start + batch_size * pool], key=lambda e: len(e[0]))
            batches += [chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
        rng.shuffle(batches)
        yield from batches


def train_lm(model, batch_loss, steps, lr, warmup, weight_decay, desc):
    """A plain AdamW loop with linear warm-up and cosine decay to 10%; `batch_loss(model, step)` draws a
    batch and returns its loss. Returns the loss curve."""
    from tqdm import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc)
    for step in bar:
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        loss = batch_loss(model, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    model.eval()
    return losses


def save_model(model, tokenizer, out_dir, build_config, losses):
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    atomic_write_json(os.path.join(out_dir, "train_log.json"), {"loss": [round(x, 5) for x in losses]})
    atomic_write_json(os.path.join(out_dir, "build_config.json"), build_config)  # written last: marks done


def up_to_date(out_dir, build_config):
    path = os.path.join(out_dir, "build_config.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        saved = json.load(f)
    volatile = ("command", "build_seconds")
    return ({k: v for k, v in saved.items() if k not in volatile}
            == {k: v for k, v in build_config.items() if k not in volatile})


def build_policy(cfg, tokenizer, problems):
    rng = random.Random(cfg["SEED"])
    gold = [split_steps(p["answer"], strip_calc=True) for p in problems[: cfg["SFT_GOLD_SIZE"]]]
    examples = [policy_example(tokenizer, p["question"], steps, final)
                for p, (steps, final) in zip(problems, gold)]
    examples = [e for e in examples if len(e[0]) <= cfg["MAX_LEN"]]
    model = make_model(tokenizer, cfg["POLICY_HIDDEN"], cfg["POLICY_LAYERS"], cfg["POLICY_HEADS"],
                       cfg["POLICY_MLP"], cfg["SEED"], cfg["MAX_LEN"])

    batches = length_grouped_batches(examples, cfg["POLICY_BATCH"], rng)

    def batch_loss(model, step):
        ids, mask, labels = collate(next(batches), tokenizer.pad_token_id)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    losses = train_lm(model, batch_loss, cfg["POLICY_STEPS"], cfg["POLICY_LR"], cfg["WARMUP_STEPS"],
                      cfg["WEIGHT_DECAY"], "policy SFT")
    return model, losses, tokenizer


def policy_samples(cfg, problems):
    """(problem, steps) of the policy's samples of the first JUDGE_SAMPLE_PROBLEMS problems: the errors a
    judge must catch are the policy's own, which corrupted gold solutions only imitate."""
    n = min(cfg["JUDGE_SAMPLE_PROBLEMS"], cfg["SFT_GOLD_SIZE"])
    if not n or not cfg["JUDGE_SAMPLE_K"]:
        return []
    policy, tokenizer = load_model(os.path.join(cfg["MODELS_DIR"], "policy"))
    texts = sample(policy, tokenizer, [policy_prompt(tokenizer, p["question"]) for p in problems[:n]],
                   n=cfg["JUDGE_SAMPLE_K"], temperature=cfg["JUDGE_SAMPLE_TEMPERATURE"], seed=cfg["SEED"] + 7,
                   desc="policy samples for the judge")
    return [(p, steps) for p, group in zip(problems, texts) for steps in (split_steps(t)[0] for t in group) if steps]


def build_judge(cfg, tokenizer, problems):
    rng = random.Random(cfg["SEED"] + 1)
    first, end = cfg["JUDGE_HELD_OUT"]
    problems = problems[:first] + problems[end:]
    parsed = [(p, *split_steps(p["answer"], strip_calc=True)) for p in problems]
    gold_steps = {p["question"]: steps for p, steps, _ in parsed}
    samples = policy_samples(cfg, problems)
    n_wrong = sum(not all(label_steps(p["answer"], steps)) for p, steps in samples)
    print_json({"judge_policy_samples": len(samples), "with_a_wrong_step": n_wrong})
    checks = cfg["JUDGE_MODE"] == "check"
    tokenizer = with_answer_tokens(tokenizer, cfg["JUDGE_MODE"])
    answers = torch.tensor([tokenizer(check_answer(ok), add_special_tokens=False)["input_ids"][0] for ok in (True, False)])

    def example(p, steps):
        labels = label_steps(p["answer"], steps)
        if checks:
            gold = gold_steps[p["question"]]
            return check_example(tokenizer, p["question"], steps, labels,
                                 [check_text(gold, k, s) for k, s in enumerate(steps)])
        return judge_example(tokenizer, p["question"], steps, labels)

    phase = {"corrupt": cfg["CORRUPT_PROB"], "drills": checks and cfg["JUDGE_DRILL_BATCH"]}

    def draw():
        """A judge example: a policy sample, else a gold solution, corrupted with probability phase["corrupt"]."""
        if samples and rng.random() < cfg["SAMPLE_PROB"]:
            return example(*rng.choice(samples))
        p, steps, final = rng.choice(parsed)
        if rng.random() < phase["corrupt"]:
            steps, final, _ = corrupt_solution(steps, final, rng, p["question"])
        return example(p, steps)

    gold = [policy_example(tokenizer, p["question"], steps, final) for p, steps, final in parsed]
    solutions = length_grouped_batches([e for e in gold if len(e[0]) <= cfg["MAX_LEN"]],
                                       max(1, cfg["JUDGE_SFT_BATCH"]), rng)
    model = make_model(tokenizer, cfg["JUDGE_HIDDEN"], cfg["JUDGE_LAYERS"], cfg["JUDGE_HEADS"],
                       cfg["JUDGE_MLP"], cfg["SEED"] + 1, cfg["JUDGE_MAX_LEN"])

    def batch_loss(model, step):
        batch = []
        while len(batch) < cfg["JUDGE_BATCH"]:
            ex = draw()
            if len(ex[0]) <= cfg["JUDGE_MAX_LEN"]:
                batch.append(ex)
        if checks:
            ids, mask, labels = collate(batch, tokenizer.pad_token_id)
            logits, targets = model(input_ids=ids, attention_mask=mask).logits[:, :-1], labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                                       reduction="none").view(targets.shape)
            weights = (targets != -100) * (1 + (cfg["JUDGE_ANSWER_WEIGHT"] - 1) * torch.isin(targets, answers))
            loss = (losses * weights).sum() / weights.sum()
        else:
            ids, pos, mask = packed_batch([p for p, _ in batch], tokenizer.pad_token_id)
            rows = torch.tensor([r for r, (p, _) in enumerate(batch) for _ in p[3]])
            cols = torch.tensor([i for p, _ in batch for i in p[3]])
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[rows, cols]
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor([t for _, ts in batch for t in ts]))
        if cfg["JUDGE_SFT_BATCH"]:
            ids, mask, labels = collate(next(solutions), tokenizer.pad_token_id)
            loss = loss + model(input_ids=ids, attention_mask=mask, labels=labels).loss
        return loss + drill_loss(model) if phase["drills"] else loss

    def drill_loss(model):
        drills = [drill_example(tokenizer, rng, cfg["DRILL_LINES"]) for _ in range(cfg["JUDGE_DRILL_BATCH"])]
        ids, mask, labels = collate(drills, tokenizer.pad_token_id)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    losses = []
    if checks and cfg["JUDGE_DRILL_STEPS"]:
        losses += train_lm(model, lambda model, step: drill_loss(model), cfg["JUDGE_DRILL_STEPS"], cfg["JUDGE_LR"],
                           cfg["WARMUP_STEPS"], cfg["WEIGHT_DECAY"], "judge: arithmetic drills")
    losses += train_lm(model, batch_loss, cfg["JUDGE_STEPS"], cfg["JUDGE_LR"], cfg["WARMUP_STEPS"],
                       cfg["WEIGHT_DECAY"], "judge")
    if cfg["JUDGE_POLISH_STEPS"]:
        rng.seed(cfg["SEED"] + 3)   # the same draws whatever the phases before drew
        phase.update(corrupt=cfg["JUDGE_POLISH_CORRUPT"], drills=False)
        losses += train_lm(model, batch_loss, cfg["JUDGE_POLISH_STEPS"], cfg["JUDGE_POLISH_LR"], cfg["WARMUP_STEPS"],
                           cfg["WEIGHT_DECAY"], "judge: polish")
    return model, losses, tokenizer


POLICY_KEYS = ["VOCAB_SIZE", "POLICY_HIDDEN", "POLICY_LAYERS", "POLICY_HEADS", "POLICY_MLP", "SFT_GOLD_SIZE",
               "POLICY_STEPS", "POLICY_BATCH", "POLICY_LR"]
JUDGE_KEYS = ["VOCAB_SIZE", "JUDGE_HIDDEN", "JUDGE_LAYERS", "JUDGE_HEADS", "JUDGE_MLP", "JUDGE_STEPS",
              "JUDGE_BATCH", "JUDGE_LR", "CORRUPT_PROB", "JUDGE_SFT_BATCH", "SAMPLE_PROB", "JUDGE_SAMPLE_PROBLEMS",
              "JUDGE_SAMPLE_K", "JUDGE_SAMPLE_TEMPERATURE", "JUDGE_HELD_OUT", "JUDGE_MODE", "JUDGE_MAX_LEN",
              "JUDGE_ANSWER_WEIGHT", "JUDGE_DRILL_STEPS", "JUDGE_DRILL_BATCH", "DRILL_LINES", "JUDGE_POLISH_STEPS",
              "JUDGE_POLISH_LR", "JUDGE_POLISH_CORRUPT"]
SHARED_KEYS = ["TRAIN_FILE", "SEED", "WARMUP_STEPS", "WEIGHT_DECAY", "MAX_LEN"]


def main(argv):
    cfg = config_from_argv({k: globals()[k] for k in CONFIG_KEYS}, argv)
    torch.set_num_threads(cfg["THREADS"])
    problems = load_problems(cfg["TRAIN_FILE"])
    data_hash = file_sha256(cfg["TRAIN_FILE"])
    targets = [t for t in ("policy", "judge") if cfg["BUILD"] in (t, "both")]
    if not targets:
        raise SystemExit(f"--BUILD must be policy, judge or both, got {cfg['BUILD']!r}")
    plans = {}
    for name in targets:
        keys = SHARED_KEYS + (POLICY_KEYS if name == "policy" else JUDGE_KEYS)
        build_config = {k: cfg[k] for k in keys} | {"data_sha256": data_hash, "command": command_line(__file__, argv)}
        out_dir = os.path.join(cfg["MODELS_DIR"], name)
        if name == "judge":  # the judge learns from the policy's samples
            build_config["policy_fingerprint"] = fingerprint(os.path.join(cfg["MODELS_DIR"], "policy"))
        if not cfg["FORCE"] and "policy" not in plans and up_to_date(out_dir, build_config):
            print_json({"model": out_dir, "status": "up to date, skipped (--FORCE=true rebuilds)"})
        else:
            plans[name] = (out_dir, build_config)
    if not plans:
        return
    tokenizer = train_tokenizer(tokenizer_corpus(problems), cfg["VOCAB_SIZE"], cfg["MAX_LEN"])
    for name, (out_dir, build_config) in plans.items():
        t0 = time.time()
        builder = build_policy if name == "policy" else build_judge
        if name == "judge":
            build_config["policy_fingerprint"] = fingerprint(os.path.join(cfg["MODELS_DIR"], "policy"))
        model, losses, model_tokenizer = builder(cfg, tokenizer, problems)
        build_config["build_seconds"] = round(time.time() - t0, 1)
        save_model(model, model_tokenizer, out_dir, build_config, losses)
        n_params = sum(p.numel() for p in model.parameters())
        print_json({"model": out_dir, "params": n_params, "seconds": build_config["build_seconds"],
                    "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4)})


if __name__ == "__main__":
    main(sys.argv[1:])
