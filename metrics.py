"""Metrics, as pure functions: pass@k and majority voting for the policy; AUROC, rank correlation and
ProcessBench F1 for the judge.
"""
from math import comb

from data_utils import answers_match, normalize_answer
from task import arithmetic_slip


def pass_at_k(n, c, k):
    """Probability that at least one of k samples drawn from n (c of them correct) is correct."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_answer(answers):
    """Most common answer, answers that grade equal (data_utils.answers_match: '\\frac12' and '1/2') voting
    together, ties broken by first appearance; its normalised form, None if no sample has an answer."""
    groups = []  # [representative, votes]
    for a in answers:
        if a is None:
            continue
        group = next((g for g in groups if answers_match(a, g[0])), None)
        if group:
            group[1] += 1
        else:
            groups.append([a, 1])
    if not groups:
        return None
    return normalize_answer(max(groups, key=lambda g: g[1])[0])


def auroc(scores, labels):
    """Area under the ROC curve: the probability that a correct step outscores a wrong one (ties count
    half), by the Mann-Whitney U statistic with average ranks."""
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    if not n_pos or not n_neg:
        return None
    rank_sum = sum(r for r, y in zip(average_ranks(scores), labels) if y)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def average_ranks(values):
    """Ranks 1..n of `values`, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks, i = [0.0] * len(values), 0
    while i < len(order):
        j = i
        while j < len(order) and values[order[j]] == values[order[i]]:
            j += 1
        for k in order[i:j]:
            ranks[k] = (i + 1 + j) / 2
        i = j
    return ranks


def spearman(a, b):
    """Spearman's rank correlation: Pearson's correlation of the average ranks (ties handled); None when
    either list is constant or shorter than 2."""
    if len(a) != len(b):
        raise ValueError(f"lists of different lengths: {len(a)} and {len(b)}")
    if len(a) < 2:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / (va * vb) ** 0.5 if va and vb else None


def processbench_f1(predicted, reference):
    """ProcessBench (Zheng et al. 2024, arXiv 2412.06559): first-error indices (-1 = no error); accuracy on
    erroneous and on correct solutions, and their harmonic mean. A kind of solution the data lacks has no
    accuracy (None), and then there is no F1 either (None), rather than a made-up 0."""
    err = [p == r for p, r in zip(predicted, reference) if r != -1]
    ok = [p == r for p, r in zip(predicted, reference) if r == -1]
    acc_err = sum(err) / len(err) if err else None
    acc_ok = sum(ok) / len(ok) if ok else None
    f1 = None if acc_err is None or acc_ok is None else (
        2 * acc_err * acc_ok / (acc_err + acc_ok) if acc_err + acc_ok else 0.0)
    return {"f1": f1, "acc_erroneous": acc_err, "acc_correct": acc_ok, "n_erroneous": len(err),
            "n_correct": len(ok)}


def first_error_auroc(solutions):
    """How well the judge separates right steps from first errors, by kind of error: AUROC of the scores of
    every right step against those of the first wrong steps that are arithmetic slips ('39 + 15 = 52'),
    and against the other first errors (a wrong quantity or operation). solutions: [(steps, labels,
    scores)]. The first errors are what ProcessBench F1 asks the judge to find."""
    right, slips, other = [], [], []
    for steps, labels, scores in solutions:
        right += [x for x, ok in zip(scores, labels) if ok]
        e = next((j for j, ok in enumerate(labels) if not ok), -1)
        if e >= 0:
            (slips if arithmetic_slip(steps[e]) else other).append(scores[e])
    return {kind: auroc(right + wrong, [True] * len(right) + [False] * len(wrong))
            for kind, wrong in (("arithmetic_slip", slips), ("other", other))} | {
        "n_right_steps": len(right), "n_arithmetic_slip": len(slips), "n_other": len(other)}


def bootstrap_difference(a, b, n_boot=2000, seed=0):
    """Mean accuracy difference of method a over method b with its 95% bootstrap interval. a, b: per training
    seed, 0/1 per problem (the same problems in the same order). Each draw resamples the problems, the same
    draw for both methods (the comparison is paired), and each method's seeds, so the interval holds both
    the test set's and the training seeds' share of the noise."""
    import numpy as np

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b need one row per seed over the same problems, got shapes {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    problems = rng.integers(a.shape[1], size=(n_boot, a.shape[1]))
    seeds_a, seeds_b = rng.integers(len(a), size=(n_boot, len(a))), rng.integers(len(b), size=(n_boot, len(b)))
    # a draw's accuracy: the mean over its seeds of the per-seed mean over its problems
    acc_a = np.take_along_axis(a[seeds_a], problems[:, None, :], axis=2).mean(axis=(1, 2))
    acc_b = np.take_along_axis(b[seeds_b], problems[:, None, :], axis=2).mean(axis=(1, 2))
    low, high = np.quantile(acc_a - acc_b, [0.025, 0.975])
    return {"difference": float(a.mean() - b.mean()), "low": float(low), "high": float(high)}
