import ast
import copy
import glob
import hashlib
import http.server
import importlib
import importlib.util
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GSM8K_DIR = os.path.join(ROOT, "..", "shared", "data", "gsm8k")
COMMITTED = os.path.join(ROOT, "models")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A BPE tokenizer trained in-test on 200 bundled problems (the same code sft.py uses)."""
    import sft
    from task import generate_task

    train, _ = generate_task(200, 10, seed=7)
    texts = sft.tokenizer_corpus(train)
    return sft.train_tokenizer(texts, 400)


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    import sft
    return sft.make_model(tiny_tokenizer, hidden=32, layers=2, heads=2, mlp=64, seed=0).eval()


def reply_with_json(handler, payload, status=200):
    """Send `payload` (bytes) from an http.server handler as a JSON reply."""
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.end_headers()
    handler.wfile.write(payload)


def completions_reply(p_yes):
    """An OpenAI /v1/completions reply whose top log-probabilities give P(Yes) = p_yes."""
    return json.dumps({"choices": [{"text": " Yes", "logprobs": {"top_logprobs": [
        {" Yes": math.log(p_yes), " No": math.log(1 - p_yes)}]}}]}).encode()


# ----------------------------------------------------------------------------- scripts as processes, and kills
JUDGE_RUN_ARGS = ["--N_PROBLEMS=12", "--K=4", "--CHUNK=3", "--RECTIFY_SAMPLES=2", "--MAX_NEW_TOKENS=120"]  # small
JUDGE_RUN_OUTPUTS = ["judged.jsonl", "step_pairs.jsonl", "step_pairs_meta.jsonl", "full_pairs.jsonl", "counts.json"]


def run_script(script, args, launcher=(sys.executable,), wait=True, timeout=600):
    """Run a repo script as its own process (cwd = the repo root, one OpenMP thread). wait: block, check
    exit status 0 and return the CompletedProcess; else return the Popen at once (stdout discarded, stderr
    kept in a temporary file, `proc.stderr_file`, for kill_when to show)."""
    cmd = [*launcher, script, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:
        err = tempfile.TemporaryFile()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, env=env)
        proc.stderr_file = err
        return proc
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def line_count(path):
    """Complete lines in a file (0 when it does not exist yet)."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def kill_when(proc, ready, timeout=300):
    """SIGKILL `proc` as soon as ready() is true (polled every 20 ms); fails if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    if proc.poll() is not None:
        proc.stderr_file.seek(0)
        tail = proc.stderr_file.read()[-3000:].decode(errors="replace")
        raise AssertionError(f"the run ended (exit status {proc.returncode}) before it could be killed:\n{tail}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr_file.close()


# ----------------------------------------------------------------------------- training runs


@pytest.fixture(scope="session")
def train_setup(tmp_path_factory, tiny_tokenizer, tiny_model):
    """A tiny policy folder and 48 step pairs (gold step vs an automatically corrupted one)."""
    from data_utils import split_steps
    from task import corrupt_solution, generate_task

    folder = tmp_path_factory.mktemp("train")
    tiny_model.save_pretrained(folder / "policy")
    tiny_tokenizer.save_pretrained(folder / "policy")
    rng = random.Random(0)
    rows = []
    for p in generate_task(48, 1, seed=5)[0]:
        steps, final = split_steps(p["answer"], strip_calc=True)
        bad, _, j = corrupt_solution(steps, final, rng, p["question"])
        rows.append({"prompt": p["question"], "initial_reason_steps": "".join(s + "\n" for s in steps[:j]),
                     "chosen": steps[j] + "\n", "rejected": bad[j] + "\n", "full_chosen": "", "full_rejected": "",
                     "answer": final})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


STEP_ROWS = [
    {"prompt": "Mia has 12 apples. She finds 3 more apples. How many apples does Mia have now?",
     "initial_reason_steps": "", "chosen": "After that, she has 12 + 3 = 15 apples.\n",
     "rejected": "After that, she has 12 + 3 = 16 apples.\n", "answer": "15"},
    {"prompt": "Ben has 40 coins. He gives away 7 coins. He finds 2 more coins. How many coins does Ben have?",
     "initial_reason_steps": "Then he has 40 - 7 = 33 coins left.\n", "chosen": "After that, he has 33 + 2 = 35 coins.\n",
     "rejected": "After that, he has 33 + 2 = 36 coins.\n", "answer": "35"},
]

FULL_ROWS = [
    {"prompt": "Ben has 40 coins. He gives away 7 coins. He finds 2 more coins. How many coins does Ben have?",
     "chosen_steps": ["Then he has 40 - 7 = 33 coins left.", "After that, he has 33 + 2 = 35 coins."],
     "rejected_steps": ["Then he has 40 - 7 = 34 coins left.", "After that, he has 34 + 2 = 36 coins."],
     "chosen_step_scores": [0.9, 0.6], "rejected_step_scores": [0.3, 0.8], "chosen": "x\n#### 35",
     "rejected": "x\n#### 36", "answer": "35"},
    {"prompt": "Zoe has 5 eggs. She ends up with twice as many eggs. How many eggs does Zoe have now?",
     "chosen_steps": ["Now she has 5 * 2 = 10 eggs."], "rejected_steps": ["Now she has 5 + 2 = 7 eggs."],
     "chosen_step_scores": [0.95], "rejected_step_scores": [0.1], "chosen": "x\n#### 10",
     "rejected": "x\n#### 7", "answer": "10"},
]



def naive_logp(model, prompt_ids, completion_ids):
    """log pi(completion | prompt) from a separate, plain forward."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return sum(logp[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(completion_ids))



