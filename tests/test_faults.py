"""Faults injected on purpose, and what the scripts do about each one.

README.md, "What happens when...", lists every fault with its behaviour and the test here that shows it;
test_readme_table_cites_exactly_these_tests keeps the table and this module in step. The kill tests stop a
run at points drawn with a fixed seed: 3 of them in the default run, 10 with `python -m pytest -m slow`.
"""
import ast
import copy
import glob
import importlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import random
import re
import shutil

import pytest
import torch

import common
import reward_model as rm
import train_stepwise_dpo as T
from conftest import (JUDGE_RUN_ARGS, JUDGE_RUN_OUTPUTS, ROOT, JudgeServer, kill_when, prompt_score, run_script,
                      train_args, training_rows)
from data_utils import DataError
from real_llm_smoke import free_port

KILL_SEED = 8
KILLS = [3, pytest.param(10, marks=pytest.mark.slow)]


def files_under(folder):
    """Relative path -> bytes of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1. inputs


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


WRONG_TYPE = {bool: "maybe", int: "1.5", float: "many", list: "[1,", tuple: "[1,", dict: "{1:"}


@pytest.mark.parametrize("script", discover_scripts())
def test_every_script_refuses_unknown_keys_and_wrong_types(script, tmp_path, monkeypatch):
    module = import_script(script)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        module.main(["--NO_SUCH_KEY=1"])
    assert str(e.value) == f"unknown key --NO_SUCH_KEY; valid keys: {', '.join(module.CONFIG_KEYS)}"
    typed = [k for k in module.CONFIG_KEYS if type(getattr(module, k)) in WRONG_TYPE]
    assert typed, f"{script} has no typed tunable to test"
    for key in typed:
        with pytest.raises(SystemExit) as e:
            module.main([f"--{key}={WRONG_TYPE[type(getattr(module, key))]}"])
        assert str(e.value).startswith(f"--{key} expects "), (key, str(e.value))
    assert os.listdir(tmp_path) == []  # refused before anything was written


GOOD_PROBLEM = {"question": "Tom has 3 apples. He finds 2 more. How many?", "answer": "3 + 2 = 5\n#### 5"}
PROBLEM_READERS = {  # script -> arguments that make it read bad.jsonl (and good.jsonl first, where it reads two)
    "data_utils": ["--TRAIN_FILE=good.jsonl", "--TEST_FILE=bad.jsonl"],
    "sft": ["--TRAIN_FILE=bad.jsonl", "--MODELS_DIR=models", "--FORCE=true"],
    "reward_model": ["--TRAIN_FILE=bad.jsonl", "--FIRST_PROBLEM=0", "--OUT_DIR=out", "--CACHE_DIR=cache",
                     f"--POLICY={ROOT}/models/policy"],
    "evaluate": ["--TEST_FILE=bad.jsonl", "--OUT_DIR=out", "--JUDGE_EVAL_FILE=judge_eval.json", "--CACHE_DIR=cache",
                 f"--MODEL={ROOT}/models/policy"],
}


@pytest.mark.parametrize("script", sorted(PROBLEM_READERS))
def test_malformed_problem_row_is_named_and_nothing_is_written(script, tmp_path, monkeypatch):
    rows = [json.dumps(GOOD_PROBLEM), json.dumps({"question": "q", "answer": 42}), json.dumps(GOOD_PROBLEM)]
    (tmp_path / "good.jsonl").write_text(json.dumps(GOOD_PROBLEM) + "\n")
    (tmp_path / "bad.jsonl").write_text("\n".join(rows) + "\n")
    before = files_under(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"^bad\.jsonl:2: field 'answer' must be a string, got int$"):
        import_script(script + ".py").main(PROBLEM_READERS[script])
    assert files_under(tmp_path) == before


STEP_ROW = {"prompt": "Mia has 12 apples. She finds 3 more. How many apples does Mia have?",
            "initial_reason_steps": "", "chosen": "She has 12 + 3 = 15 apples.\n",
            "rejected": "She has 12 + 3 = 16 apples.\n", "answer": "15"}
FULL_ROW = {"prompt": STEP_ROW["prompt"], "chosen_steps": ["She has 12 + 3 = 15 apples."],
            "rejected_steps": ["She has 12 + 3 = 16 apples."], "chosen_step_scores": [0.9],
            "rejected_step_scores": [0.2], "chosen": "She has 12 + 3 = 15 apples.\n#### 15",
            "rejected": "She has 12 + 3 = 16 apples.\n#### 16", "answer": "15"}
HINT = r" \(MODE=step needs Math-Step-DPO rows; weighted/outcome need full_pairs rows\)"


@pytest.mark.parametrize("mode, line, change, message", [
    ("step", 3, {"chosen": 7}, "field 'chosen' must be a string, got 7"),
    ("step", 2, {"initial_reason_steps": None}, "field 'initial_reason_steps' must be a string, got null"),
    ("step", 2, "drop:initial_reason_steps", "field 'initial_reason_steps' is missing" + HINT),
    ("step", 1, "full", "field 'initial_reason_steps' is missing" + HINT),
    ("weighted", 1, "step", "field 'chosen_steps' is missing" + HINT),
    ("weighted", 2, {"chosen_step_scores": ["high"]},
     r"field 'chosen_step_scores' must be a list of scores in \[0, 1\] or null, got \[\"high\"\]"),
    ("weighted", 3, {"rejected_step_scores": [1.5]}, r"field 'rejected_step_scores' must be a list of scores"),
    ("outcome", 2, {"rejected_steps": "one string"}, "field 'rejected_steps' must be a list of strings"),
    ("weighted", 2, {"chosen_step_scores": [0.9, 0.8]},
     "field 'chosen_step_scores'/'rejected_step_scores' must have one score per step"),
    ("outcome", 3, "not json", r"not valid JSON \(Expecting value at column 1\)"),
], ids=["step-not-a-string", "step-null", "step-missing-field", "step-given-full-rows", "weighted-given-step-rows",
        "score-not-a-number", "score-out-of-range", "steps-not-a-list", "scores-per-step", "not-json"])
def test_malformed_pairs_row_is_named_and_nothing_is_written(mode, line, change, message, tmp_path, monkeypatch):
    good = STEP_ROW if mode == "step" else FULL_ROW
    rows = [json.dumps(good)] * 4
    if change == "not json":
        bad = "not json"
    elif change in ("full", "step"):
        rows, bad = [json.dumps(FULL_ROW if change == "full" else STEP_ROW)] * 4, None
    elif isinstance(change, str):
        bad = json.dumps({k: v for k, v in good.items() if k != change.split(":")[1]})
    else:
        bad = json.dumps(good | change)
    if bad is not None:
        rows[line - 1] = bad
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    before = files_under(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"^pairs\.jsonl:{line}: {message}"):
        T.main([f"--MODEL={ROOT}/models/policy", "--DATA=pairs.jsonl", f"--MODE={mode}", "--OUT_DIR=out"])
    assert files_under(tmp_path) == before


def test_damaged_cache_lines_are_dropped_and_recomputed(tmp_path):
    path = tmp_path / "scores.jsonl"
    cache = rm.DiskCache(str(path))
    cache.put_many([(f"k{i}", [i / 10]) for i in range(6)])
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = "garbage that is not JSON\n"        # k1 damaged
    lines[3] = '["a", "list"]\n'                   # k3 not an entry
    path.write_text("".join(lines) + '{"key": "k9", "val')   # and a last line cut by a kill
    calls = []

    def compute(idx):
        calls.append(idx)
        return [[i / 10] for i in idx]

    values, computed = rm.chunked_cached(rm.DiskCache(str(path)), [f"k{i}" for i in range(6)], compute, 2, "t")
    assert values == [[i / 10] for i in range(6)] and calls == [[0, 1], [2, 3]] and computed == 4
    assert rm.DiskCache(str(path)).entries == {f"k{i}": [i / 10] for i in range(6)}


# ----------------------------------------------------------------------------- 2. the HTTP judge


TRANSIENT = ["http429", "http500", "http503", "garbage", "no-choices", "sleep0.6", "drop"]


@pytest.mark.parametrize("fault", TRANSIENT)
def test_http_judge_retries_a_transient_fault(fault):
    with JudgeServer() as server:
        server.plan = [fault, fault]
        out = rm.HTTPJudge(server.url, "m", timeout=0.3, retries=2, backoff=0.01).score([("Q?", ["a"])])
    prompt = server.seen[-1][1]["prompt"]
    assert len(server.seen) == 3 and out[0]["scores"] == [pytest.approx(prompt_score(prompt))]


@pytest.mark.parametrize("fault, message", [
    ("refused", "URLError: .*Connection refused"), ("http429", "HTTP 429"), ("http500", "HTTP 500"),
    ("http503", "HTTP 503"), ("garbage", "malformed JSON"), ("no-choices", "reply has no choices"),
    ("sleep0.6", "timed out"), ("drop", "Remote end closed connection without response")],
    ids=["refused", "http429", "http500", "http503", "garbage", "no-choices", "timeout", "drop"])
def test_http_judge_gives_up_after_bounded_retries(fault, message):
    with JudgeServer(default=fault) as server:
        url = f"http://127.0.0.1:{free_port()}" if fault == "refused" else server.url
        judge = rm.HTTPJudge(url, "m", timeout=0.3, retries=2, backoff=0.01)
        with pytest.raises(rm.JudgeError, match=rf"^judge server {url}/v1/completions failed after 3 tries: "
                                                 rf".*{message}"):
            judge.score([("Q?", ["a"])])
    assert len(server.seen) == (0 if fault == "refused" else 3)


def test_http_judge_does_not_retry_a_refused_request():
    with JudgeServer(default="http400") as server, pytest.raises(rm.JudgeError, match="refused the request: HTTP 400"):
        rm.HTTPJudge(server.url, "m", timeout=5, retries=3, backoff=0.01).score([("Q?", ["a"])])
    assert len(server.seen) == 1


def test_http_judge_backs_off_exponentially():
    with JudgeServer() as server:
        server.plan = ["http429", "http503", "http500"]
        rm.HTTPJudge(server.url, "m", timeout=5, retries=3, backoff=0.1).score([("Q?", ["a"])])
    times = [t for *_, t in server.seen]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 3 and all(gap >= 0.1 * 2 ** i for i, gap in enumerate(gaps)), gaps


@pytest.mark.parametrize("action, score", [("text-yes", 1.0), ("text-no", 0.0), ("perhaps", None)])
def test_http_judge_reads_text_without_logprobs_and_never_guesses(action, score):
    with JudgeServer(default=action) as server:
        out = rm.HTTPJudge(server.url, "m", timeout=5, retries=0).score([("Q?", ["a", "b"])])
    assert out[0]["scores"] == [score, score] and len(server.seen) == 2


def test_http_judge_reply_of_the_wrong_shape_is_an_error_and_not_cached(tmp_path):
    cache = rm.DiskCache(str(tmp_path / "scores.jsonl"))
    with JudgeServer(default="wrong-shape") as server:
        judge = rm.HTTPJudge(server.url, "m", timeout=5, retries=3, backoff=0.01)
        judge.keep_replies(cache)
        with pytest.raises(rm.JudgeError, match=r"sent a reply of unexpected shape: .*\"high\""):
            judge.score([("Q?", ["a"])])
    assert len(server.seen) == 1 and cache.entries == {}


SERVED = [*JUDGE_RUN_ARGS, "--HTTP_RETRIES=1", f"--POLICY={ROOT}/models/policy",
          f"--TRAIN_FILE={ROOT}/data/train.jsonl", "--JUDGE_MODEL_NAME=faulty"]


def served_args(server, folder, *extra):
    return [*SERVED, f"--JUDGE={server.url}", f"--OUT_DIR={folder}/out", f"--CACHE_DIR={folder}/cache", *extra]


def prompts_since(server, start):
    return [body["prompt"] for _, body, _, _ in server.seen[start:]]


@pytest.fixture(scope="module")
def judge_server():
    """One server for the whole module: judge ids (and so cache keys) name its port."""
    with JudgeServer() as server:
        yield server


@pytest.fixture(scope="module")
def served(judge_server, tmp_path_factory):
    """An uninterrupted reward_model.py run (in this process) against the well-behaved judge_server:
    (its folder, the prompts it sent in order)."""
    judge_server.reset()
    folder = tmp_path_factory.mktemp("served")
    rm.main(served_args(judge_server, folder))
    return folder, prompts_since(judge_server, 0)


@pytest.fixture()
def server(judge_server, served):
    """judge_server, well-behaved and with nothing recorded, after the reference run."""
    judge_server.reset()
    yield judge_server
    judge_server.reset()


def with_samples(folder, reference):
    """A run folder whose cache already holds the reference run's policy samples (so only judging runs)."""
    (folder / "cache").mkdir(parents=True)
    shutil.copy(reference / "cache" / "samples.jsonl", folder / "cache" / "samples.jsonl")
    return folder


