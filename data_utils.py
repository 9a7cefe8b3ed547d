"""Problems, pairs and judge benchmarks: validation, the problem split, step splitting, answer grading.

    python data_utils.py --validate SOURCE    # one line per bad row, then a JSON summary; exit 1 if any
    python data_utils.py --generate           # (re)write data/train.jsonl and data/test.jsonl
    python data_utils.py                      # data/{train,test}.jsonl -> data/{train,test}_steps.jsonl

Problem rows are GSM8K's `{"question", "answer"}` (MATH's `{problem, solution}` are mapped onto them): the
reasoning steps, then a final answer, a `#### <final>` line or `\\boxed{<final>}`. A SOURCE is a JSONL, JSON
or parquet file or a Hub dataset `hf:REPO:CONFIG:SPLIT` (sources.py). Pairs files are Math-Step-DPO-10K rows,
whole-solution rows with judged step scores, or TRL preference rows; benchmarks are ProcessBench rows.
Step files use TRL's stepwise-supervision shape `{"prompt", "completions", "labels"}`.

The bundled task (--generate), its reference step labels and corrupted solutions are in task.py.
"""
import json
import re
import sys
import threading
from fractions import Fraction

from common import atomic_write_jsonl, config_from_argv, print_json
from prompts import FINAL_MARK, boxed_spans
from sources import iter_checked_rows, read_rows

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
STEP_DELIMITER = "newline"  # how solutions separate steps: newline (GSM8K) | blank_line | step ('Step k:' lines)
                            # | markdown_step ('## Step k:' blocks) | any other text, split on literally
STRIP_CALCULATOR = True   # drop GSM8K's <<a*b=c>> annotations from the step text
CONFIG_KEYS = [k for k in list(globals()) if k.isupper()]

# The bundled training problems (indices into data/train.jsonl) by use, defined here once:
POLICY_GOLD = (0, 4000)    # the gold solutions the policy is supervised on (sft.py)
PAIRS_POOL = (4000, 6000)  # reached only through the policy's own samples and the judge: the pairs come from
                           # here (reward_model.py, experiments.py), and the judge never learns from them
VALIDATION = (6000, 6500)  # problems the policy never learns from and no pairs come from: a training recipe is
                           # chosen on them (experiments.py --EVAL_ON=validation), never on the test set

# ----------------------------------------------------------------------------- loading and validation


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
    if not errors and not split_steps(obj["answer"])[1]:
        errors.append(f"field 'answer' has no final line '{FINAL_MARK} <answer>' and no \\boxed{{<answer>}}")
    return errors


def load_problems(spec):
    """Problems from any source (sources.py: a JSONL, JSON or parquet file, or hf:REPO:CONFIG:SPLIT), with
    MATH's fields mapped onto GSM8K's, validated."""
    return read_rows(spec, problem_row_errors, "problems")