@pytest.fixture(scope="module")
def policy_and_ref(tiny_tokenizer, tiny_model):
    """(policy, reference): the tiny model moved a little, and the tiny model as it is."""
    ref = copy.deepcopy(tiny_model)
    policy = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return policy, ref


def train_args(folder, out, *extra):
    """train_stepwise_dpo.py arguments for the train_setup folder."""
    return [f"--MODEL={folder / 'policy'}", f"--DATA={folder / 'pairs.jsonl'}", f"--OUT_DIR={out}",
            f"--CACHE_DIR={folder / 'cache'}", "--LOGGING_STEPS=1", "--LR=1e-3", "--BETA=0.5", "--NLL_WEIGHT=0.2",
            *extra]


def training_rows(out):
    """The training lines of a run's metrics.jsonl."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "rewards/margins" in r]


# ----------------------------------------------------------------------------- a judge server that misbehaves


def prompt_score(prompt):
    """The score FakeServer gives a prompt: fixed by the prompt, spread over (0.05, 0.95)."""
    return 0.05 + 0.9 * (int(hashlib.sha256(prompt.encode()).hexdigest()[:6], 16) / 0xFFFFFF)


def policy_reply(prompt, seed):
    """A completions reply with a two-step solution drawn from (prompt, seed), then text past the answer."""
    x = int(hashlib.sha256(f"{prompt}|{seed}".encode()).hexdigest()[:4], 16) % 3
    text = f"She has 2 + {x} = {2 + x} apples.\nSo {2 + x} * 1 = {2 + x}.\n#### {2 + x}\nQuestion: more"
    return json.dumps({"choices": [{"text": text, "index": 0, "finish_reason": "length"}]}).encode()


def check_reply(prompt, finish_reason="stop"):
    """A completions reply holding a check of the last step, fixed by the prompt."""
    return json.dumps({"choices": [{"text": f" recomputed {int(100 * prompt_score(prompt))}\n",
                                    "finish_reason": finish_reason}]}).encode()


class FakeServer:
    """An OpenAI-style /v1/completions server on 127.0.0.1 (a free port) that plays policy and judge and
    misbehaves on purpose.

    A request with a stop string is a generative judge's check: it gets check_reply(prompt). Another request
    with max_tokens > 1 is a policy's: it gets policy_reply(prompt, seed). A judge's one-token request gets
    log-probabilities giving score(prompt) (prompt_score by default). Each request takes the next action of
    `plan`, or `default` (an action, or a function of the request body giving one) once the plan is empty;
    `fail_after` = N turns every request after the first N into `failure`. Actions: "ok" (the replies above),
    "http<code>", "garbage" (malformed JSON), "no-choices" (an empty list), "text-yes" / "text-no" (no
    log-probabilities, only the reply text), "perhaps" (neither Yes nor No), "wrong-shape" (a log-probability
    that is not a number), "cut" (a check that reaches the token limit before the answer cue),
    "sleep<seconds>" (answers after that delay; a timeout for a shorter client timeout) and "drop" (closes the
    connection without a reply). `delay` seconds pass before every reply.
    Every request is recorded in `seen` as (path, body, Authorization header, time). Use it as a context
    manager: the server stops on exit, and no reply waits longer than its own sleep."""

    def __init__(self, default="ok", delay=0.0, score=None):
        self.reset()
        self.default, self.delay, self.failure = default, delay, "http500"
        self.score = score or prompt_score
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen.append((self.path, body, self.headers.get("Authorization"), time.time()))
                outer.respond(self, body, outer.next_action(body))

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def next_action(self, body):
        if self.fail_after is not None and len(self.seen) > self.fail_after:
            return self.failure
        action = self.plan.pop(0) if self.plan else self.default
        return action(body) if callable(action) else action

    def reset(self):
        """Well-behaved again, with nothing recorded."""
        self.plan, self.default, self.delay, self.seen, self.fail_after = [], "ok", 0.0, [], None

    def respond(self, handler, body, action):
        time.sleep(self.delay)
        if action.startswith("sleep"):
            time.sleep(float(action[5:]))
            action = "ok"
        if action.startswith("http"):
            handler.send_response(int(action[4:]))
            handler.end_headers()
        elif action == "drop":
            handler.close_connection = True  # the connection closes with no reply written
        elif action in ("ok", "cut") and "stop" in body:  # a generative judge writing its check
            reply_with_json(handler, check_reply(body["prompt"], "stop" if action == "ok" else "length"))
        elif action == "ok" and body.get("max_tokens", 1) > 1:
            reply_with_json(handler, policy_reply(body["prompt"], body.get("seed")))
        elif action == "ok":
            reply_with_json(handler, completions_reply(self.score(body["prompt"])))
        else:
            choice = {"garbage": None, "no-choices": None, "text-yes": {"text": " Yes"},
                      "text-no": {"text": "No."}, "perhaps": {"text": " Perhaps", "logprobs": {
                          "top_logprobs": [{" Perhaps": -0.1, " Maybe": -2.5}]}},
                      "wrong-shape": {"text": " Yes", "logprobs": {"top_logprobs": [{" Yes": "high"}]}}}[action]
            payload = b"{broken" if action == "garbage" else json.dumps(
                {"choices": [choice] if choice else []}).encode()
            reply_with_json(handler, payload)

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# ----------------------------------------------------------------------------- the repo's scripts and sources


def discover_scripts():
    """Every script: a .py file at the repo root or in bench/ with UPPER_CASE tunables and main(argv)."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py"))):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if "CONFIG_KEYS = " in text and "def main(argv)" in text:
            found.append(os.path.relpath(path, ROOT))
    return found



