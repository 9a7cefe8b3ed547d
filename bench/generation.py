"""Generation speed: our sampler (models.sample) against transformers' model.generate on the same prompts.

    python bench/generation.py               # -> results/bench/generation.json

Both run in this process on the same prompts (bundled test questions in the policy's prompt), the same
model and batch size, and alternate REPEATS times; each one's fastest time counts. Greedy: both must write
token-for-token the same solutions (asserted), so the comparison is of the same work. Sampled (temperature
0.7): the tokens differ (each of our rows draws from its own seeded generator), so tokens per second is
compared. A row records the generated tokens per second of each, the speedup, and the share of each one's
time spent outside the model's forward (ForwardClock). Models: the bundled
policy and a randomly initialised ~30M-parameter Llama-style model with the same tokenizer (speed does not
depend on the weights). A solution ends at EOS or at its final answer, checked every 16 tokens, for both:
model.generate gets a StoppingCriteria that checks the same way (prompts.answer_finished).
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import atomic_write_json, command_line, config_from_argv, print_json  # noqa: E402
from data_utils import load_problems  # noqa: E402
from decoding import LlamaDecoder  # noqa: E402
from models import load_model, sample  # noqa: E402
from prompts import answer_finished, encode, policy_prompt, truncate_solution  # noqa: E402

# ----------------------------------------------------------------------------- tunables
POLICY = "models/policy"
TEST_FILE = "data/test.jsonl"
OUT_FILE = "results/bench/generation.json"
N_PROMPTS = {"bundled": 256, "llama-30M": 64}   # prompts per model
BATCHES = {"bundled": [64, 256], "llama-30M": [64]}  # rows per batch, for both (64: the pipeline's batch size)
MAX_NEW_TOKENS = 200
TEMPERATURE = 0.7
REPEATS = 2               # best of REPEATS timings
THREADS = 2
CONFIG_KEYS = [k for k in list(globals()) if k.isupper()]


class ForwardClock:
    """Seconds spent inside the models' forward computation: every call of a model's top module (hooks), and
    of our decoder's forward and output head (decoding.LlamaDecoder, which runs the model's layers itself)."""

    def __init__(self, models):
        self.seconds, self.start = 0.0, None
        for model in models:
            model.register_forward_pre_hook(lambda *_: setattr(self, "start", time.perf_counter()))
            model.register_forward_hook(lambda *_: self.stop())
        for name in ("forward", "logits"):
            setattr(LlamaDecoder, name, self.timed(getattr(LlamaDecoder, name)))

    def stop(self):
        self.seconds += time.perf_counter() - self.start

    def timed(self, fn):
        def wrapper(*args, **kwargs):
            self.start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.stop()
            return out
        return wrapper


def ours(model, tokenizer, prompts, batch, temperature, max_new_tokens):
    return sample(model, tokenizer, prompts, n=1, temperature=temperature, max_new_tokens=max_new_tokens,
                  batch_size=batch, seed=0, progress=False)


def answer_stop(tokenizer, prompt_width):
    """A StoppingCriteria for model.generate: a row is done at its final answer, checked every 16 tokens, as
    our sampler checks (EOS it handles itself)."""
    import transformers

    class AnswerStop(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            written = input_ids.shape[1] - prompt_width
            if written % 16:
                return torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
            texts = tokenizer.batch_decode(input_ids[:, prompt_width:], skip_special_tokens=True)
            return torch.tensor([answer_finished(t) for t in texts], device=input_ids.device)

    return transformers.StoppingCriteriaList([AnswerStop()])


def theirs(model, tokenizer, prompts, batch, temperature, max_new_tokens):
    """model.generate, left-padded batches in the same order as ours (longest prompts first)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(encode(tokenizer, prompts[i])))
    out = [None] * len(prompts)
    tokenizer.padding_side = "left"
    for start in range(0, len(order), batch):
        index = order[start:start + batch]
        enc = tokenizer([prompts[i] for i in index], return_tensors="pt", padding=True, add_special_tokens=False)
        kwargs = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature else \
            {"do_sample": False}
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id,
                             stopping_criteria=answer_stop(tokenizer, enc["input_ids"].shape[1]), **kwargs)
        for i, row in zip(index, ids[:, enc["input_ids"].shape[1]:].tolist()):
            out[i] = [truncate_solution(tokenizer.decode(row, skip_special_tokens=True))]
    return out


def tokens_of(tokenizer, texts):
    """Generated tokens of solutions cut after their final-answer line, EOS counted as one."""
    return sum(len(tokenizer(t[0], add_special_tokens=False)["input_ids"]) + 1 for t in texts)


def measure(cfg, name, model, clock, tokenizer, prompts, batch, temperature):
    """One row: both systems on the same prompts, alternating REPEATS times, each one's fastest run."""
    timing, outputs = {"ours": [], "generate": []}, {}
    for _ in range(cfg["REPEATS"]):
        for system, fn in (("ours", ours), ("generate", theirs)):
            clock.seconds = 0.0
            t = time.perf_counter()
            with torch.no_grad():
                outputs[system] = fn(model, tokenizer, prompts, batch, temperature, cfg["MAX_NEW_TOKENS"])
            timing[system].append((time.perf_counter() - t, clock.seconds))
    if not temperature:
        assert outputs["ours"] == outputs["generate"], "greedy outputs differ"
    row = {"model": name, "temperature": temperature, "prompts": len(prompts), "batch": batch}
    for system in ("ours", "generate"):
        seconds, in_forward = min(timing[system])
        row[f"{system}_tokens_per_s"] = round(tokens_of(tokenizer, outputs[system]) / seconds, 1)
        row[f"{system}_outside_forward"] = round(1 - in_forward / seconds, 3)
    row["speedup"] = round(row["ours_tokens_per_s"] / row["generate_tokens_per_s"], 2)
    print_json(row)
    return row


def main(argv):
    cfg = config_from_argv({k: globals()[k] for k in CONFIG_KEYS}, argv)
    torch.set_num_threads(cfg["THREADS"])
    policy, tokenizer = load_model(cfg["POLICY"])
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    big = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, num_hidden_layers=9,
                                       num_attention_heads=8, num_key_value_heads=8, intermediate_size=1408,
                                       max_position_embeddings=2048, tie_word_embeddings=True,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()
    problems = load_problems(cfg["TEST_FILE"])
    rows, clock = [], ForwardClock([policy, big])
    for name, model in (("bundled", policy), ("llama-30M", big)):
        prompts = [policy_prompt(tokenizer, p["question"]) for p in problems[: cfg["N_PROMPTS"][name]]]
        for batch in cfg["BATCHES"][name]:
            for temperature in (0.0, cfg["TEMPERATURE"]):
                rows.append(measure(cfg, name, model, clock, tokenizer, prompts, batch, temperature))
    atomic_write_json(cfg["OUT_FILE"], {"rows": rows, "max_new_tokens": cfg["MAX_NEW_TOKENS"],
                                        "threads": cfg["THREADS"], "device": "cpu", "torch": torch.__version__,
                                        "command": command_line(__file__, argv)})


if __name__ == "__main__":
    main(sys.argv[1:])
