"""Train the policy on judged preference pairs with StepwiseDPOTrainer (a transformers.Trainer subclass).

    python train_stepwise_dpo.py                                    # Step-DPO on reward_model.py's pairs
    python train_stepwise_dpo.py --MODE=weighted --DATA=results/reference/round1/judged/full_pairs.jsonl
    accelerate launch --multi_gpu --num_processes 2 train_stepwise_dpo.py   # DDP (gloo on a CPU-only machine)

Loss modes, with implicit rewards h = beta * (log pi(y) - log pi_ref(y)) (Rafailov et al. 2023, eq. 7):
- step: Step-DPO (Lai et al. 2024, arXiv 2406.18629). Only the chosen and rejected step tokens are scored,
  after the shared prompt and judge-accepted prefix; no EOS follows an intermediate step.
- weighted: whole solutions; the log-ratio of each step is weighted by the judge: chosen step t by
  a_t = s_t / mean(s), rejected step t by b_t = (1 - s_t) / mean(1 - s), so good chosen steps and bad
  rejected steps count most, and equal scores give exactly plain DPO.
- outcome: plain DPO on whole solutions (the baseline).
Options: NLL on chosen tokens (RPO, Pang et al. 2024, arXiv 2404.19733), DPO-Positive (Pal et al. 2024,
arXiv 2402.13228, eq. 3), IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17), LoRA through peft.

Non-standard on purpose: the reference log-probs are computed once before training (exact, since the
reference is frozen) and cached on disk, so no reference model is kept in memory; chosen and rejected share
one forward over [prompt, chosen, rejected] (prefix sharing) and short pairs share a row (batching.py).

Writes OUT_DIR/config.json, metrics.jsonl (one line per logging step), loss/margin/accuracy plots,
summary.json, checkpoints (checkpoint-N/) and the final model (model/), all in Hugging Face format.
"""
import dataclasses
import hashlib
import json
import os
import random
import sys

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from batching import collate, precompute_reference, sequence_logps
from common import atomic_write_json, atomic_write_text, command_line, config_from_argv, print_json
from data_utils import last_boxed, load_pairs, split_steps
from models import default_device, fingerprint, load_model
from prompts import FINAL_MARK, encode, policy_prompt

# ----------------------------------------------------------------------------- tunables
MODEL = "models/policy"           # starting policy (also the reference): folder, Hub id or .gguf
DATA = "results/reference/round1/judged/step_pairs.jsonl"  # Math-Step-DPO-10K rows, full_pairs rows, or TRL's {prompt,
                                  # chosen, rejected} (outcome); a JSONL, JSON, parquet file or hf: spec (sources.py)
EVAL_DATA = ""                    # held-out pairs of the same shape for the eval loss ("" = none; see TRAINER_ARGS)
MODE = "step"                     # step | weighted | outcome
ANSWER_STYLE = "gsm8k"            # the final answer a chat-template policy is asked for: gsm8k (#### x) | boxed
OUT_DIR = "results/reference/round1/train"
LOSS = "sigmoid"                  # sigmoid (DPO) | ipo | cpo (reference-free) | sft (NLL_WEIGHT x chosen NLL only:
                                  # the SFT control)
BETA = 0.1                        # chosen on validation problems, 0.1 > 0.3 on 2 seeds (docs/LOG.md, recipe sweep)
NLL_WEIGHT = 1.0                  # RPO: weight of the mean NLL of chosen tokens
DPOP_LAMBDA = 50.0                # DPO-Positive penalty weight (0 = off); step pairs differ in a token or two
LR = 5e-5
EPOCHS = 2
MAX_STEPS = -1                    # stop after this many optimizer steps (-1 = run all EPOCHS)
BATCH_SIZE = 32                   # per device
GRAD_ACCUM = 1
WARMUP_RATIO = 0.1                # share of optimizer steps spent warming up the learning rate
WEIGHT_DECAY = 0.0
MAX_GRAD_NORM = 1.0
REFERENCE = "precomputed"         # precomputed (cached on disk) | live (a frozen copy, or base without LoRA)
PREFIX_SHARING = True             # one forward over [prompt, chosen, rejected]
PACK_FACTOR = 2.0                 # prefix-shared rows hold pairs up to this many times the longest pair's length
TREE = False                      # a batch's pairs of one question share one token tree (batching.collate_tree):
                                  # same losses up to float rounding, fewer tokens (docs/benchmarks.md); it
                                  # replaces the PREFIX_SHARING layout
