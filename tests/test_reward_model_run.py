"""reward_model.py end to end on the committed tiny models: outputs, schema, kill-and-resume."""
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, completions_reply, reply_with_json

ARGS = ["--N_PROBLEMS=12", "--K=4", "--CHUNK=3", "--RECTIFY_SAMPLES=2", "--MAX_NEW_TOKENS=120"]
OUTPUTS = ["judged.jsonl", "step_pairs.jsonl", "step_pairs_meta.jsonl", "full_pairs.jsonl", "counts.json"]


def run(folder, extra=(), wait=True):
    cmd = [sys.executable, "reward_model.py", *ARGS, f"--OUT_DIR={folder}/out", f"--CACHE_DIR={folder}/cache",
           *extra]
    if wait:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fresh")
    return folder, run(folder)


def test_outputs_and_counts(fresh):
    folder, printed = fresh
    out = folder / "out"
    judged = [json.loads(x) for x in (out / "judged.jsonl").read_text().splitlines()]
    assert len(judged) == 12 * 4
    for row in judged:
        assert set(row) >= {"prompt", "completions", "labels", "step_scores"}
        assert len(row["completions"]) == len(row["labels"]) == len(row["step_scores"])
        assert all(0.0 <= s <= 1.0 for s in row["step_scores"])
        assert row["labels"] == [s >= 0.5 for s in row["step_scores"]]
    counts = json.loads((out / "counts.json").read_text())
    assert counts["samples"] == 48 and counts["correct_samples"] == sum(r["correct"] for r in judged)
    assert counts["step_pairs"] == sum(counts["step_pairs_by_source"].values())
    assert printed["computed"]["samples"] == 12 and printed["computed"]["scored"] == 48
    config = json.loads((out / "config.json").read_text())
    assert "reward_model.py" in config["command"] and config["K"] == 4


def test_step_pairs_have_the_step_dpo_schema(fresh):
    import datasets

    folder, _ = fresh
    path = folder / "out" / "step_pairs.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    if not rows:
        pytest.skip("no pairs in this tiny run")
    features = datasets.Features({k: datasets.Value("string") for k in (
        "prompt", "initial_reason_steps", "chosen", "rejected", "full_chosen", "full_rejected", "answer")})
    ds = datasets.load_dataset("json", data_files=str(path), features=features, split="train")
    assert len(ds) == len(rows)
    for row in rows:
        assert row["chosen"].endswith("\n") and row["rejected"].endswith("\n")
        assert "<|endoftext|>" not in row["chosen"] + row["rejected"] + row["full_chosen"]
        assert row["chosen"] != row["rejected"] and row["chosen"].count("\n") == 1


def test_second_run_scores_nothing_and_writes_the_same_bytes(fresh):
    folder, _ = fresh
    before = {name: (folder / "out" / name).read_bytes() for name in OUTPUTS}
    printed = run(folder)
    assert printed["computed"] == {"samples": 0, "scored": 0, "rectify_samples": 0, "rectify_scored": 0}
    assert {name: (folder / "out" / name).read_bytes() for name in OUTPUTS} == before


def kill_when(proc, path, lines, timeout=300):
    """SIGKILL `proc` as soon as `path` has at least `lines` lines; returns the line count at the kill."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return len(path.read_text().splitlines())


def test_sigkill_while_sampling_then_resume_gives_identical_outputs(fresh, tmp_path):
    folder, _ = fresh
    done = kill_when(run(tmp_path, wait=False), tmp_path / "cache" / "samples.jsonl", 1)
    assert 1 <= done < 12
    printed = run(tmp_path)
    assert printed["computed"]["samples"] == 12 - done // 3 * 3
    for name in OUTPUTS:
        assert (tmp_path / "out" / name).read_bytes() == (folder / "out" / name).read_bytes(), name


class SlowJudge(http.server.BaseHTTPRequestHandler):
    """An OpenAI-style completions server that takes 10 ms per reply and answers deterministically from
    the prompt, so that a scoring run lasts long enough to be killed in the middle."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(0.01)
        p_yes = 0.05 + 0.9 * (int(hashlib.sha256(body["prompt"].encode()).hexdigest()[:6], 16) / 0xFFFFFF)
        reply_with_json(self, completions_reply(p_yes))

    def log_message(self, *args):
        pass


def test_sigkill_while_judging_over_http_then_resume(tmp_path):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowJudge)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    judge = [f"--JUDGE=http://127.0.0.1:{srv.server_address[1]}", "--JUDGE_MODEL_NAME=slow"]
    try:
        uninterrupted = run(tmp_path / "a", judge)
        assert uninterrupted["computed"]["scored"] == 48
        proc = run(tmp_path / "b", judge, wait=False)
        done = kill_when(proc, tmp_path / "b" / "cache" / "scores.jsonl", 4)
        assert 4 <= done < 48
        resumed = run(tmp_path / "b", judge)
    finally:
        srv.shutdown()
        srv.server_close()
    # only the chunks not finished before the kill were scored again
    assert resumed["computed"]["samples"] == 0 and resumed["computed"]["scored"] == 48 - done // 3 * 3
    for name in OUTPUTS:
        assert (tmp_path / "b" / "out" / name).read_bytes() == (tmp_path / "a" / "out" / name).read_bytes(), name
    judged = [json.loads(x) for x in (tmp_path / "b" / "out" / "judged.jsonl").read_text().splitlines()]
    assert all(len(r["raw"]) == len(r["completions"]) for r in judged)