def import_script(relpath):
    """The module of a script given by its path relative to the repo root."""
    if os.sep not in relpath:
        return importlib.import_module(relpath[:-3])
    spec = importlib.util.spec_from_file_location(relpath[:-3].replace(os.sep, "_"), os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



def files_under(folder):
    """Relative path -> bytes of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}



def free_port(host="127.0.0.1"):
    """A port nothing listens on (now)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}



def dotted(node):
    """'torch.load' for the expression torch.load, '' for anything that is not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""



def unsafe_uses(source, filename):
    """`file:line: what` for each use of eval/exec/compile/__import__, a pickle-like module, torch.load without
    weights_only=True, numpy.load with allow_pickle=True, yaml.load, or trust_remote_code=True."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: imports {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name, keywords = dotted(node.func), {k.arg: k.value for k in node.keywords}
        const = {k: v.value for k, v in keywords.items() if isinstance(v, ast.Constant)}
        if name in ("eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec"):
            found.append(f"{where}: calls {name}")
        if name.endswith("torch.load") and const.get("weights_only") is not True:
            found.append(f"{where}: torch.load without weights_only=True")
        if name in ("np.load", "numpy.load") and const.get("allow_pickle", False) is not False:
            found.append(f"{where}: numpy.load with allow_pickle")
        if name == "yaml.load":
            found.append(f"{where}: yaml.load (use yaml.safe_load)")
        if const.get("trust_remote_code") is True:
            found.append(f"{where}: trust_remote_code=True")
    return found



def repo_sources():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "cache", "results"))
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(folder, f)