def benchmark_row_errors(obj):
    """Reasons a parsed row is not a ProcessBench row {problem, steps, label}, each naming the field."""
    if not isinstance(obj.get("problem"), str) or not obj["problem"].strip():
        return ["field 'problem' must be a non-empty string"]
    steps = obj.get("steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(x, str) for x in steps):
        return ["field 'steps' must be a non-empty list of strings"]
    label = obj.get("label")
    if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < len(steps):
        return [f"field 'label' must be -1 or the index of a step (0..{len(steps) - 1}), got {json.dumps(label)}"]
    return []


def load_benchmark(spec):
    """ProcessBench-format rows (Zheng et al. 2024, arXiv 2412.06559): `label` is the index of the first wrong
    step, -1 when every step is right. From any source (sources.py), validated."""
    return read_rows(spec, benchmark_row_errors, "benchmark")


STEP_KEYS = ("prompt", "initial_reason_steps", "chosen", "rejected")
FULL_KEYS = ("prompt", "chosen_steps", "rejected_steps", "chosen_step_scores", "rejected_step_scores", "answer")
PLAIN_KEYS = ("prompt", "chosen", "rejected")  # TRL's preference shape, whole solutions (outcome only)


def _is_score(s):
    return s is None or (isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s <= 1)


FIELD_CHECKS = {  # kind -> (test, what the message says it must be)
    "string": (lambda v: isinstance(v, str), "a string"),
    "strings": (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "a list of strings"),
    "scores": (lambda v: isinstance(v, list) and all(map(_is_score, v)), "a list of scores in [0, 1] or null"),
}


def load_pairs(path, mode):
    """Rows of a pairs source, checked for the fields `mode` needs (file, line or row, and field named on
    error). `outcome` also takes TRL's plain preference rows {prompt, chosen, rejected}."""
    kinds = dict.fromkeys(STEP_KEYS, "string") if mode == "step" else dict(zip(FULL_KEYS, (
        "string", "strings", "strings", "scores", "scores", "string")))

    def pair_errors(row):
        if mode == "outcome" and "chosen_steps" not in row and set(PLAIN_KEYS) <= set(row):
            bad = [k for k in PLAIN_KEYS if not isinstance(row[k], str)]
            return [f"field '{bad[0]}' must be a string, got {json.dumps(row[bad[0]])[:40]}"] if bad else []
        missing = [k for k in kinds if k not in row]
        if missing:
            hint = " (MODE=step needs Math-Step-DPO rows; weighted/outcome need full_pairs rows)"
            return [f"field '{missing[0]}' is missing{hint}"]
        for key, kind in kinds.items():
            ok, what = FIELD_CHECKS[kind]
            if not ok(row[key]):
                return [f"field '{key}' must be {what}, got {json.dumps(row[key])[:40]}"]
        if mode != "step" and (len(row["chosen_steps"]) != len(row["chosen_step_scores"])
                               or len(row["rejected_steps"]) != len(row["rejected_step_scores"])):
            return ["field 'chosen_step_scores'/'rejected_step_scores' must have one score per step"]
        return []

    return read_rows(path, pair_errors, "pairs")


def validate_file(path, out=sys.stdout, delimiter="newline"):
    """Print `FILE:LINE: reason` (`SOURCE[i]: reason` for a table) per bad row, then a JSON summary line.
    Returns the summary dict."""
    n_rows, n_bad, step_counts = 0, 0, []
    for where, obj, err in iter_checked_rows(path, problem_row_errors, "problems"):
        n_rows += 1
        if err is not None:
            n_bad += 1
            print(f"{where}: {err}", file=out)
            continue
        step_counts.append(len(split_steps(obj["answer"], delimiter)[0]))
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
STEP_MARKER_RE = re.compile(r"(?:^|\s)(?:#+[ \t]*)?Step\s*\d+\s*[:.]\s*", re.IGNORECASE)


def strip_calculator(text):
    """'48/2 = <<48/2=24>>24 clips' -> '48/2 = 24 clips'."""
    return CALCULATOR_RE.sub("", text)


# name -> (pattern that splits a solution into steps, text that joins steps back as the policy writes them)
STEP_DELIMITERS = {
    "newline": (r"\n", "\n"),
    "blank_line": (r"\n[ \t]*\n", "\n\n"),
    "step": (r"\n(?=[ \t]*Step\s*\d+\s*[:.])", "\n"),              # before each line 'Step k: ...'
    "markdown_step": (r"\n(?=[ \t]*#+[ \t]*Step\s*\d+)", "\n\n"),   # before each block '## Step k: ...'
}


def step_separator(delimiter):
    """The text that joins steps split on `delimiter` back into a solution (prompts.step_text's `sep`)."""
    return STEP_DELIMITERS[delimiter][1] if delimiter in STEP_DELIMITERS else delimiter


def split_steps(answer, delimiter="newline", strip_calc=False):
    """Solution text -> (steps, final_answer_or_None).

    The final answer is the text after the last '####' line (the line is then dropped), else what
    extract_answer finds (the last \\boxed{}, which stays in its step). Steps are the non-empty pieces
    before it, split on `delimiter`: a STEP_DELIMITERS name (the 'Step k:' markers of `step` and
    `markdown_step` stay in the step text, so joining with step_separator rebuilds the solution) or any
    other text, split on literally. With `newline`, a text that uses 'Step 1: ... Step 2: ...' markers is
    split on them instead (and the markers are dropped). Step text is otherwise kept as written."""
    text = answer.replace("\r\n", "\n")
    final = None
    lines = text.split("\n")
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].strip().startswith(FINAL_MARK):
            final = lines[i].strip()[len(FINAL_MARK):].strip()
            text = "\n".join(lines[:i])
            break
    else:
        final = extract_answer(text)
    delimiter = "newline" if delimiter == "\n" else delimiter
    if delimiter == "newline" and (len(STEP_MARKER_RE.findall(text)) >= 2 or STEP_MARKER_RE.match(text.lstrip())):
        pieces = STEP_MARKER_RE.split(text)
    elif delimiter in STEP_DELIMITERS:
        pieces = re.split(STEP_DELIMITERS[delimiter][0], text)
    else:
        pieces = text.split(delimiter)
    steps = [p.strip() for p in pieces if p.strip()]
    if strip_calc:
        steps = [strip_calculator(s) for s in steps]
    return steps, final


