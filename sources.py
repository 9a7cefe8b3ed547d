"""Where rows come from: local JSONL, JSON and parquet files, and Hugging Face Hub datasets, read by one
function (iter_rows) that maps each source's field names onto the repo's formats before any check.

    data/train.jsonl                      JSONL, one object per line (errors name FILE:LINE)
    gsm8k.json                            a JSON list of objects, ProcessBench's files (errors name FILE[i])
    train-00000.parquet                   parquet, read through `datasets` (errors name FILE[i])
    hf:openai/gsm8k:main:test             a Hub dataset, hf:REPO[@REVISION][:CONFIG[:SPLIT]] (errors name SPEC[i]);
    hf:Qwen/ProcessBench::gsm8k           an empty CONFIG is the default one, SPLIT defaults to train

Field mapping (FIELD_MAPS): MATH's {problem, solution} become {question, answer}; GSM8K, Math-Step-DPO-10K
(Lai et al. 2024) and ProcessBench (Zheng et al. 2024, arXiv 2412.06559) rows already have the repo's names.
A Hub spec needs the Hub: offline, it stops at once with how to pass a local file instead (no retry loop).
"""
import json
import os

HUB_PREFIX = "hf:"
HUB_TIMEOUT = 10.0  # seconds to reach the Hub before giving up

# kind -> [(fields a row must have, {repo field: source field})], the first match applies; rows with none of
# them are checked as they are
FIELD_MAPS = {
    "problems": [({"problem", "solution"}, {"question": "problem", "answer": "solution"})],  # MATH, MATH-500
    "pairs": [],         # Math-Step-DPO-10K and TRL preference rows have the repo's names
    "benchmark": [({"question", "steps", "label"}, {"problem": "question"})],  # ProcessBench uses `problem`
}


class DataError(ValueError):
    """A bad row, with the file and line (or row index) it came from in the message."""


def iter_jsonl_lines(path):
    """Yield (line_number, text_or_None, error) for each non-blank line. Reads bytes so that a line that is
    not UTF-8 is reported on its own instead of failing the whole file; strips a BOM and CR."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, f"bytes at offset {e.start} are not valid UTF-8"
                continue
            text = text.rstrip("\r\n")
            if text.strip():
                yield lineno, text, None


def parse_json_object(text):
    """(obj, None) or (None, reason). Trailing garbage after the object is an error, as json.loads says."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return None, f"row is a JSON {type(obj).__name__}, expected an object"
    return obj, None


def map_fields(obj, kind):
    """`obj` with its source field names renamed to the repo's (FIELD_MAPS[kind]); other fields kept."""
    for needs, rename in FIELD_MAPS.get(kind, []):
        if needs <= set(obj) and not set(rename) <= set(obj):  # a row with the repo's names keeps them
            return {k: v for k, v in obj.items() if k not in rename.values()} | {
                new: obj[old] for new, old in rename.items()}
    return obj


# ----------------------------------------------------------------------------- the Hub


