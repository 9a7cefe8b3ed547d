import hashlib
import http.server
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GSM8K_DIR = os.path.join(ROOT, "..", "shared", "data", "gsm8k")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A BPE tokenizer trained in-test on 200 bundled problems (the same code sft.py uses)."""
    import sft
    from data_utils import generate_task

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
    exit status 0 and return the CompletedProcess; else return the Popen at once (output discarded)."""
    cmd = [*launcher, script, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
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
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


# ----------------------------------------------------------------------------- training runs


@pytest.fixture(scope="session")
def train_setup(tmp_path_factory, tiny_tokenizer, tiny_model):
    """A tiny policy folder and 48 step pairs (gold step vs an automatically corrupted one)."""
    from data_utils import corrupt_solution, generate_task, split_steps

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


def train_args(folder, out, *extra):
    """train_stepwise_dpo.py arguments for the train_setup folder."""
    return [f"--MODEL={folder / 'policy'}", f"--DATA={folder / 'pairs.jsonl'}", f"--OUT_DIR={out}",
            "--LOGGING_STEPS=1", "--LR=1e-3", "--BETA=0.5", "--NLL_WEIGHT=0.2", *extra]


def training_rows(out):
    """The training lines of a run's metrics.jsonl."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "rewards/margins" in r]


# ----------------------------------------------------------------------------- a judge server that misbehaves


def prompt_score(prompt):
    """The score JudgeServer gives a prompt: fixed by the prompt, spread over (0.05, 0.95)."""
    return 0.05 + 0.9 * (int(hashlib.sha256(prompt.encode()).hexdigest()[:6], 16) / 0xFFFFFF)


class JudgeServer:
    """An OpenAI-style /v1/completions judge on 127.0.0.1 (a free port) that misbehaves on purpose.

    Each request takes the next action of `plan`, or `default` (an action, or a function of the request body
    giving one) once the plan is empty; `fail_after` = N turns
    every request after the first N into `failure`. Actions: "ok" (log-probabilities giving prompt_score),
    "http<code>", "garbage" (malformed JSON), "no-choices" (an empty list), "text-yes" / "text-no" (no
    log-probabilities, only the reply text), "perhaps" (neither Yes nor No), "wrong-shape" (a log-probability
    that is not a number), "sleep<seconds>" (answers after that delay; a timeout for a shorter client
    timeout) and "drop" (closes the connection without a reply). `delay` seconds pass before every reply.
    Every request is recorded in `seen` as (path, body, Authorization header, time). Use it as a context
    manager: the server stops on exit, and no reply waits longer than its own sleep."""

    def __init__(self, default="ok", delay=0.0):
        self.reset()
        self.default, self.delay, self.failure = default, delay, "http500"
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
        elif action == "ok":
            reply_with_json(handler, completions_reply(prompt_score(body["prompt"])))
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
