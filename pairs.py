"""From step scores to training pairs: aggregation, the first judged error, Step-DPO step pairs, whole-solution
pairs, and a diagnostic of the pairs against the bundled task's reference step labels.

Step-DPO (Lai et al. 2024, arXiv 2406.18629): in a sample with a wrong final answer the judge locates the
error (error_step) and that step is rejected; the chosen step follows the same prefix and comes from a
continuation that reaches the correct final answer (chosen_continuation).
"""
import math
import os

from data_utils import answers_match, join_solution, load_problems, split_steps, step_separator
from task import arithmetic_slip, label_steps
from metrics import auroc
from prompts import step_text
from sources import read_jsonl

# ----------------------------------------------------------------------------- step scores


def aggregate(scores, how):
    """Solution score from step scores: min and prod (Lightman et al. 2023, arXiv 2305.20050), mean, last.
    Unscored steps (None: the judge's reply was neither Yes nor No) are left out; no scores give 0."""
    scores = [s for s in scores if s is not None]
    if not scores:
        return 0.0
    if how == "min":
        return min(scores)
    if how == "prod":
        return math.prod(scores)
    if how == "mean":
        return sum(scores) / len(scores)
    if how == "last":
        return scores[-1]
    raise ValueError(f"unknown aggregation {how!r}; use min, prod, mean or last")


def first_error(scores, threshold):
    """Index of the first step scored under `threshold` (ProcessBench's label convention), -1 if none.
    An unscored step (None) is not an error."""
    return next((k for k, s in enumerate(scores) if s is not None and s < threshold), -1)


def parse_solution(text, gold, scores=None, delimiter="newline"):
    """A sample's steps (split on `delimiter`), final answer and grade; "sep" joins its steps back."""
    steps, final = split_steps(text, delimiter)
    return {"text": text, "steps": steps, "final": final if final is not None else "",
            "correct": answers_match(final, gold), "scores": scores, "sep": step_separator(delimiter)}


# ----------------------------------------------------------------------------- pairs


def error_step(sol, threshold, wrong_only=True):
    """The step a Step-DPO pair rejects in `sol`, or -1 for none. wrong_only: only a sample whose final
    answer is wrong has one: its first step scored under `threshold`, or, when the judge accepts every step,
    the lowest-scored one (a wrong answer means some step is wrong). Otherwise any sample's first judged
    error. A step the judge left unscored (None) is never picked."""
    if wrong_only and sol["correct"]:
        return -1
    e = first_error(sol["scores"], threshold)
    if e >= 0 or not wrong_only:
        return e
    scored = [k for k, s in enumerate(sol["scores"]) if s is not None]
    return min(scored, key=lambda k: sol["scores"][k]) if scored else -1


def find_step_pairs(question, gold, solutions, threshold, reaches_answer=True, wrong_only=True, accepted=False):
    """Step-DPO pairs among one problem's judged samples.

    solutions: [{"steps", "scores", "correct"}]. For each sample with an error step e (error_step), the
    chosen step is step e of another sample with the same first e steps (chosen_continuation). Returns
    (pairs, unmatched) where unmatched lists (prefix, rejected solution, e) needing self-rectification."""
    pairs, unmatched, seen = [], [], set()
    for bad in solutions:
        e = error_step(bad, threshold, wrong_only)
        if e < 0 or None in bad["scores"][: e + 1]:
            continue
        prefix = bad["steps"][:e]
        if (tuple(prefix), bad["steps"][e]) in seen:
            continue
        seen.add((tuple(prefix), bad["steps"][e]))
        good = chosen_continuation(solutions, prefix, bad, e, threshold, reaches_answer, accepted)
        if good:
            pairs.append(make_step_pair(question, gold, prefix, good, bad, e, "other_sample"))
        else:
            unmatched.append((prefix, bad, e))
    return pairs, unmatched


def build_step_pairs(questions, gold, solutions, rectify, threshold, reaches_answer=True, wrong_only=True,
                     accepted=False):
    """Step-DPO pairs of every problem (find_step_pairs); the rejected steps no other sample answers go to
    rectify([(problem index, prefix, rejected solution, step index)]) -> [[continuation]], the judged
    continuations sampled from each prefix (self-rectification). Returns ([(row, meta)], attempts, rectified)."""
    pairs, unmatched = [], []
    for i, (q, g, row) in enumerate(zip(questions, gold, solutions)):
        found, missing = find_step_pairs(q, g, row, threshold, reaches_answer, wrong_only, accepted)
        pairs += found
        unmatched += [(i, *m) for m in missing]
    rectified = 0
    for (i, prefix, bad, e), row in zip(unmatched, rectify(unmatched)):
        good = chosen_continuation(row, prefix, bad, e, threshold, reaches_answer, accepted)
        if good:
            pairs.append(make_step_pair(questions[i], gold[i], prefix, good, bad, e, "rectified"))
            rectified += 1
    return pairs, len(unmatched), rectified