def assert_same_outputs(folder, reference):
    for name in JUDGE_RUN_OUTPUTS:
        assert (folder / "out" / name).read_bytes() == (reference / "out" / name).read_bytes(), name


def test_judge_failure_keeps_every_scored_step_in_the_cache(server, served, tmp_path):
    reference, sent = served
    folder = with_samples(tmp_path / "run", reference)
    n_ok = len(sent) * 2 // 5 + 1                  # the server breaks down part-way through a chunk
    server.fail_after = n_ok
    with pytest.raises(rm.JudgeError, match=r"failed after 2 tries: HTTP 500"):
        rm.main(served_args(server, folder))
    assert not (folder / "out").exists()           # no output was written from a partial run
    kept = set(sent[:n_ok])
    cached = rm.DiskCache(str(folder / "cache" / "scores.jsonl")).entries.values()
    replies = [v for v in cached if isinstance(v, dict) and "choices" in v]
    assert len(replies) == len(kept)               # every step scored before the failure is in the cache
    server.reset()
    rm.main(served_args(server, folder))
    assert prompts_since(server, 0) == [p for p in sent[n_ok:] if p not in kept]  # and is not asked again
    assert_same_outputs(folder, reference)


def test_unparseable_replies_are_counted_and_never_guessed(server, served, tmp_path):
    reference, _ = served
    folder = with_samples(tmp_path / "run", reference)
    server.default = lambda body: "perhaps" if prompt_score(body["prompt"]) < 0.3 else "ok"
    rm.main(served_args(server, folder))
    judged = [json.loads(x) for x in (folder / "out" / "judged.jsonl").read_text().splitlines()]
    counts = json.loads((folder / "out" / "counts.json").read_text())
    n_none = 0
    for row in judged:
        head, texts, tail = common.judge_segments(None, row["prompt"], row["completions"])
        for k, (score, label) in enumerate(zip(row["step_scores"], row["labels"])):
            assert (score is None) == (prompt_score(head + "".join(texts[: k + 1]) + tail) < 0.3)
            assert label is (score is not None and score >= 0.5)
            n_none += score is None
    assert n_none > 0 and counts["unparseable_judge_replies"] == n_none
    meta = [json.loads(x) for x in (folder / "out" / "step_pairs_meta.jsonl").read_text().splitlines()]
    assert all(m["chosen_score"] is not None and m["rejected_score"] is not None for m in meta)


