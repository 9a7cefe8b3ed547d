"""GSM8K-format data: loading and validation, step splitting, answer grading, the bundled task.

    python data_utils.py --validate FILE      # one line per bad row, then a JSON summary; exit 1 if any
    python data_utils.py --generate           # (re)write data/train.jsonl and data/test.jsonl
    python data_utils.py                      # data/{train,test}.jsonl -> data/{train,test}_steps.jsonl

Input rows are GSM8K's `{"question", "answer"}`: one reasoning step per line, then `#### <final>`.
Step files use TRL's stepwise-supervision shape `{"prompt", "completions", "labels"}`.

The bundled task is a deterministic generator of multi-step arithmetic word problems. Its solutions can be
checked programmatically (`label_steps`, a small arithmetic parser, never `eval`). Those labels are
reference labels: they build the judge's training data and measure the judge; the pipeline never uses them
in place of the judge.
"""
import json
import random
import re
import sys
from fractions import Fraction

from common import atomic_write_jsonl, config_from_argv, print_json

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

# ----------------------------------------------------------------------------- loading and validation
FINAL_MARK = "####"


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
        if not lines or not lines[-1].strip().startswith(FINAL_MARK) or not lines[-1].strip()[4:].strip():
            errors.append("field 'answer' has no final line '#### <answer>'")
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


# ----------------------------------------------------------------------------- safe arithmetic
TOKEN_RE = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|(.))")
OPS = {"+": "+", "-": "-", "*": "*", "x": "*", "×": "*", "/": "/", "÷": "/"}


def tokenize_arith(expr):
    tokens = []
    for number, other in TOKEN_RE.findall(expr.replace(",", "")):
        if number:
            tokens.append(Fraction(number))
        elif other.strip():
            if other in OPS:
                tokens.append(OPS[other])
            elif other in "()":
                tokens.append(other)
            else:
                raise ValueError(f"unexpected character {other!r} in {expr!r}")
    return tokens


def eval_arith(expr):
    """Exact value of an arithmetic expression (+ - * / x parentheses, unary minus) as a Fraction.
    A recursive-descent parser: data and model text are never passed to eval."""
    tokens = tokenize_arith(expr)
    if not tokens or len(tokens) > 200:
        raise ValueError(f"empty or too long expression {expr!r}")
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError(f"unexpected end of {expr!r}")
        pos += 1
        return tokens[pos - 1]

    def expression():
        value = term()
        while peek() in ("+", "-"):
            value = value + term() if take() == "+" else value - term()
        return value

    def term():
        value = factor()
        while peek() in ("*", "/"):
            if take() == "*":
                value = value * factor()
            else:
                divisor = factor()
                if divisor == 0:
                    raise ValueError(f"division by zero in {expr!r}")
                value = value / divisor
        return value

    def factor():
        tok = peek()
        if tok == "-":
            take()
            return -factor()
        if tok == "(":
            take()
            value = expression()
            if take() != ")":
                raise ValueError(f"unbalanced parentheses in {expr!r}")
            return value
        if isinstance(tok, Fraction):
            return take()
        raise ValueError(f"unexpected {tok!r} in {expr!r}")

    value = expression()
    if pos != len(tokens):
        raise ValueError(f"trailing tokens in {expr!r}")
    return value


# 'lhs = rhs' where lhs is an arithmetic expression with at least one operator and rhs a number.
EQUATION_RE = re.compile(r"((?:\(\s*)*-?\$?\d[\d,.]*(?:\s*\)?\s*[-+*/x×÷]\s*\(?\s*-?\$?\d[\d,.]*\)?)+)\s*=\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")


def find_equations(step):
    """[(lhs_text, claimed_value)] for each 'a op b = c' in a step (annotations are ignored)."""
    found = []
    for lhs, rhs in EQUATION_RE.findall(strip_calculator(step)):
        lhs = lhs.replace("$", "").strip().rstrip(".")
        try:
            found.append((lhs, Fraction(rhs.replace(",", ""))))
        except ValueError:
            continue
    return found


def equation_operands(lhs):
    return sorted(t for t in tokenize_arith(lhs) if isinstance(t, Fraction))


def label_steps(gold_answer, steps):
    """Reference label per step: True iff every equation in the step is arithmetically right and its last
    equation computes the same quantity as the gold solution's step at that position (same value from the
    same operands). Steps past the gold solution's length, or without an equation, are False."""
    gold_steps, _ = split_steps(gold_answer)
    gold = []
    for g in gold_steps:
        eqs = find_equations(g)
        try:
            gold.append((equation_operands(eqs[-1][0]), eqs[-1][1]) if eqs else None)
        except ValueError:
            gold.append(None)
    labels = []
    for k, step in enumerate(steps):
        eqs = find_equations(step)
        ok = bool(eqs) and k < len(gold) and gold[k] is not None
        try:
            ok = ok and all(eval_arith(lhs) == claimed for lhs, claimed in eqs)
            ok = ok and (equation_operands(eqs[-1][0]), eqs[-1][1]) == gold[k]
        except ValueError:
            ok = False
        labels.append(bool(ok))
    return labels