LORA = False
LORA_R = 8
LORA_ALPHA = 16
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj"
GRADIENT_CHECKPOINTING = False    # recompute activations in the backward pass: less memory, ~30% more compute
BF16 = False                      # bf16 autocast with fp32 master weights (GPU, or a CPU with bf16 units);
                                  # DTYPE=bfloat16 stores weights in bf16
ATTENTION = ""                    # transformers' attention kernel: "" (the model's default, sdpa for Llama) | sdpa |
                                  # eager (kernels that take the 4D mask of packed pairs; docs/benchmarks.md)
LOGGING_STEPS = 5
SAVE_STEPS = 50                   # checkpoint every N optimizer steps
SAVE_TOTAL_LIMIT = 2
RESUME = False                    # continue from the last checkpoint in OUT_DIR
MAX_LEN = 512                     # tokens per sequence; longer pairs are dropped
CACHE_DIR = "cache"               # reference log-probs are cached under CACHE_DIR/reference
SEED = 0
THREADS = 2
DTYPE = "float32"
TRUST_REMOTE_CODE = False
TRAINER_ARGS = {}                 # TrainingArguments fields over the ones set here, as JSON: {"report_to":
                                  # ["tensorboard"], "optim": "adamw_torch_fused", "push_to_hub": true, ...}
CONFIG_KEYS = [k for k in list(globals()) if k.isupper()]


# ----------------------------------------------------------------------------- data


def step_weights(scores, side, mode):
    """Per-step weights: all 1 for `outcome`; for `weighted`, judge scores normalised to mean 1 (chosen:
    s, rejected: 1 - s), so that equal scores give plain DPO. Unscored steps count as 0.5."""
    if mode != "weighted" or not scores:
        return [1.0] * len(scores)
    s = [0.5 if x is None else float(x) for x in scores]
    raw = s if side == "chosen" else [1.0 - x for x in s]
    mean = sum(raw) / len(raw)
    return [x / mean for x in raw] if mean > 0 else [1.0] * len(raw)


def solution_tokens(tokenizer, steps, final, weights):
    """Token ids of a whole solution (steps, final line, EOS) and the weight of each token's step; the
    final-answer line and EOS belong to the last step. final None: the steps state it (\\boxed{}), no line."""
    ids, w = [], []
    for k, step in enumerate(steps):
        piece = tokenizer(step + "\n", add_special_tokens=False)["input_ids"]
        ids += piece
        w += [weights[k]] * len(piece)
    line = [] if final is None else tokenizer(f"{FINAL_MARK} {final}", add_special_tokens=False)["input_ids"]
    tail = line + [tokenizer.eos_token_id]
    return ids + tail, w + [weights[-1] if weights else 1.0] * len(tail)


def marked_final(text, default):
    """The answer on a '#### x' line of `text`; `default` when it has none; None when it states the answer
    in \\boxed{} instead (no line to add)."""
    if FINAL_MARK in text:
        return split_steps(text)[1] or default
    return None if last_boxed(text) is not None else default


def build_features(tokenizer, row, mode, style="gsm8k"):
    """{prompt_ids, chosen_ids, rejected_ids, chosen_weights, rejected_weights} for one pair. The prompt is
    the row's question in the policy prompt (asking for the final answer in `style`). `group` (the question)
    lets TREE batches share a question's tokens among its pairs."""
    return build_token_features(tokenizer, row, mode, style) | {"group": row["prompt"]}


def build_token_features(tokenizer, row, mode, style):
    if mode == "step":
        prompt = encode(tokenizer, policy_prompt(tokenizer, row["prompt"], style) + row["initial_reason_steps"])
        chosen = tokenizer(row["chosen"], add_special_tokens=False)["input_ids"]
        rejected = tokenizer(row["rejected"], add_special_tokens=False)["input_ids"]
        return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
                "chosen_weights": [1.0] * len(chosen), "rejected_weights": [1.0] * len(rejected)}
    prompt = encode(tokenizer, policy_prompt(tokenizer, row["prompt"], style))
    if "chosen_steps" not in row:  # a plain preference row: whole solutions as written, then EOS
        chosen, rejected = [tokenizer(row[k], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                            for k in ("chosen", "rejected")]
        return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
                "chosen_weights": [1.0] * len(chosen), "rejected_weights": [1.0] * len(rejected)}
    final_c = marked_final(row.get("chosen", ""), row["answer"])
    final_r = marked_final(row.get("rejected", ""), "")
    chosen, cw = solution_tokens(tokenizer, row["chosen_steps"], final_c,
                                 step_weights(row["chosen_step_scores"], "chosen", mode))
    rejected, rw = solution_tokens(tokenizer, row["rejected_steps"], final_r,
                                   step_weights(row["rejected_step_scores"], "rejected", mode))
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "chosen_weights": cw,
            "rejected_weights": rw}


