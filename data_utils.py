"""GSM8K-format data: loading and validation, the problem split, step splitting, answer grading.

    python data_utils.py --validate FILE      # one line per bad row, then a JSON summary; exit 1 if any
    python data_utils.py --generate           # (re)write data/train.jsonl and data/test.jsonl
    python data_utils.py                      # data/{train,test}.jsonl -> data/{train,test}_steps.jsonl

Input rows are GSM8K's `{"question", "answer"}`: one reasoning step per line, then `#### <final>`.
Step files use TRL's stepwise-supervision shape `{"prompt", "completions", "labels"}`.

The bundled task (--generate), its reference step labels and corrupted solutions are in task.py.
"""
import json
import re
import sys
from fractions import Fraction

from common import atomic_write_jsonl, config_from_argv, print_json
from prompts import FINAL_MARK

# ----------------------------------------------------------------------------- tunables
# files
TRAIN_FILE = "data/train.jsonl"
TEST_FILE = "data/test.jsonl"
# bundled task generator (used by --generate)
SEED = 1234
N_TRAIN = 8000            # problems in data/train.jsonl
N_TEST = 500              # problems in data/test.jsonl, none of them in train
MIN_OPS = 2               # operations per story; an operation on groups takes two solution steps
MAX_OPS = 4
MAX_START = 40            # the starting quantity is drawn from [10, MAX_START]
MAX_VALUE = 200           # no quantity in a solution exceeds this
PRICE_PROB = 0.35         # chance the story ends by pricing the items (one more multiplication step)
# step files
STEP_DELIMITER = "\n"     # how the answer separates steps ("\n" for GSM8K)
STRIP_CALCULATOR = True   # drop GSM8K's <<a*b=c>> annotations from the step text
CONFIG_KEYS = [k for k in list(globals()) if k.isupper()]

# The bundled training problems (indices into data/train.jsonl) by use, defined here once:
POLICY_GOLD = (0, 4000)    # the gold solutions the policy is supervised on (sft.py)
PAIRS_POOL = (4000, 6000)  # reached only through the policy's own samples and the judge: the pairs come from
                           # here (reward_model.py, experiments.py), and the judge never learns from them

# ----------------------------------------------------------------------------- loading and validation


class DataError(ValueError):
    """A bad row, with the file and line it came from in the message."""


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


def problem_row_errors(obj):
    """Reasons a parsed row is not a GSM8K problem, each naming the field."""
    errors = []
    for field in ("question", "answer"):
        if field not in obj:
            errors.append(f"field '{field}' is missing")
        elif not isinstance(obj[field], str):
            errors.append(f"field '{field}' must be a string, got {type(obj[field]).__name__}")
        elif not obj[field].strip():
            errors.append(f"field '{field}' is empty")
    if not errors:
        lines = [ln for ln in obj["answer"].replace("\r\n", "\n").split("\n") if ln.strip()]
        if not lines or not lines[-1].strip().startswith(FINAL_MARK) or not lines[-1].strip()[len(FINAL_MARK):].strip():
            errors.append(f"field 'answer' has no final line '{FINAL_MARK} <answer>'")
    return errors


def iter_checked_rows(path, row_errors=None):
    """Yield (line_number, obj, reason) per non-blank line: reason is None for a good row, else why it is
    bad (not UTF-8, not a JSON object, or what `row_errors(obj) -> [reason]` finds)."""
    for lineno, text, err in iter_jsonl_lines(path):
        obj = None
        if err is None:
            obj, err = parse_json_object(text)
        if err is None and row_errors is not None:
            errs = row_errors(obj)
            err = "; ".join(errs) if errs else None
        yield lineno, obj, err


def read_jsonl(path, row_errors=None):
    """All rows of a JSONL file as dicts. Raises DataError naming file, line and field on the first bad row.
    `row_errors(obj) -> [reason]` adds a schema check."""
    rows = []
    for lineno, obj, err in iter_checked_rows(path, row_errors):
        if err is not None:
            raise DataError(f"{path}:{lineno}: {err}")
        rows.append(obj)
    return rows


def load_problems(path):
    """GSM8K-format problems, validated."""
    return read_jsonl(path, problem_row_errors)


def validate_file(path, out=sys.stdout):
    """Print `FILE:LINE: reason` per bad row, then a JSON summary line. Returns the summary dict."""
    n_rows, n_bad, step_counts = 0, 0, []
    for lineno, obj, err in iter_checked_rows(path, problem_row_errors):
        n_rows += 1
        if err is not None:
            n_bad += 1
            print(f"{path}:{lineno}: {err}", file=out)
            continue
        step_counts.append(len(split_steps(obj["answer"])[0]))
    summary = {
        "file": str(path), "rows": n_rows, "valid": n_rows - n_bad, "invalid": n_bad,
        "steps_min": min(step_counts) if step_counts else None,
        "steps_max": max(step_counts) if step_counts else None,
        "steps_mean": round(sum(step_counts) / len(step_counts), 3) if step_counts else None,
    }
    print(json.dumps(summary), file=out)
    return summary


# ----------------------------------------------------------------------------- steps
CALCULATOR_RE = re.compile(r"<<[^<>]*>>")
STEP_MARKER_RE = re.compile(r"(?:^|\s)Step\s*\d+\s*[:.]\s*", re.IGNORECASE)