def arithmetic_slip(step):
    """True when the step's last equation is arithmetically wrong ('32 + 12 = 42')."""
    eqs = find_equations(step)
    try:
        return bool(eqs) and eval_arith(eqs[-1][0]) != eqs[-1][1]
    except ValueError:
        return False


def fmt_number(value):
    """Fraction -> '12', '-3', '7/2'."""
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def corrupt_solution(steps, final, rng, question=""):
    """Plant one error in a correct solution and let it propagate: step j's result (an arithmetic slip), one
    of its operands (another number) or its operator changes; later steps that used step j's result are
    recomputed from the wrong value, as a model that made the slip would. Returns (steps, final, j), or None
    when the solution has no equation to corrupt."""
    parsed = [find_equations(s) for s in steps]
    candidates = [j for j, eqs in enumerate(parsed) if eqs]
    if not candidates:
        return None
    j = rng.choice(candidates)
    lhs, value = parsed[j][-1]
    kind = rng.choice(["result", "result", "operand", "operator"])
    new_lhs, new_value = lhs, value
    if kind == "operand":
        numbers = [Fraction(n) for n in re.findall(r"\d+", question)] + [eq[-1][1] for eq in parsed[:j] if eq]
        operands = re.findall(r"\d+(?:\.\d+)?", lhs)
        others = [n for n in numbers if n not in {Fraction(o) for o in operands}]
        if others:
            old = rng.choice(operands)
            new_lhs = re.sub(rf"(?<![\d.]){re.escape(old)}(?![\d.])", fmt_number(rng.choice(others)), lhs, count=1)
    elif kind == "operator":
        swaps = {"+": "-", "-": "+", "*": "+", "/": "*", "x": "+"}
        ops = [(i, c) for i, c in enumerate(lhs) if c in swaps and i > 0]
        if ops:
            i, c = rng.choice(ops)
            new_lhs = lhs[:i] + swaps[c] + lhs[i + 1:]
    try:
        new_value = eval_arith(new_lhs)
    except ValueError:
        new_lhs, new_value = lhs, value
    if new_value == value:  # operand/operator change was a no-op or could not apply: make a slip
        new_lhs = lhs
        delta = rng.choice([1, 2, 10, -1, -2, -10, 3, -3])
        new_value = value + delta
    out = list(steps)
    out[j] = replace_equation(steps[j], lhs, value, new_lhs, new_value)
    changes = {value: new_value}
    for k in range(j + 1, len(steps)):
        if not parsed[k]:
            continue
        k_lhs, k_value = parsed[k][-1]
        # only the first operand equal to a changed value is taken to be that value (in '3 * 3' only one 3
        # is the earlier result), and in one pass (21 -> 23 must not then become 25 via 23 -> 25)
        hit = next((m for m in re.finditer(r"(?<![\d.])\d+(?:\.\d+)?(?![\d.])", k_lhs)
                    if Fraction(m.group()) in changes), None)
        sub_lhs = k_lhs
        if hit is not None:
            new = fmt_number(changes[Fraction(hit.group())])
            sub_lhs = k_lhs[:hit.start()] + (f"({new})" if new.startswith("-") else new) + k_lhs[hit.end():]
        if sub_lhs != k_lhs:
            try:
                k_new = eval_arith(sub_lhs)
            except ValueError:
                continue
            out[k] = replace_equation(steps[k], k_lhs, k_value, sub_lhs, k_new)
            changes[k_value] = k_new
    new_final = final
    last = find_equations(out[-1])
    if final is not None and last and answers_match(final, fmt_number(parsed[-1][-1][1]) if parsed[-1] else None):
        new_final = fmt_number(last[-1][1])  # the final answer follows the last step, as the policy's would
    return out, new_final, j


def replace_equation(step, lhs, value, new_lhs, new_value):
    """Rewrite 'lhs = value' inside a step (annotation-free text) as 'new_lhs = new_value'."""
    text = strip_calculator(step)
    pattern = re.escape(lhs) + r"(\s*=\s*\$?\s*)" + re.escape(fmt_number(value))
    return re.sub(pattern, lambda m: new_lhs + m.group(1) + fmt_number(new_value), text, count=1)


# ----------------------------------------------------------------------------- the bundled task
NAMES = [("Mia", "she", "her"), ("Liam", "he", "his"), ("Ava", "she", "her"), ("Noah", "he", "his"),
         ("Zoe", "she", "her"), ("Omar", "he", "his"), ("Lena", "she", "her"), ("Ivan", "he", "his"),
         ("Rosa", "she", "her"), ("Ben", "he", "his")]