def data_fingerprint(features):
    h = hashlib.sha256()
    for f in features:
        h.update(json.dumps([f["prompt_ids"], f["chosen_ids"], f["rejected_ids"], f["chosen_weights"],
                             f["rejected_weights"]]).encode())
    return h.hexdigest()[:16]


def epoch_order(features, epochs, seed):
    """All epochs laid end to end, each shuffled with its own seed, read in order: the batches are then the
    same whatever the number of processes (accelerate gives process i every i-th batch) and on resume."""
    out = []
    for epoch in range(epochs):
        order = list(range(len(features)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        out += [features[i] for i in order]
    return out


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, features):
        self.features = features

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return self.features[i]


# ----------------------------------------------------------------------------- loss


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    """What the loss of StepwiseDPOTrainer does (TRL's DPOConfig holds the same kind of fields); the
    defaults are the tunables above."""

    beta: float = BETA                      # scale of the implicit reward beta * (log pi - log pi_ref)
    loss: str = LOSS                        # sigmoid (DPO) | ipo | cpo | sft (only the NLL term: the SFT control)
    nll_weight: float = NLL_WEIGHT          # weight of the mean NLL of the chosen tokens (RPO)
    dpop_lambda: float = DPOP_LAMBDA        # DPO-Positive penalty weight (0 = off)
    prefix_sharing: bool = PREFIX_SHARING   # one forward over [prompt, chosen, rejected] (False: two rows)

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg["BETA"], cfg["LOSS"], cfg["NLL_WEIGHT"], cfg["DPOP_LAMBDA"], cfg["PREFIX_SHARING"])


