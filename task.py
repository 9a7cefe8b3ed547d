"""The bundled task: a deterministic generator of multi-step arithmetic word problems in GSM8K format, the
reference step labels that check a solution step by step (a small arithmetic parser, never `eval`), and
automatically corrupted solutions.

The reference labels build the judge's training data and measure the judge; the pipeline never uses them in
place of the judge.
"""
import random
import re
from fractions import Fraction

from data_utils import (MAX_OPS, MAX_START, MAX_VALUE, MIN_OPS, N_TEST, N_TRAIN, PRICE_PROB, SEED, answers_match,
                        join_solution, load_problems, split_steps, strip_calculator)

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


def equation_text(step):
    """The last equation of a step as 'lhs = value' ('34 + 12 = 46'), or 'none'."""
    eqs = find_equations(step) if step is not None else []
    return f"{eqs[-1][0]} = {fmt_number(eqs[-1][1])}" if eqs else "none"


def check_text(gold_steps, k, step):
    """The check the bundled judge learns to write after step k of a solution: the computation the gold
    solution makes at step k, recomputed ('none' past its end), then the step's own equation beside it,
    so that its answer compares the two: ' 34 + 12 = 46; step: 34 + 12 = 47'. Written by this program from
    the reference solution, for the judge's training data only; at judging time the judge writes it."""
    return f" {equation_text(gold_steps[k] if k < len(gold_steps) else None)}; step: {equation_text(step)}\n"


def drill_equation(rng, max_value=MAX_VALUE):
    """A random equation 'a op b = c' of the kinds the task's operations make (_story_op: adding up to 30 or a
    group total, subtracting, a group total, doubling to quadrupling, dividing into 2-9 piles, pricing at
    2-9 each), no quantity above max_value: an arithmetic drill for the bundled judge, whose checks make
    these computations."""
    kind = rng.choice(["add", "add_total", "sub", "groups", "mul", "div", "price"])
    if kind in ("add", "add_total"):
        n = rng.randint(2, 30) if kind == "add" else rng.randint(2, 6) * rng.randint(2, 10)
        x = rng.randint(1, max_value - n)
        return f"{x} + {n} = {x + n}"
    if kind == "sub":
        x = rng.randint(2, max_value)
        n = rng.randint(1, x - 1)
        return f"{x} - {n} = {x - n}"
    if kind == "groups":
        a, b = rng.randint(2, 6), rng.randint(2, 10)
        return f"{a} * {b} = {a * b}"
    if kind == "div":
        d = rng.randint(2, 9)
        q = rng.randint(1, max_value // d)
        return f"{q * d} / {d} = {q}"
    m = rng.randint(2, 4) if kind == "mul" else rng.randint(2, 9)
    x = rng.randint(1, max_value // m)
    return f"{x} * {m} = {x * m}"


class OracleJudge:
    """Not an LLM: the bundled task's programmatic reference labels (task.label_steps) as step scores
    (1.0 right, 0.0 wrong), looked up by question in a problems file. The ceiling a judge can reach; used by
    the experiments as a control (reward_model.make_judge's spec "oracle:data/train.jsonl")."""

    def __init__(self, problems_file, template=""):
        from models import fingerprint

        self.answers = {p["question"]: p["answer"] for p in load_problems(problems_file)}
        self.id, self.template = f"oracle:{problems_file}@{fingerprint(problems_file)}", template

    def score(self, items):
        out = []
        for question, steps in items:
            if question not in self.answers:
                raise KeyError(f"oracle judge: question not in its problems file: {question[:80]!r}")
            out.append({"scores": [float(ok) for ok in label_steps(self.answers[question], steps)], "raw": None})
        return out