# ----------------------------------------------------------------------------- 3. kills


def kill_points(total, kills, margin):
    """`kills` distinct points in [1, total - margin), drawn with KILL_SEED, in order."""
    return sorted(random.Random(KILL_SEED).sample(range(1, total - margin), kills))


@pytest.mark.parametrize("kills", KILLS)
def test_sigkill_while_judging_then_rerun_is_byte_identical(server, served, tmp_path, kills):
    """Killed when the judge server has had N requests, for N at `kills` random points, and rerun each time:
    the final outputs are byte-identical to the uninterrupted run's, and a kill costs at most the request in
    flight (every reply received before it is reused)."""
    reference, sent = served
    folder = with_samples(tmp_path / "run", reference)
    server.delay = 0.01                            # judging lasts a few seconds, so kills land inside it
    for point in kill_points(len(set(sent)), kills, margin=20):
        target = max(point, len(server.seen) + 1)
        kill_when(run_script("reward_model.py", served_args(server, folder), wait=False),
                  lambda target=target: len(server.seen) >= target)
    run_script("reward_model.py", served_args(server, folder))
    requests = len(server.seen)
    assert requests <= len(sent) + kills, (requests, len(sent))
    assert_same_outputs(folder, reference)


def logged_step(out):
    """The last optimizer step in a run's metrics.jsonl (0 when none)."""
    path, steps = out / "metrics.jsonl", [0]
    for line in (path.read_bytes().split(b"\n")[:-1] if path.exists() else []):
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return max(steps)