def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type="sigmoid",
                    dpop_lambda=0.0, policy_chosen_plain=None, ref_chosen_plain=None):
    """Per-pair losses and implicit rewards from (weighted) sequence log-probs.

    sigmoid: -log sigmoid(beta * (chosen log-ratio - rejected log-ratio))            (DPO, eq. 7)
    ipo:     (chosen log-ratio - rejected log-ratio - 1 / (2 beta))^2                (IPO, eq. 17)
    cpo:     -log sigmoid(beta * (log pi(y_w) - log pi(y_l))), no reference (CPO, Xu et al. 2024,
             arXiv 2401.08417, eq. 3; with the NLL term, their full loss): the pairs the policy still gets
             wrong weigh most, not the ones it moved least from the reference
    sft:     0 (with the NLL term, supervised fine-tuning on the chosen tokens: a control)
    DPO-Positive subtracts dpop_lambda * max(0, log pi_ref(y_w) - log pi(y_w)) from the log-ratio
    difference inside the loss (Pal et al. 2024, eq. 3), so the chosen likelihood cannot fall below the
    reference's for free."""
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    margin = policy_chosen - policy_rejected if loss_type == "cpo" else chosen_logratio - rejected_logratio
    if dpop_lambda:
        margin = margin - dpop_lambda * (ref_chosen_plain - policy_chosen_plain).clamp(min=0)
    if loss_type in ("sigmoid", "cpo"):
        losses = -torch.nn.functional.logsigmoid(beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    elif loss_type == "sft":  # no preference term: only NLL_WEIGHT * NLL of the chosen tokens (a control)
        losses = torch.zeros_like(margin)
    else:
        raise ValueError(f"unknown LOSS {loss_type!r}; use sigmoid, ipo, cpo or sft")
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


# ----------------------------------------------------------------------------- trainer


class StepwiseDPOTrainer(Trainer):
    """transformers.Trainer with a stepwise DPO loss. Overrides compute_loss (the loss) and log (adds the
    buffered pair metrics, averaged over the logging window and over processes); everything else (the
    loop, accumulation, checkpoints, resume, DDP/DeepSpeed/FSDP through accelerate) is the parent's.

    `dpo`: DPOSettings. The reference: log-probs precomputed into the batch (ref_*), else `ref_model`, else
    the model itself with its adapters disabled (a peft model)."""

    def __init__(self, *args, dpo, ref_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dpo, self.ref_model = dpo, ref_model
        # the loss is already a per-pair mean; Trainer must scale it for gradient accumulation itself
        self.model_accepts_loss_kwargs = False
        self._metrics = {}

    def reference_logps(self, model, inputs):
        if "ref_chosen" in inputs:
            return inputs["ref_chosen"], inputs["ref_rejected"], inputs["ref_chosen_plain"]
        with torch.no_grad():
            if self.ref_model is not None:
                ref = sequence_logps(self.ref_model, inputs, self.dpo.prefix_sharing)
            else:
                with self.accelerator.unwrap_model(model).disable_adapter():
                    ref = sequence_logps(model, inputs, self.dpo.prefix_sharing)
        return ref["chosen"], ref["rejected"], ref["chosen_plain"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        d = self.dpo
        # accelerate applies mixed precision by wrapping model.forward, which sequence_logps bypasses (it runs
        # the decoder and reads the head only where a token is scored), so the autocast is entered here
        with self.accelerator.autocast():
            policy = sequence_logps(model, inputs, d.prefix_sharing)
            ref_chosen, ref_rejected, ref_chosen_plain = self.reference_logps(model, inputs)
        losses, reward_chosen, reward_rejected = preference_loss(
            policy["chosen"], policy["rejected"], ref_chosen, ref_rejected, d.beta, d.loss, d.dpop_lambda,
            policy["chosen_plain"], ref_chosen_plain)
        nll = -(policy["chosen_plain"] / policy["chosen_tokens"])          # mean NLL per chosen token
        loss = losses.mean() + d.nll_weight * nll.mean()
        self.check_finite(loss)
        metrics = {"rewards/chosen": reward_chosen, "rewards/rejected": reward_rejected,
                   "rewards/margins": reward_chosen - reward_rejected,
                   "rewards/accuracies": (reward_chosen > reward_rejected).float(),
                   "logps/chosen": policy["chosen_plain"], "logps/rejected": policy["rejected_plain"],
                   "nll/chosen": nll, "step/chosen_tokens": policy["chosen_tokens"],
                   "step/rejected_tokens": policy["rejected_tokens"],
                   "step/chosen_below_ref": (ref_chosen_plain - policy["chosen_plain"]).clamp(min=0)}
        if model.training:  # an evaluation's batches (EVAL_DATA) report only their loss
            for name, value in metrics.items():
                self._metrics.setdefault(name, []).append(value.detach().float().mean())
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation on held-out pairs: the training loss, without gradients (the parent's looks for labels
        and logits, which pairs do not have)."""
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _save(self, output_dir=None, state_dict=None):
        """The parent's save, with the training arguments as readable JSON instead of its pickled
        training_args.bin (a repo that loads no pickles should write none)."""
        super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        pickled = os.path.join(output_dir, "training_args.bin")
        if self.args.should_save and os.path.exists(pickled):
            os.remove(pickled)
            atomic_write_text(os.path.join(output_dir, "training_args.json"), self.args.to_json_string())

    def check_finite(self, loss):
        """Stop on a NaN or infinite loss before its gradients reach the weights, so that no checkpoint of a
        broken model is ever written. All processes agree, so none is left waiting for the others."""
        finite = torch.isfinite(loss.detach()).float()[None]
        if self.args.world_size > 1:
            finite = self.accelerator.gather(finite)
        if not bool(finite.min() > 0):
            raise FloatingPointError(
                f"non-finite loss ({float(loss.detach())}) at optimizer step {self.state.global_step + 1}; training "
                f"stopped before updating the weights, checkpoints already in {self.args.output_dir} are intact")

    def log(self, logs, *args, **kwargs):
        if self._metrics and "loss" in logs:
            means = torch.stack([torch.stack(v).mean() for v in self._metrics.values()])
            means = self.accelerator.gather_for_metrics(means.to(self.accelerator.device)[None]).mean(0)
            logs |= {name: round(float(m), 6) for name, m in zip(self._metrics, means)}
            self._metrics = {}
        super().log(logs, *args, **kwargs)


class JsonlMetrics(TrainerCallback):
    """Appends every log line to OUT_DIR/metrics.jsonl (main process only). On resume, lines past the
    checkpoint's step are dropped first, so a resumed run's file equals an uninterrupted run's."""

    def __init__(self, path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and line.endswith("\n") and json.loads(line)["step"] <= state.global_step]
            atomic_write_text(self.path, "".join(kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs}) + "\n")


# ----------------------------------------------------------------------------- main


def plot_training(metrics_path, out_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "loss" in r and "rewards/margins" in r]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key in zip(axes, ("loss", "rewards/margins", "rewards/accuracies")):
        ax.plot(steps, [r[key] for r in rows], marker=".")
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def usable_features(tokenizer, rows, cfg, source):
    """Features of the pairs that fit in MAX_LEN and have both a chosen and a rejected token."""
    features = [build_features(tokenizer, r, cfg["MODE"], cfg["ANSWER_STYLE"]) for r in rows]
    features = [f for f in features if len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"])
                <= cfg["MAX_LEN"] and f["chosen_ids"] and f["rejected_ids"]]
    if not features:
        raise SystemExit(f"no usable pairs in {source} (empty, or all longer than MAX_LEN={cfg['MAX_LEN']})")
    return features


def training_arguments(cfg, out):
    """TrainingArguments from the tunables, with TRAINER_ARGS set over them (report_to, push_to_hub, optim,
    eval and save strategies, ...); a field TrainingArguments does not have stops the script."""
    defaults = dict(
        output_dir=out, per_device_train_batch_size=cfg["BATCH_SIZE"], per_device_eval_batch_size=cfg["BATCH_SIZE"],
        gradient_accumulation_steps=cfg["GRAD_ACCUM"], learning_rate=cfg["LR"], num_train_epochs=1,
        max_steps=cfg["MAX_STEPS"], train_sampling_strategy="sequential", warmup_steps=cfg["WARMUP_RATIO"],
        weight_decay=cfg["WEIGHT_DECAY"], max_grad_norm=cfg["MAX_GRAD_NORM"], lr_scheduler_type="linear",
        logging_steps=cfg["LOGGING_STEPS"], save_steps=cfg["SAVE_STEPS"], save_total_limit=cfg["SAVE_TOTAL_LIMIT"],
        seed=cfg["SEED"], data_seed=cfg["SEED"], remove_unused_columns=False, report_to=[],
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=False,
        ddp_find_unused_parameters=False, bf16=cfg["BF16"], activation_checkpointing=cfg["GRADIENT_CHECKPOINTING"],
        activation_checkpointing_kwargs={"use_reentrant": False})
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(set(cfg["TRAINER_ARGS"]) - fields)
    if unknown:
        raise SystemExit(f"--TRAINER_ARGS: TrainingArguments has no field {unknown[0]!r}")
    try:
        return TrainingArguments(**(defaults | cfg["TRAINER_ARGS"]))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--TRAINER_ARGS: {e}") from None


def checkpoint_complete(folder, step):
    """True when the trainer state, the last file a save writes, is there and whole. The parent writes it
    in place, so a kill inside that write leaves an empty or cut file behind."""
    try:
        with open(os.path.join(folder, "trainer_state.json")) as f:
            return json.load(f).get("global_step") == step
    except (OSError, ValueError):
        return False


def last_complete_checkpoint(out_dir):
    """The newest checkpoint-N folder whose save finished (a kill during a save leaves an incomplete folder
    behind, which must not be resumed from)."""
    if not os.path.isdir(out_dir):
        return None
    done = [d for d in os.listdir(out_dir) if d.startswith("checkpoint-") and d[11:].isdigit()
            and checkpoint_complete(os.path.join(out_dir, d), int(d[11:]))]
    return os.path.join(out_dir, max(done, key=lambda d: int(d[11:]))) if done else None


def main(argv):
    cfg = config_from_argv({k: globals()[k] for k in CONFIG_KEYS}, argv)
    if cfg["MODE"] not in ("step", "weighted", "outcome"):
        raise SystemExit(f"--MODE must be step, weighted or outcome, got {cfg['MODE']!r}")
    if cfg["ATTENTION"] not in ("", "sdpa", "eager"):  # flash kernels ignore the mask that keeps packed pairs apart
        raise SystemExit(f"--ATTENTION must be sdpa or eager (or empty for the model's default), got {cfg['ATTENTION']!r}")
    if cfg["REFERENCE"] not in ("precomputed", "live"):
        raise SystemExit(f"--REFERENCE must be precomputed or live, got {cfg['REFERENCE']!r}")
    torch.set_num_threads(cfg["THREADS"])
    torch.manual_seed(cfg["SEED"])
    out = cfg["OUT_DIR"]
    rows = load_pairs(cfg["DATA"], cfg["MODE"])
    eval_rows = load_pairs(cfg["EVAL_DATA"], cfg["MODE"]) if cfg["EVAL_DATA"] else None
    model, tokenizer = load_model(cfg["MODEL"], cfg["DTYPE"], cfg["TRUST_REMOTE_CODE"], attention=cfg["ATTENTION"])
    features = usable_features(tokenizer, rows, cfg, cfg["DATA"])
    eval_features = usable_features(tokenizer, eval_rows, cfg, cfg["EVAL_DATA"]) if eval_rows else None
    args = training_arguments(cfg, out)  # checked before the reference pass
    ref_model = None
    if cfg["REFERENCE"] == "precomputed":
        model.to(default_device())  # the Trainer moves it there anyway; the reference pass should not run on CPU
        for feats in filter(None, (features, eval_features)):
            key = f"{fingerprint(cfg['MODEL'])}-{data_fingerprint(feats)}-{int(cfg['PREFIX_SHARING'])}"
            key += "-bf16" if cfg["BF16"] else ""   # the reference in the precision the policy is computed in
            key += f"-{cfg['ATTENTION']}" if cfg["ATTENTION"] else ""   # and with the same attention kernel
            key += "-tree" if cfg["TREE"] else ""                        # and layout (rounding differs)
            precompute_reference(model, feats, cfg["BATCH_SIZE"], tokenizer.pad_token_id, cfg["PREFIX_SHARING"],
                                 os.path.join(cfg["CACHE_DIR"], "reference", f"{key}.json"), cfg["PACK_FACTOR"],
                                 cfg["BF16"], cfg["TREE"])
    elif not cfg["LORA"]:
        ref_model, _ = load_model(cfg["MODEL"], cfg["DTYPE"], cfg["TRUST_REMOTE_CODE"], attention=cfg["ATTENTION"])
        ref_model.requires_grad_(False)
    if cfg["LORA"]:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=cfg["LORA_R"], lora_alpha=cfg["LORA_ALPHA"], lora_dropout=0.0,
                                                 target_modules=cfg["LORA_TARGETS"].split(","),
                                                 task_type="CAUSAL_LM"))
        # the saved adapter names its base as given here (a .gguf file included), so load_model can rebuild it
        model.peft_config["default"].base_model_name_or_path = cfg["MODEL"]
    trainer = StepwiseDPOTrainer(
        model=model, args=args, train_dataset=PairDataset(epoch_order(features, cfg["EPOCHS"], cfg["SEED"])),
        eval_dataset=PairDataset(eval_features) if eval_features else None,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id, cfg["PREFIX_SHARING"], cfg["PACK_FACTOR"],
                                           cfg["TREE"]),
        dpo=DPOSettings.from_config(cfg),
        ref_model=ref_model, callbacks=[JsonlMetrics(os.path.join(out, "metrics.jsonl"))])
    if trainer.is_world_process_zero():
        atomic_write_json(os.path.join(out, "config.json"), cfg | {"n_pairs": len(features), "command": command_line(__file__, argv)})
    checkpoint = last_complete_checkpoint(out) if cfg["RESUME"] else None
    if checkpoint and trainer.is_world_process_zero():
        print_json({"resuming_from": checkpoint})
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(os.path.join(out, "model"))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(os.path.join(out, "model"))
        plot_training(os.path.join(out, "metrics.jsonl"), os.path.join(out, "training.png"))
        with open(os.path.join(out, "metrics.jsonl")) as f:
            logged = [json.loads(line) for line in f if line.strip()]
        last = next((r for r in reversed(logged) if "rewards/margins" in r), {})
        summary = {"mode": cfg["MODE"], "n_pairs": len(features), "steps": result.global_step,
                   "train_loss": result.training_loss, "last_logged": last}
        atomic_write_json(os.path.join(out, "summary.json"), summary)
        print_json(summary)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # a clean exit: no abort from a live gloo group
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
