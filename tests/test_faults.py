"""Faults injected on purpose, and what the scripts do about each one.

docs/faults.md lists every fault with its behaviour and the test that shows it (here, or for the single
requests of a served judge in test_reward_model.py); test_fault_table_cites_exactly_these_tests keeps the
table and the tests in step. The kill tests stop a run at points drawn with a fixed seed: 3 of them in the
default run, 10 with `python -m pytest -m slow`.
"""
import copy
import glob
import inspect
import json
import math
import os
import random
import re
import shutil

import pytest
import torch

import batching as B
import judges
import models
import reward_model as rm
import train_stepwise_dpo as T
from common import DiskCache, chunked_cached
from conftest import (JUDGE_RUN_ARGS, JUDGE_RUN_OUTPUTS, ROOT, FakeServer, discover_scripts, files_under,
                      import_script, kill_when, prompt_score, repo_sources, run_script, train_args, training_rows,
                      unsafe_uses)
from sources import DataError
from prompts import ANSWER_CUE, check_answer, check_head, check_step, judge_segments

KILL_SEED = 8
KILLS = [3, pytest.param(10, marks=pytest.mark.slow)]




# ----------------------------------------------------------------------------- 1. inputs






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
    cache = DiskCache(str(path))
    cache.put_many([(f"k{i}", [i / 10]) for i in range(6)])
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = "garbage that is not JSON\n"        # k1 damaged
    lines[3] = '["a", "list"]\n'                   # k3 not an entry
    path.write_text("".join(lines) + '{"key": "k9", "val')   # and a last line cut by a kill
    calls = []

    def compute(idx):
        calls.append(idx)
        return [[i / 10] for i in idx]

    values, computed = chunked_cached(DiskCache(str(path)), [f"k{i}" for i in range(6)], compute, 2, "t")
    assert values == [[i / 10] for i in range(6)] and calls == [[0, 1], [2, 3]] and computed == 4
    assert DiskCache(str(path)).entries == {f"k{i}": [i / 10] for i in range(6)}


# ----------------------------------------------------------------------------- 2. the served judge (its single
# requests: test_reward_model.py)


SERVED = [*JUDGE_RUN_ARGS, "--HTTP_RETRIES=1", f"--POLICY={ROOT}/models/policy",
          f"--TRAIN_FILE={ROOT}/data/train.jsonl", "--JUDGE_MODEL_NAME=faulty"]


def served_args(server, folder, *extra):
    return [*SERVED, f"--JUDGE={server.url}", f"--OUT_DIR={folder}/out", f"--CACHE_DIR={folder}/cache", *extra]


def prompts_since(server, start):
    return [body["prompt"] for _, body, _, _ in server.seen[start:]]


@pytest.fixture(scope="module")
def judge_server():
    """One server for the whole module: judge ids (and so cache keys) name its port."""
    with FakeServer() as server:
        yield server


MODES = ["one_pass", "check"]


@pytest.fixture(scope="module")
def served(judge_server, tmp_path_factory):
    """Uninterrupted reward_model.py runs (in this process) against the well-behaved judge_server, one per
    JUDGE_MODE: {mode: (its folder, the prompts it sent in order)}."""
    runs = {}
    for mode in MODES:
        judge_server.reset()
        folder = tmp_path_factory.mktemp(f"served-{mode}")
        rm.main(served_args(judge_server, folder, f"--JUDGE_MODE={mode}"))
        runs[mode] = folder, prompts_since(judge_server, 0)
    return runs


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


@pytest.mark.parametrize("mode", MODES)
def test_judge_failure_keeps_every_scored_step_in_the_cache(server, served, tmp_path, mode):
    """The server breaks down for good part-way through a chunk (in check mode, between a check and the
    answer after it)."""
    reference, sent = served[mode]
    folder = with_samples(tmp_path / "run", reference)
    n_ok = len(sent) * 2 // 5 // 2 * 2 + 1         # odd: a check was answered, its answer request fails
    server.fail_after = n_ok
    with pytest.raises(judges.JudgeError, match=r"failed after 2 tries: HTTP 500"):
        rm.main(served_args(server, folder, f"--JUDGE_MODE={mode}"))
    assert not (folder / "out").exists()           # no output was written from a partial run
    kept = set(sent[:n_ok])
    cached = DiskCache(str(folder / "cache" / "scores.jsonl")).entries.values()
    replies = [v for v in cached if isinstance(v, dict) and "choices" in v]
    assert len(replies) == len(kept)               # every step scored before the failure is in the cache
    server.reset()
    rm.main(served_args(server, folder, f"--JUDGE_MODE={mode}"))
    assert prompts_since(server, 0) == [p for p in sent[n_ok:] if p not in kept]  # and is not asked again
    assert_same_outputs(folder, reference)