@pytest.mark.parametrize("kills", KILLS)
def test_sigkill_while_training_then_resume_matches_uninterrupted(train_setup, tmp_path, kills):
    """Killed when a random optimizer step is logged, resumed each time from the last complete checkpoint:
    every logged metric and the final weights equal the uninterrupted run's."""
    settings = ("--BATCH_SIZE=2", "--EPOCHS=3", "--SAVE_STEPS=4")
    full, part = tmp_path / "full", tmp_path / "part"
    run_script("train_stepwise_dpo.py", train_args(train_setup, full, *settings))
    resume = []
    for point in kill_points(len(training_rows(full)), kills, margin=8):
        target = max(point, logged_step(part) + 1)
        proc = run_script("train_stepwise_dpo.py", train_args(train_setup, part, *settings, *resume), wait=False)
        kill_when(proc, lambda target=target: logged_step(part) >= target)
        resume = ["--RESUME=true"]
    run_script("train_stepwise_dpo.py", train_args(train_setup, part, *settings, "--RESUME=true"))
    a, b = training_rows(full), training_rows(part)
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, 73))
    for ra, rb in zip(a, b):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-6), (ra["step"], key)
    from safetensors.torch import load_file
    wa, wb = load_file(full / "model" / "model.safetensors"), load_file(part / "model" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


# ----------------------------------------------------------------------------- 4. numerics


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_stops_training_before_any_checkpoint_of_it(train_setup, tiny_tokenizer, tiny_model,
                                                                    tmp_path, bad):
    from safetensors.torch import load_file
    from transformers import TrainingArguments

    rows = T.load_pairs(str(train_setup / "pairs.jsonl"), "step")[:8]
    feats = [T.build_features(tiny_tokenizer, r, "step") for r in rows]
    model = copy.deepcopy(tiny_model)
    T.precompute_reference(model, feats, 8, tiny_tokenizer.pad_token_id, True)
    feats[4]["ref_chosen"] = bad                   # a pair of the third batch of two
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, save_steps=1,
                             logging_steps=1, learning_rate=1e-2, use_cpu=True, report_to=[], seed=0,
                             remove_unused_columns=False, train_sampling_strategy="sequential", disable_tqdm=True)
    trainer = T.StepwiseDPOTrainer(model=model, args=args, train_dataset=T.PairDataset(feats),
                                   data_collator=lambda b: T.collate(b, tiny_tokenizer.pad_token_id, True),
                                   dpo={"beta": 0.5, "loss": "sigmoid", "nll_weight": 0.2, "dpop_lambda": 0.0,
                                        "prefix_sharing": True})
    with pytest.raises(FloatingPointError, match=rf"^non-finite loss \({bad}\) at optimizer step 3; "):
        trainer.train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-2"]
    for name in ("checkpoint-1", "checkpoint-2"):
        assert all(torch.isfinite(w).all() for w in load_file(tmp_path / name / "model.safetensors").values())


