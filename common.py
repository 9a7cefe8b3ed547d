"""Run plumbing: command-line overrides, atomic file output, the resumable disk cache, the stage runner.

Nothing here knows about models or prompts (prompts.py, models.py).
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

# ----------------------------------------------------------------------------- config overrides


def parse_value(key, text, default):
    """Parse `text` as the type of `default`; a clear error otherwise."""
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise SystemExit(f"--{key} expects a boolean (true/false), got {text!r}")
    if isinstance(default, (int, float)):
        try:
            value = type(default)(text)
        except ValueError:
            raise SystemExit(f"--{key} expects {type(default).__name__}, got {text!r}") from None
        return value
    if isinstance(default, (list, tuple, dict)):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise SystemExit(f"--{key} expects JSON ({type(default).__name__}), got {text!r}") from None
        if not isinstance(value, (list, dict) if not isinstance(default, dict) else dict):
            raise SystemExit(f"--{key} expects a JSON {type(default).__name__}, got {text!r}")
        return type(default)(value) if isinstance(default, (list, tuple)) else value
    if default is None:
        return None if text.lower() in ("none", "null", "") else text
    return text


def config_from_argv(defaults, argv):
    """Resolved config: `defaults` (the script's UPPER_CASE tunables) overridden by `--KEY=value` args.
    An unknown key stops the script with the list of valid keys; a value of the wrong type, with the type
    the key expects."""
    cfg = dict(defaults)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"expected --KEY=value, got {arg!r}; valid keys: {', '.join(defaults)}")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise SystemExit(f"unknown key --{key}; valid keys: {', '.join(defaults)}")
        cfg[key] = parse_value(key, text, defaults[key])
    return cfg


# ----------------------------------------------------------------------------- file output


def atomic_write_text(path, text):
    """Write through a temporary file in the same folder and rename: readers never see half a file."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the permissions of a plainly created file, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path, rows):
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def file_sha256(path):
    """The first 16 hex digits of a file's SHA-256: names a data file's exact content in a config."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def print_json(obj):
    print(json.dumps(obj), flush=True)


def command_line(script, argv):
    """The command that produced a result, for the record: `python SCRIPT ARGS` (the same whether the
    script ran as a program or its main(argv) was called)."""
    return " ".join(["python", os.path.relpath(script)] + list(argv))


# ----------------------------------------------------------------------------- resumable disk cache


class DiskCache:
    """Append-only JSONL of {key: value} entries. A line cut short by a kill is ignored on load; every
    write is flushed and fsynced before the run moves on, so finished work is never redone."""

    def __init__(self, path):
        self.path, self.entries = path, {}
        if os.path.exists(path):
            with open(path, "rb+") as f:  # drop a line cut short by a kill, so appends start on a new line
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(entry, dict) and "key" in entry:
                        self.entries[entry["key"]] = entry["value"]

    def __contains__(self, key):
        return key in self.entries

    def __getitem__(self, key):
        return self.entries[key]

    def put_many(self, items):
        """Store new entries. A key already present keeps its first value: the same solution scored again
        in another batch differs in the last float bits, and a run must read back what it used."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for key, value in items:
                if key in self.entries:
                    continue
                f.write(json.dumps({"key": key, "value": value}) + "\n")
                self.entries[key] = value
            f.flush()
            os.fsync(f.fileno())


def cache_key(*parts):
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


def chunked_cached(cache, keys, compute, chunk, desc):
    """Values for `keys`, computing missing ones with compute(indices) -> values in fixed chunks of the
    full key list; a key that a chunk holds more than once is computed once. Chunks are the same on every
    run, so a resumed run batches exactly as a fresh one and produces bit-identical numbers. Returns
    (values, number of distinct keys computed)."""
    from tqdm import tqdm

    todo = [start for start in range(0, len(keys), chunk)
            if any(k not in cache for k in keys[start:start + chunk])]
    computed = 0
    for start in tqdm(todo, desc=desc, disable=not todo):
        if all(k in cache for k in keys[start:start + chunk]):   # its keys came with an earlier chunk
            continue
        idx = sorted({keys[i]: i for i in reversed(range(start, min(start + chunk, len(keys))))}.values())
        values = compute(idx)
        cache.put_many([(keys[i], v) for i, v in zip(idx, values)])
        computed += len(idx)
    return [cache[k] for k in keys], computed


# ----------------------------------------------------------------------------- stages


class Stages:
    """Runs a pipeline's stages in order, each a script given by its file and arguments, printing the command
    and recording its wall time in `seconds`. By default a stage is its own process (a clean start, and
    a failure stops the run with the stage's exit status); in_process=True calls the script's main(argv)
    and returns what it returns (the smoke run inspects the trainer it builds)."""

    def __init__(self):
        self.seconds = {}

    def run(self, name, script, args, in_process=False):
        print(f"==> {name}: python {' '.join([script, *args])}", flush=True)
        t = time.time()
        if in_process:
            import importlib

            result = importlib.import_module(os.path.splitext(script)[0]).main(list(args))
        else:
            result = subprocess.run([sys.executable, script, *args]).returncode
            if result:
                raise SystemExit(f"stage {name} failed with exit status {result}: python {script} {' '.join(args)}")
        self.seconds[name] = round(time.time() - t, 1)
        return result