def chosen_continuation(candidates, prefix, bad, e, threshold, reaches_answer=True, accepted=False):
    """The candidate whose step e follows `prefix` and differs from `bad`'s step e; if `reaches_answer`, it
    must end in the correct final answer (as Step-DPO's chosen continuations do), and if `accepted`, the judge
    must accept its step e. Preferred: the correct final answer, then the higher min score of the steps from
    e on. None when there is none."""
    options = [s for s in candidates if len(s["steps"]) > e and s["steps"][:e] == prefix
               and s["steps"][e] != bad["steps"][e] and s["scores"][e] is not None
               and (s["scores"][e] >= threshold or not accepted) and (s["correct"] or not reaches_answer)]
    return max(options, key=lambda s: (s["correct"], aggregate(s["scores"][e:], "min"))) if options else None


def make_step_pair(question, gold, prefix, good, bad, e, source):
    sep = bad.get("sep", "\n")
    row = {"prompt": question, "initial_reason_steps": step_text(prefix, sep),
           "chosen": step_text([good["steps"][e]], sep), "rejected": step_text([bad["steps"][e]], sep),
           "full_chosen": join_solution(good["steps"][e:], good["final"], sep),
           "full_rejected": join_solution(bad["steps"][e:], bad["final"], sep), "answer": gold}
    meta = {"source": source, "chosen_score": good["scores"][e], "rejected_score": bad["scores"][e],
            "chosen_correct": good["correct"], "step_index": e}
    return row, meta


def full_pair(question, gold, solutions, by_judge=True):
    """A whole-solution pair, None when the samples are all right or all wrong. by_judge (for `weighted` DPO):
    the correct sample the judge scores best (min step score) against the incorrect one it scores worst;
    otherwise (outcome-only DPO, which must not use the judge) the first correct sample against the first
    incorrect one, in the order they were sampled."""
    scored = [s for s in solutions if s["steps"] and (None not in s["scores"] or not by_judge)]
    right = [s for s in scored if s["correct"]]
    wrong = [s for s in scored if not s["correct"]]
    if not right or not wrong:
        return None
    good, bad = right[0], wrong[0]
    if by_judge:
        good = max(right, key=lambda s: aggregate(s["scores"], "min"))
        bad = min(wrong, key=lambda s: aggregate(s["scores"], "min"))
    return {"prompt": question, "chosen": join_solution(good["steps"], good["final"], good.get("sep", "\n")),
            "rejected": join_solution(bad["steps"], bad["final"], bad.get("sep", "\n")), "chosen_steps": good["steps"],
            "rejected_steps": bad["steps"], "chosen_step_scores": good["scores"],
            "rejected_step_scores": bad["scores"], "answer": gold}


# ----------------------------------------------------------------------------- diagnostic


def pair_quality(pairs_file, problems_file):
    """How many Step-DPO pairs the task's reference step labels agree with: the prefix right, the chosen
    step right and the rejected step wrong ("clean"), and each part alone; how many whole chosen
    continuations (full_chosen, which reach the right final answer by default) have every step right; how
    many wrong chosen steps are arithmetic slips; and how well the judge's score of the chosen step
    (step_pairs_meta.jsonl) separates right from wrong chosen steps (AUROC; 0.5 is chance). A diagnostic
    of the pairs only: nothing in training reads it."""
    gold = {p["question"]: p["answer"] for p in load_problems(problems_file)}
    meta_file = pairs_file.replace("step_pairs.jsonl", "step_pairs_meta.jsonl")
    metas = read_jsonl(meta_file) if os.path.exists(meta_file) else None
    counts = dict.fromkeys(("pairs", "clean", "prefix_right", "chosen_right", "rejected_wrong",
                            "chosen_continuation_right", "chosen_wrong_arithmetic_slip"), 0)
    chosen_scores, chosen_ok = [], []
    for k, row in enumerate(read_jsonl(pairs_file)):
        prefix = split_steps(row["initial_reason_steps"])[0]
        chosen = label_steps(gold[row["prompt"]], prefix + [row["chosen"].strip()])
        rejected = label_steps(gold[row["prompt"]], prefix + [row["rejected"].strip()])
        parts = {"prefix_right": all(chosen[:-1]), "chosen_right": chosen[-1], "rejected_wrong": not rejected[-1]}
        counts["pairs"] += 1
        counts["clean"] += all(parts.values())
        for key, v in parts.items():
            counts[key] += v
        continuation = prefix + split_steps(row["full_chosen"])[0]
        counts["chosen_continuation_right"] += all(label_steps(gold[row["prompt"]], continuation))
        counts["chosen_wrong_arithmetic_slip"] += not chosen[-1] and arithmetic_slip(row["chosen"].strip())
        if metas and metas[k]["chosen_score"] is not None:
            chosen_scores.append(metas[k]["chosen_score"])
            chosen_ok.append(chosen[-1])
    counts["chosen_score_auroc"] = auroc(chosen_scores, chosen_ok) if chosen_scores else None
    return counts