def test_unparseable_replies_are_counted_and_never_guessed(server, served, tmp_path):
    reference, _ = served["one_pass"]
    folder = with_samples(tmp_path / "run", reference)
    server.default = lambda body: "perhaps" if prompt_score(body["prompt"]) < 0.3 else "ok"
    rm.main(served_args(server, folder, "--JUDGE_MODE=one_pass"))
    judged = [json.loads(x) for x in (folder / "out" / "judged.jsonl").read_text().splitlines()]
    counts = json.loads((folder / "out" / "counts.json").read_text())
    n_none = 0
    for row in judged:
        head, texts, tail = judge_segments(None, row["prompt"], row["completions"])
        for k, (score, label) in enumerate(zip(row["step_scores"], row["labels"])):
            assert (score is None) == (prompt_score(head + "".join(texts[: k + 1]) + tail) < 0.3)
            assert label is (score is not None and score >= 0.5)
            n_none += score is None
    assert n_none > 0 and counts["unparseable_judge_replies"] == n_none
    meta = [json.loads(x) for x in (folder / "out" / "step_pairs_meta.jsonl").read_text().splitlines()]
    assert all(m["chosen_score"] is not None and m["rejected_score"] is not None for m in meta)


def replay_checks(row):
    """The prompts a served check judge sent for one judged row, rebuilt from its stored checks and scores:
    [(check prompt, answer prompt)] per step."""
    text, prompts = check_head(None, row["prompt"]), []
    for step, check, score in zip(row["completions"], row["checks"], row["step_scores"]):
        text += check_step(step)
        prompts.append((text, text + check + ANSWER_CUE))
        text += check + ANSWER_CUE + check_answer(score is not None and score >= 0.5)
    return prompts


@pytest.mark.parametrize("fault", ["perhaps", "cut"])
def test_a_check_that_never_answers_or_is_cut_leaves_its_step_unscored(server, served, tmp_path, fault):
    """perhaps: after the check the reply is neither Yes nor No; cut: the check reaches the token limit before
    the answer cue, and no answer is asked for. Either way the step is unscored (None), counted, stored
    with its check in judged.jsonl, and never in a pair."""
    folder = with_samples(tmp_path / "run", served["check"][0])
    answering = fault == "perhaps"                 # which request misbehaves: the answer, or the check
    server.default = lambda body: fault if ("stop" not in body) == answering and prompt_score(body["prompt"]) < 0.3 \
        else "ok"
    rm.main(served_args(server, folder, "--JUDGE_MODE=check"))
    judged = [json.loads(x) for x in (folder / "out" / "judged.jsonl").read_text().splitlines()]
    sent, n_none = set(prompts_since(server, 0)), 0
    for row in judged:
        for (check_prompt, answer_prompt), score in zip(replay_checks(row), row["step_scores"]):
            assert (score is None) == (prompt_score(answer_prompt if answering else check_prompt) < 0.3)
            assert check_prompt in sent and (answer_prompt in sent) == (answering or score is not None)
            n_none += score is None
    assert n_none > 0 and json.loads((folder / "out" / "counts.json").read_text())["unparseable_judge_replies"] == n_none
    meta = [json.loads(x) for x in (folder / "out" / "step_pairs_meta.jsonl").read_text().splitlines()]
    assert all(m["chosen_score"] is not None and m["rejected_score"] is not None for m in meta)


# ----------------------------------------------------------------------------- 3. kills


def kill_points(total, kills, margin):
    """`kills` distinct points in [1, total - margin), drawn with KILL_SEED, in order."""
    return sorted(random.Random(KILL_SEED).sample(range(1, total - margin), kills))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kills", KILLS)