# ----------------------------------------------------------------------------- 5. security

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


def test_no_eval_exec_or_pickle_anywhere_in_the_source():
    planted = ("import pickle\nfrom marshal import loads\nimport torch, numpy as np, yaml\neval('1')\n"
               "exec('x = 1')\ntorch.load('m.pt')\ntorch.load('m.pt', weights_only=False)\n"
               "np.load('a.npy', allow_pickle=True)\nyaml.load(open('c.yaml'))\n"
               "AutoModel.from_pretrained('m', trust_remote_code=True)\n"
               "torch.load('m.pt', weights_only=True)\nnp.load('a.npy')\nre.compile('x')\n")
    assert [u.split(": ", 1)[1] for u in unsafe_uses(planted, "planted.py")] == [
        "imports pickle", "imports marshal", "calls eval", "calls exec", "torch.load without weights_only=True",
        "torch.load without weights_only=True", "numpy.load with allow_pickle", "yaml.load (use yaml.safe_load)",
        "trust_remote_code=True"]
    sources = list(repo_sources())
    assert len(sources) >= 10 and os.path.join(ROOT, "reward_model.py") in sources
    found = []
    for path in sources:
        with open(path, encoding="utf-8") as f:
            found += unsafe_uses(f.read(), os.path.relpath(path, ROOT))
    assert found == []