def parse_hub_spec(spec):
    """'hf:REPO[@REVISION][:CONFIG[:SPLIT]]' -> (repo, revision or None, config or None, split)."""
    parts = spec[len(HUB_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3 or parts[0].count("/") > 1:
        raise DataError(f"{spec}: expected hf:REPO[@REVISION][:CONFIG[:SPLIT]], e.g. hf:openai/gsm8k:main:test")
    repo, _, revision = parts[0].partition("@")
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return repo, revision or None, config, split


def local_hint(spec):
    repo, revision, config, split = parse_hub_spec(spec)
    return (f"where the Hub can be reached, save it with datasets.load_dataset({repo!r}, {config!r}, "
            f"split={split!r}).to_parquet('{split}.parquet') and pass that file instead of {spec} "
            "(or set HF_HUB_OFFLINE=1 to read a copy already in the Hugging Face cache)")


def load_hub_dataset(spec, timeout=HUB_TIMEOUT):
    """The split a hf: spec names, as a `datasets.Dataset`, pinned to the commit the Hub reports. Fails at
    once with a DataError (and how to pass a local file) when the Hub cannot be reached or has no such data."""
    repo, revision, config, split = parse_hub_spec(spec)
    from huggingface_hub import HfApi, constants

    if not constants.HF_HUB_OFFLINE:
        try:
            revision = HfApi().dataset_info(repo, revision=revision, timeout=timeout).sha
        except Exception as e:  # connection refused, no DNS, timeout, unknown repo: all end the run here
            raise DataError(f"{spec}: the Hugging Face Hub ({constants.ENDPOINT}) did not give this dataset "
                            f"({type(e).__name__}: {str(e)[:200]}); {local_hint(spec)}") from None
    import datasets

    try:
        return datasets.load_dataset(repo, config, split=split, revision=revision)
    except Exception as e:  # offline without a cached copy, or a config or split it does not have
        raise DataError(f"{spec}: could not load it ({type(e).__name__}: {str(e)[:300]}); "
                        f"{local_hint(spec)}") from None


# ----------------------------------------------------------------------------- every source


def source_name(spec):
    """A short name for a source in a report: the split of a hf: spec, else the file name without extension."""
    spec = str(spec)
    return parse_hub_spec(spec)[3] if spec.startswith(HUB_PREFIX) else os.path.splitext(os.path.basename(spec))[0]


def iter_rows(spec, kind=None):
    """Yield (where, obj_or_None, reason_or_None) per row of any source, fields mapped for `kind` (problems,
    pairs, benchmark). `where` is FILE:LINE for JSONL, FILE[i] / SPEC[i] (0-based row index) otherwise."""
    spec = str(spec)
    if spec.startswith(HUB_PREFIX) or spec.endswith(".parquet"):
        if spec.startswith(HUB_PREFIX):
            table = load_hub_dataset(spec)
        else:
            import datasets

            table = datasets.load_dataset("parquet", data_files=spec, split="train")
        for i, obj in enumerate(table):
            yield f"{spec}[{i}]", map_fields(obj, kind), None
    elif spec.endswith(".json"):
        with open(spec, encoding="utf-8-sig") as f:
            try:
                table = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{spec}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if not isinstance(table, list):
            raise DataError(f"{spec}: expected a JSON list of rows, got a {type(table).__name__}")
        for i, obj in enumerate(table):
            ok = isinstance(obj, dict)
            yield f"{spec}[{i}]", map_fields(obj, kind) if ok else None, None if ok else (
                f"row is a JSON {type(obj).__name__}, expected an object")
    else:
        if not os.path.exists(spec):
            raise DataError(f"{spec}: no such file (a local .jsonl, .json or .parquet file, or hf:REPO:CONFIG:SPLIT)")
        for lineno, text, err in iter_jsonl_lines(spec):
            obj = None
            if err is None:
                obj, err = parse_json_object(text)
            yield f"{spec}:{lineno}", map_fields(obj, kind) if obj is not None else None, err


def iter_checked_rows(spec, row_errors=None, kind=None):
    """Yield (where, obj, reason) per row: reason is None for a good row, else why it is bad (not UTF-8, not
    a JSON object, or what `row_errors(obj) -> [reason]` finds)."""
    for where, obj, err in iter_rows(spec, kind):
        if err is None and row_errors is not None:
            errs = row_errors(obj)
            err = "; ".join(errs) if errs else None
        yield where, obj, err


def read_rows(spec, row_errors=None, kind=None):
    """All rows of a source as dicts. Raises DataError naming where the first bad row is and why."""
    rows = []
    for where, obj, err in iter_checked_rows(spec, row_errors, kind):
        if err is not None:
            raise DataError(f"{where}: {err}")
        rows.append(obj)
    return rows


def read_jsonl(path, row_errors=None):
    """All rows of a JSONL file (read_rows for a file the pipeline wrote itself)."""
    return read_rows(path, row_errors)