def test_sigkill_while_judging_then_rerun_is_byte_identical(server, served, tmp_path, kills, mode):
    """Killed when the judge server has had N requests, for N at `kills` random points, and rerun each time:
    the final outputs are byte-identical to the uninterrupted run's, and a kill costs at most the request in
    flight (every reply received before it is reused)."""
    reference, sent = served[mode]
    folder = with_samples(tmp_path / "run", reference)
    server.delay = 0.01                            # judging lasts a few seconds, so kills land inside it
    args = served_args(server, folder, f"--JUDGE_MODE={mode}")
    for point in kill_points(len(set(sent)), kills, margin=20):
        target = max(point, len(server.seen) + 1)
        kill_when(run_script("reward_model.py", args, wait=False), lambda target=target: len(server.seen) >= target)
    run_script("reward_model.py", args)
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
            # float rounding, not state: most kill patterns give identical metrics, some drift by ~2e-6 relative
            # (docs/faults.md); a lost optimizer state or a skipped batch moves them by orders of magnitude more
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-5), (ra["step"], key)
    from safetensors.torch import load_file
    wa, wb = load_file(full / "model" / "model.safetensors"), load_file(part / "model" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


# ----------------------------------------------------------------------------- 4. numerics


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_stops_training_before_any_checkpoint_of_it(train_setup, tiny_tokenizer, tiny_model,
                                                                    tmp_path, bad):
    from safetensors.torch import load_file
    from transformers import TrainingArguments

    rows = T.load_pairs(str(train_setup / "pairs.jsonl"), "step")[:8]
    feats = [T.build_features(tiny_tokenizer, r, "step") for r in rows]
    model = copy.deepcopy(tiny_model)
    B.precompute_reference(model, feats, 8, tiny_tokenizer.pad_token_id, True)
    feats[4]["ref_chosen"] = bad                   # a pair of the third batch of two
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, save_steps=1,
                             logging_steps=1, learning_rate=1e-2, use_cpu=True, report_to=[], seed=0,
                             remove_unused_columns=False, train_sampling_strategy="sequential", disable_tqdm=True)
    trainer = T.StepwiseDPOTrainer(model=model, args=args, train_dataset=T.PairDataset(feats),
                                   data_collator=lambda b: B.collate(b, tiny_tokenizer.pad_token_id, True),
                                   dpo=T.DPOSettings(beta=0.5, nll_weight=0.2, dpop_lambda=0.0))
    with pytest.raises(FloatingPointError, match=rf"^non-finite loss \({bad}\) at optimizer step 3; "):
        trainer.train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-2"]
    for name in ("checkpoint-1", "checkpoint-2"):
        assert all(torch.isfinite(w).all() for w in load_file(tmp_path / name / "model.safetensors").values())


# ----------------------------------------------------------------------------- 5. security









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
    for fn in (models.load_model, models.load_tokenizer):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn.__name__
    assert "TRUST_REMOTE_CODE" in rm.JUDGE_KEYS   # make_judge takes it from a script's config, default False
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
    models.load_model("some/model")
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
        assert "training_args.json" in names and "training_args.bin" not in names  # the Trainer's pickle, as JSON
    from transformers.trainer_pt_utils import safe_globals
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):  # the Trainer's own state, loaded as on resume:
        with safe_globals():                                           # tensors and numpy arrays only
            torch.load(tmp_path / "out" / "checkpoint-4" / name, weights_only=True)
    from safetensors.torch import load_file
    loaded = models.load_model(folders[-1])[0].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in load_file(folders[-1] / "model.safetensors").items())
    pickled = tmp_path / "pickled"                 # the same model as a pickled state dict is refused
    tiny_model.save_pretrained(pickled)
    tiny_tokenizer.save_pretrained(pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    os.remove(pickled / "model.safetensors")
    with pytest.raises(OSError, match="model.safetensors"):
        models.load_model(pickled)


def test_api_key_from_the_environment_is_never_written(server, served, tmp_path, monkeypatch, capfd):
    key = "sk-fault-test-3f9c2a7e51b04d68"
    monkeypatch.setenv("FAULT_TEST_JUDGE_KEY", key)
    folder = with_samples(tmp_path / "run", served["one_pass"][0])
    rm.main(served_args(server, folder, "--JUDGE_API_KEY_ENV=FAULT_TEST_JUDGE_KEY"))
    assert server.seen and {auth for _, _, auth, _ in server.seen} == {f"Bearer {key}"}
    written = files_under(folder)
    assert "out/config.json" in written and "cache/scores.jsonl" in written
    assert [name for name, data in written.items() if key.encode() in data] == []
    out, err = capfd.readouterr()
    assert key not in out and key not in err


# ----------------------------------------------------------------------------- the fault table


def test_fault_table_cites_exactly_these_tests():
    """Every test the table cites exists (here, or in the test module of the code it is about), and every test
    here is cited."""
    with open(os.path.join(ROOT, "docs", "faults.md"), encoding="utf-8") as f:
        rows = [line for line in f.read().splitlines() if line.startswith("| ") and not line.startswith("| fault")]
    cited = {name for row in rows for name in re.findall(r"`(test_\w+)`", row.rsplit("|", 2)[-2])}
    defined = {name for path in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))
               for name in re.findall(r"^def (test_\w+)", open(path, encoding="utf-8").read(), re.M)}
    here = {name for name in globals() if name.startswith("test_")}
    assert cited - defined == set(), "cited in docs/faults.md but defined in no test module"
    assert here - cited == {"test_fault_table_cites_exactly_these_tests"}, "not in the fault table"
    assert all(len(row.split(" | ")) == 3 for row in rows)