def test_trust_remote_code_is_off_by_default(monkeypatch):
    scripts = [import_script(s) for s in discover_scripts()]
    with_flag = {m.__name__: m.TRUST_REMOTE_CODE for m in scripts if hasattr(m, "TRUST_REMOTE_CODE")}
    assert {"evaluate", "reward_model", "train_stepwise_dpo"} <= set(with_flag), with_flag
    assert set(with_flag.values()) == {False}, with_flag
    for fn in (common.load_model, common.load_tokenizer, rm.make_judge):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn.__name__
    calls = []

    class Loaded:
        pad_token_id = eos_token = 0

        def eval(self):
            return self

    def record(path, **kwargs):
        calls.append(kwargs)
        return Loaded()

    import transformers
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record)
    common.load_model("some/model")
    assert len(calls) == 2 and all(c["trust_remote_code"] is False for c in calls)
    assert calls[1]["use_safetensors"] is True


def test_weights_are_saved_and_loaded_only_as_safetensors(train_setup, tiny_tokenizer, tiny_model, tmp_path,
                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    T.main(train_args(train_setup, tmp_path / "out", "--BATCH_SIZE=8", "--MAX_STEPS=4", "--SAVE_STEPS=2"))
    folders = [tmp_path / "out" / d for d in ("checkpoint-2", "checkpoint-4", "model")]
    for folder in folders:
        names = set(os.listdir(folder))
        assert "model.safetensors" in names and not names & {"pytorch_model.bin", "model.pt", "model.bin"}
    from transformers.trainer_pt_utils import safe_globals
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):  # the Trainer's own state, loaded as on resume:
        with safe_globals():                                           # tensors and numpy arrays only
            torch.load(tmp_path / "out" / "checkpoint-4" / name, weights_only=True)
    from safetensors.torch import load_file
    loaded = common.load_model(folders[-1])[0].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in load_file(folders[-1] / "model.safetensors").items())
    pickled = tmp_path / "pickled"                 # the same model as a pickled state dict is refused
    tiny_model.save_pretrained(pickled)
    tiny_tokenizer.save_pretrained(pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    os.remove(pickled / "model.safetensors")
    with pytest.raises(OSError, match="model.safetensors"):
        common.load_model(pickled)


def test_api_key_from_the_environment_is_never_written(server, served, tmp_path, monkeypatch, capfd):
    key = "sk-fault-test-3f9c2a7e51b04d68"
    monkeypatch.setenv("FAULT_TEST_JUDGE_KEY", key)
    folder = with_samples(tmp_path / "run", served[0])
    rm.main(served_args(server, folder, "--JUDGE_API_KEY_ENV=FAULT_TEST_JUDGE_KEY"))
    assert server.seen and {auth for _, _, auth, _ in server.seen} == {f"Bearer {key}"}
    written = files_under(folder)
    assert "out/config.json" in written and "cache/scores.jsonl" in written
    assert [name for name, data in written.items() if key.encode() in data] == []
    out, err = capfd.readouterr()
    assert key not in out and key not in err


# ----------------------------------------------------------------------------- the README table


def test_readme_table_cites_exactly_these_tests():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("\n## What happens when...\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| fault")]
    cited = {name for row in rows for name in re.findall(r"`(test_\w+)`", row.rsplit("|", 2)[-2])}
    defined = {name for name in globals() if name.startswith("test_")}
    assert cited - defined == set(), "cited in README.md but not defined here"
    assert defined - cited == {"test_readme_table_cites_exactly_these_tests"}, "not in the README table"
    assert all(len(row.split(" | ")) == 3 for row in rows)