ITEMS = ["apples", "stickers", "marbles", "books", "coins", "shells", "pencils", "cards", "stamps", "eggs"]
CONTAINERS = ["boxes", "bags", "packs", "jars", "crates"]


def _story_op(rng, x, max_value):
    """One operation on the running total x: (question sentence, [(step template, lhs, value)], new x).
    Returns None if the drawn operation does not fit x."""
    kind = rng.choice(["add", "sub", "add_groups", "sub_groups", "mul", "div"])
    if kind == "add":
        n = rng.randint(2, 30)
        if x + n > max_value:
            return None
        return ("{He} finds {n} more {items}.", [("After that, {he} has {lhs} = {v} {items}.", f"{x} + {n}", x + n)],
                x + n, {"n": n})
    if kind == "sub":
        if x < 4:
            return None
        n = rng.randint(1, x - 1)
        return ("{He} gives away {n} {items}.", [("Then {he} has {lhs} = {v} {items} left.", f"{x} - {n}", x - n)],
                x - n, {"n": n})
    if kind in ("add_groups", "sub_groups"):
        a, b = rng.randint(2, 6), rng.randint(2, 10)
        t = a * b
        c = rng.choice(CONTAINERS)
        if kind == "add_groups":
            if x + t > max_value:
                return None
            return ("{He} buys {a} " + c + " with {b} {items} in each.",
                    [("The " + c + " hold {lhs} = {v} {items}.", f"{a} * {b}", t),
                     ("Now {he} has {lhs} = {v} {items}.", f"{x} + {t}", x + t)], x + t, {"a": a, "b": b})
        if t >= x:
            return None
        return ("{He} gives {a} friends {b} {items} each.",
                [("{He} gives away {lhs} = {v} {items}.", f"{a} * {b}", t),
                 ("So {he} has {lhs} = {v} {items} left.", f"{x} - {t}", x - t)], x - t, {"a": a, "b": b})
    if kind == "mul":
        m = rng.randint(2, 4)
        if x * m > max_value:
            return None
        word = {2: "twice", 3: "three times", 4: "four times", 5: "five times"}[m]
        return ("Then {he} ends up with " + word + " as many {items}.",
                [("Now {he} has {lhs} = {v} {items}.", f"{x} * {m}", x * m)], x * m, {})
    divisors = [d for d in range(2, 10) if x % d == 0 and x // d >= 2]
    if not divisors:
        return None
    d = rng.choice(divisors)
    return ("{He} splits {his} {items} into {d} equal piles and keeps one pile.",
            [("One pile has {lhs} = {v} {items}.", f"{x} / {d}", x // d)], x // d, {"d": d})


def make_problem(rng, min_ops=MIN_OPS, max_ops=MAX_OPS, max_start=MAX_START, max_value=MAX_VALUE,
                 price_prob=PRICE_PROB):
    """One GSM8K-format problem with calculator annotations, drawn from `rng` (a random.Random)."""
    name, he, his = rng.choice(NAMES)
    items = rng.choice(ITEMS)
    x = rng.randint(10, max_start)
    fields = {"He": he.capitalize(), "he": he, "his": his, "items": items}
    sentences = [f"{name} has {x} {items}."]
    steps = []
    n_ops = rng.randint(min_ops, max_ops)
    while n_ops > 0:
        op = _story_op(rng, x, max_value)
        if op is None:
            continue
        sentence, op_steps, x, numbers = op
        sentences.append(sentence.format(**fields, **numbers))
        for template, lhs, v in op_steps:
            steps.append(template.format(**fields, lhs=lhs, v=f"<<{lhs.replace(' ', '')}={v}>>{v}"))
        n_ops -= 1
    prices = [p for p in range(2, 10) if x * p <= max_value]
    if prices and rng.random() < price_prob:
        p = rng.choice(prices)
        sentences.append(f"Each of the {items} sells for ${p}. How many dollars does {name} get for all of them?")
        steps.append(f"{name} gets {x} * {p} = <<{x}*{p}={x * p}>>{x * p} dollars.")
        x = x * p
    else:
        sentences.append(f"How many {items} does {name} have now?")
    return {"question": " ".join(sentences), "answer": join_solution(steps, x)}


def generate_task(n_train=N_TRAIN, n_test=N_TEST, seed=SEED, **kw):
    """Deterministic train/test split with no question in both."""
    rng = random.Random(seed)
    seen, problems = set(), []
    while len(problems) < n_train + n_test:
        p = make_problem(rng, **kw)
        if p["question"] not in seen:
            seen.add(p["question"])
            problems.append(p)
    return problems[n_test:], problems[:n_test]


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
