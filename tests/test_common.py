"""Run plumbing: overrides, atomic writes, the resumable disk cache, the stage runner."""
import json
import os
import sys

import pytest

from common import DiskCache, Stages, atomic_write_json, atomic_write_jsonl, chunked_cached, config_from_argv


DEFAULTS = {"LR": 1e-3, "STEPS": 10, "NAME": "x", "FLAG": False, "SIZES": [1, 2], "OPT": None}


def test_overrides_parse_each_type():
    cfg = config_from_argv(DEFAULTS, ["--LR=0.5", "--STEPS=3", "--NAME=y", "--FLAG=true", "--SIZES=[4]",
                                      "--OPT=z"])
    assert cfg == {"LR": 0.5, "STEPS": 3, "NAME": "y", "FLAG": True, "SIZES": [4], "OPT": "z"}
    assert DEFAULTS["LR"] == 1e-3  # defaults untouched


@pytest.mark.parametrize("arg, message", [
    ("--NOPE=1", "unknown key --NOPE; valid keys: LR, STEPS, NAME, FLAG, SIZES, OPT"),
    ("--STEPS=1.5", "--STEPS expects int, got '1.5'"),
    ("--FLAG=maybe", "--FLAG expects a boolean"),
    ("--SIZES=3", "--SIZES expects a JSON list"),
    ("STEPS=3", "expected --KEY=value"),
])
def test_overrides_refuse_bad_input(arg, message):
    with pytest.raises(SystemExit) as e:
        config_from_argv(DEFAULTS, [arg])
    assert message in str(e.value)


def test_atomic_write_leaves_only_the_file(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_jsonl(tmp_path / "rows.jsonl", [{"x": "é"}, {"x": 2}])
    assert json.loads(target.read_text()) == {"a": 1}
    assert (tmp_path / "rows.jsonl").read_text(encoding="utf-8") == '{"x": "é"}\n{"x": 2}\n'
    assert sorted(os.listdir(tmp_path)) == ["rows.jsonl", "sub"] and os.listdir(tmp_path / "sub") == ["out.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "out.jsonl"
    atomic_write_jsonl(target, [{"a": 1}])
    with pytest.raises(TypeError):
        atomic_write_jsonl(target, [{"a": object()}])
    assert target.read_text() == '{"a": 1}\n' and os.listdir(tmp_path) == ["out.jsonl"]


def test_disk_cache_survives_a_cut_line(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = DiskCache(str(path))
    cache.put_many([("a", [0.5]), ("b", [0.25, 1.0])])
    with open(path, "a") as f:
        f.write('{"key": "c", "value": [0.')  # a kill mid-write
    again = DiskCache(str(path))
    assert again.entries == {"a": [0.5], "b": [0.25, 1.0]} and "c" not in again
    again.put_many([("a", [0.50001]), ("c", [0.75])])  # a key seen before keeps its first value
    assert DiskCache(str(path)).entries == {"a": [0.5], "b": [0.25, 1.0], "c": [0.75]}


def test_chunked_cache_computes_only_missing_chunks(tmp_path):
    cache = DiskCache(str(tmp_path / "c.jsonl"))
    calls = []

    def compute(idx):
        calls.append(idx)
        return [i * 10 for i in idx]

    keys = [f"k{i}" for i in range(7)]
    cache.put_many([("k3", 30), ("k4", 40), ("k5", 40 + 10)])  # the whole chunk 3..5 is done
    values, computed = chunked_cached(cache, keys, compute, 3, "t")
    assert values == [0, 10, 20, 30, 40, 50, 60] and computed == 4 and calls == [[0, 1, 2], [6]]
    assert chunked_cached(DiskCache(str(tmp_path / "c.jsonl")), keys, compute, 3, "t") == (values, 0)


def test_chunked_cache_computes_a_repeated_key_once_per_chunk(tmp_path):
    calls = []

    def compute(idx):
        calls.append(idx)
        return [i * 10 for i in idx]

    keys = ["a", "b", "a", "c", "b", "c", "a", "d", "a"]         # chunks [a b a c] [b c a d] [a]
    values, computed = chunked_cached(DiskCache(str(tmp_path / "c.jsonl")), keys, compute, 4, "t")
    assert calls == [[0, 1, 3], [4, 5, 6, 7]] and computed == 7  # the last chunk's key came with the first
    assert values == [0, 10, 0, 30, 10, 30, 0, 70, 0]             # a key keeps the value computed first


def test_stages_run_scripts_in_order_and_stop_at_a_failure(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok.py").write_text("import sys\nopen('ok.txt', 'a').write(' '.join(sys.argv[1:]) + '\\n')\n")
    (tmp_path / "bad.py").write_text("raise SystemExit(3)\n")
    (tmp_path / "inproc.py").write_text("def main(argv):\n    return ['got', *argv]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = Stages()
    assert runner.run("first", "ok.py", ["--A=1"]) == 0
    assert runner.run("second", "inproc.py", ["--B=2"], in_process=True) == ["got", "--B=2"]
    with pytest.raises(SystemExit, match=r"^stage third failed with exit status 3: python bad.py --C=3$"):
        runner.run("third", "bad.py", ["--C=3"])
    assert (tmp_path / "ok.txt").read_text() == "--A=1\n" and list(runner.seconds) == ["first", "second"]
    out = capsys.readouterr().out
    assert "==> first: python ok.py --A=1" in out and "==> second: python inproc.py --B=2" in out
    assert sys.executable