def join_solution(steps, final, sep="\n"):
    """The inverse of split_steps: the steps joined by `sep`, then the line '#### final' unless the steps
    already state the final answer in \\boxed{} (or there is none)."""
    text = sep.join(steps)
    if final is None or (last_boxed(text) == final and FINAL_MARK not in text):
        return text
    return text + f"\n{FINAL_MARK} {final}"


# ----------------------------------------------------------------------------- answers
ANSWER_IS_RE = re.compile(r"answer is[:\s]*\$?\s*(-?[\d,]*\.?\d+(?:/\d+)?)", re.IGNORECASE)


def last_boxed(text):
    """The content of the last closed \\boxed{...}, braces balanced; None when there is none."""
    spans = boxed_spans(text)
    return text[spans[-1][0]:spans[-1][1] - 1].strip() if spans else None


def extract_answer(text):
    """Final answer from '#### x', else the last '\\boxed{x}', else 'The answer is x'; None if absent."""
    for line in reversed(text.replace("\r\n", "\n").split("\n")):
        if line.strip().startswith(FINAL_MARK):
            return line.strip()[len(FINAL_MARK):].strip() or None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
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


def latex_equal(predicted, gold):
    """Whether two LaTeX answers are the same mathematical object, by math-verify (Kydlicek et al. 2025; its
    LaTeX parser and sympy): '\\frac12' = '1/2', 'x=3' = '3', '3\\sqrt2' = '3\\sqrt{2}'. Its time limits use
    signals, which only the main thread may set; elsewhere it runs without them."""
    from math_verify import parse, verify

    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"${gold.strip().strip('$')}$", parsing_timeout=limit)
    predicted_parsed = parse(f"${predicted.strip().strip('$')}$", parsing_timeout=limit)
    return bool(gold_parsed and predicted_parsed and verify(gold_parsed, predicted_parsed, timeout_seconds=limit))


def answers_match(predicted, gold):
    """The one grading function (evaluation, pairs, majority votes): two plain numbers are compared exactly
    (normalize_answer); otherwise equal normalized strings match, and LaTeX answers go to math-verify."""
    p, g = normalize_answer(predicted), normalize_answer(gold)
    if p is None or g is None:
        return False
    if p == g:
        return True
    if NUMBER_RE.match(p) and NUMBER_RE.match(g):
        return False
    return latex_equal(predicted, gold)


def to_step_rows(problems, delimiter="newline", strip_calc=True):
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