def strip_calculator(text):
    """'48/2 = <<48/2=24>>24 clips' -> '48/2 = 24 clips'."""
    return CALCULATOR_RE.sub("", text)


def split_steps(answer, delimiter="\n", strip_calc=False):
    """Solution text -> (steps, final_answer_or_None).

    The final answer is the text after the last '####' line, if any. Steps are the non-empty pieces before
    it, split on `delimiter`; when the text uses 'Step 1: ... Step 2: ...' markers, those split it instead
    (and the markers are dropped). Step text is otherwise kept as written."""
    text = answer.replace("\r\n", "\n")
    final = None
    lines = text.split("\n")
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].strip().startswith(FINAL_MARK):
            final = lines[i].strip()[len(FINAL_MARK):].strip()
            text = "\n".join(lines[:i])
            break
    if len(STEP_MARKER_RE.findall(text)) >= 2 or STEP_MARKER_RE.match(text.lstrip()):
        pieces = STEP_MARKER_RE.split(text)
    else:
        pieces = text.split(delimiter)
    steps = [p.strip() for p in pieces if p.strip()]
    if strip_calc:
        steps = [strip_calculator(s) for s in steps]
    return steps, final


def join_solution(steps, final):
    """The inverse of split_steps for the bundled format."""
    return "\n".join(steps) + f"\n{FINAL_MARK} {final}"


# ----------------------------------------------------------------------------- answers
BOXED_RE = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
ANSWER_IS_RE = re.compile(r"answer is[:\s]*\$?\s*(-?[\d,]*\.?\d+(?:/\d+)?)", re.IGNORECASE)


def extract_answer(text):
    """Final answer from '#### x', else the last '\\boxed{x}', else 'The answer is x'; None if absent."""
    for line in reversed(text.replace("\r\n", "\n").split("\n")):
        if line.strip().startswith(FINAL_MARK):
            return line.strip()[len(FINAL_MARK):].strip() or None
    boxed = BOXED_RE.findall(text)
    if boxed:
        return boxed[-1].strip()
    said = ANSWER_IS_RE.findall(text)
    return said[-1] if said else None


NUMBER_RE = re.compile(r"^-?(\d+(\.\d*)?|\.\d+)(/\d+)?$")


def normalize_answer(ans):
    """Canonical string for grading: '$1,080.00' -> '1080', '-3.50' -> '-7/2', '6/8' -> '3/4'.
    Non-numeric answers are lower-cased with spaces collapsed."""
    if ans is None:
        return None
    s = ans.strip().replace("\\!", "").replace("$", "").replace(",", "").replace(" ", "")
    s = re.sub(r"^\\(?:text|mathrm)\{(.*)\}$", r"\1", s)
    frac = re.fullmatch(r"\\d?frac\{(-?\d+)\}\{(\d+)\}", s)
    if frac:
        s = f"{frac.group(1)}/{frac.group(2)}"
    s = s.rstrip(".")
    if NUMBER_RE.match(s):
        try:
            value = Fraction(s)
        except (ValueError, ZeroDivisionError):
            return s.lower()
        return str(value)
    return " ".join(ans.lower().split())


def answers_match(predicted, gold):
    p, g = normalize_answer(predicted), normalize_answer(gold)
    return p is not None and p == g


def to_step_rows(problems, delimiter="\n", strip_calc=True):
    """Gold solutions in TRL's stepwise-supervision shape (every gold step labelled correct)."""
    rows = []
    for p in problems:
        steps, final = split_steps(p["answer"], delimiter, strip_calc)
        rows.append({"prompt": p["question"], "completions": steps, "labels": [True] * len(steps),
                     "answer": final})
    return rows


def main(argv):
    if argv[:1] == ["--validate"]:
        if len(argv) != 2:
            sys.exit("usage: python data_utils.py --validate FILE")
        summary = validate_file(argv[1])
        sys.exit(1 if summary["invalid"] else 0)
    generate = "--generate" in argv
    cfg = config_from_argv({k: globals()[k] for k in CONFIG_KEYS}, [a for a in argv if a != "--generate"])
    if generate:
        from task import generate_task

        train, test = generate_task(cfg["N_TRAIN"], cfg["N_TEST"], cfg["SEED"], min_ops=cfg["MIN_OPS"],
                                    max_ops=cfg["MAX_OPS"], max_start=cfg["MAX_START"],
                                    max_value=cfg["MAX_VALUE"], price_prob=cfg["PRICE_PROB"])
        atomic_write_jsonl(cfg["TRAIN_FILE"], train)
        atomic_write_jsonl(cfg["TEST_FILE"], test)
        print_json({"wrote": [cfg["TRAIN_FILE"], cfg["TEST_FILE"]], "train": len(train), "test": len(test)})
        return
    paths = (cfg["TRAIN_FILE"], cfg["TEST_FILE"])
    problems = [load_problems(path) for path in paths]  # every input checked before anything is written
    for path, rows in zip(paths, problems):
        rows = to_step_rows(rows, cfg["STEP_DELIMITER"], cfg["STRIP_CALCULATOR"])
        out = path.replace(".jsonl", "_steps.jsonl")
        atomic_write_jsonl(out, rows)
        print_json({"wrote": out, "rows": len(rows)})


if __name__ == "__main__":
    main(sys.argv[1:])
