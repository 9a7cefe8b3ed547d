"""Every text the pipeline shows a model, and how those texts become tokens.

Defined here once and imported everywhere else: the final-answer formats ('#### x' lines and \\boxed{x}) and
where an answer ends, the policy prompt, the judge prompt
(GenRM, Zhang et al. 2024, arXiv 2408.15240) and its packing into one sequence per solution, chat-template
wrapping, left padding and the 4D additive attention mask that the judge and the trainer share.
"""
import re

# ----------------------------------------------------------------------------- formats
FINAL_MARK = "####"               # a solution ends with the line '#### <answer>' (GSM8K)
BOXED = "\\boxed{"                # or states its answer in \boxed{<answer>} (MATH, instruct models)

# Policy: a question in, a solution out (one step per line, then the final answer in one of the two styles).
POLICY_TEMPLATE = "Question: {question}\nAnswer:\n"
POLICY_INSTRUCTIONS = {  # ANSWER_STYLE -> the instruction a chat-template policy gets
    "gsm8k": ("Solve the problem step by step. Write one step per line and end with a line "
              f"'{FINAL_MARK} <answer>'.\n\n{{question}}"),
    "boxed": ("Solve the problem step by step. Write one step per line and put the final answer in "
              "\\boxed{{}}.\n\n{question}"),
}
POLICY_INSTRUCTION = POLICY_INSTRUCTIONS["gsm8k"]

# Judge: the prompt for step k is the prompt for step k-1 plus step k plus a fixed question suffix, so that
# all steps of a solution can be scored in one pass. The score is P(Yes) / (P(Yes) + P(No)) for the next token.
JUDGE_HEADER = "Check the last step.\nQuestion: {question}\nSteps:\n"
JUDGE_STEP = "{step}\n"
JUDGE_SUFFIX = "Is the last step correct? Answer:"
JUDGE_YES, JUDGE_NO = "Yes", "No"

# Generative judge (GenRM-CoT, Zhang et al. 2024, Sec. 3; ThinkPRM, Khalifa et al. 2025, arXiv 2504.16828):
# the judge verifies a solution in one running text. After each step it writes a check behind CHECK_CUE (its
# rationale: for the bundled judge, the computation the step should make, recomputed), then ANSWER_CUE, then
# Yes or No. The score of step k is P(Yes) / (P(Yes) + P(No)) after ANSWER_CUE; the check of step k sees the
# question, steps 1..k and the judge's own earlier checks and answers.
CHECK_HEADER = "Check each step: recompute it, then say if it is correct.\nQuestion: {question}\n"
CHECK_STEP = "Step: {step}\n"
CHECK_CUE = "Check:"
ANSWER_CUE = "Correct? Answer:"

_SPLIT = "\u0000"


def boxed_spans(text):
    """(start of the content, end of the closing brace) of every closed \\boxed{...} in `text`, braces
    balanced (so \\boxed{\\frac{\\sqrt{3}}{2}} is one span); an unclosed one ends the search."""
    spans, start = [], text.find(BOXED)
    while start >= 0:
        depth, i = 1, start + len(BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:
            break
        spans.append((start + len(BOXED), i))
        start = text.find(BOXED, i)
    return spans


FINAL_LINE_RE = re.compile(rf"^[ \t]*{FINAL_MARK}[^\n]*\n", re.M)
BOXED_TAIL_RE = re.compile(r"[ \t]*(?:\$\$|\$|\\\]|\\\))?[ \t]*[.!]?")


def answer_end(text):
    """Where the final answer of generated text ends, or None while it has not: after the newline that closes
    the first line that starts with '#### x', or after the first closed \\boxed{...} with the math delimiter
    and full stop that directly follow it ('$\\boxed{5}$.')."""
    ends = [m.end() - 1 for m in FINAL_LINE_RE.finditer(text)][:1]
    spans = boxed_spans(text)
    if spans:
        close = spans[0][1]
        ends.append(close + BOXED_TAIL_RE.match(text, close).end() - close)
    return min(ends) if ends else None


def answer_finished(text):
    """True once generated text holds the end of its final answer (answer_end): sampling stops there."""
    return answer_end(text) is not None


def truncate_solution(text):
    """Cut a generated solution after its final answer: the '#### x' line, or the first closed \\boxed{}."""
    end = answer_end(text)
    return (text if end is None else text[:end]).strip()


def step_text(steps, sep="\n"):
    """Steps as the policy writes them: each followed by the step separator (one per line by default) and
    never by EOS."""
    return "".join(s + sep for s in steps)


def chat_wrap(tokenizer):
    """(before, after) text around a user message in the tokenizer's chat template, ending with the
    assistant's turn opening; ('', '') without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return "", ""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SPLIT}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(_SPLIT)
    return before, after


def policy_prompt(tokenizer, question, style="gsm8k"):
    """The policy's prompt; a chat-template policy is asked for the final answer in `style` (gsm8k | boxed)."""
    if style not in POLICY_INSTRUCTIONS:
        raise SystemExit(f"--ANSWER_STYLE must be one of {', '.join(POLICY_INSTRUCTIONS)}, got {style!r}")
    if getattr(tokenizer, "chat_template", None):
        before, after = chat_wrap(tokenizer)
        return before + POLICY_INSTRUCTIONS[style].format(question=question) + after
    return POLICY_TEMPLATE.format(question=question)


def judge_segments(tokenizer, question, steps):
    """(head, [step texts], tail): the judge prompt for step k is head + ''.join(steps[:k]) + tail."""
    before, after = chat_wrap(tokenizer)
    head = before + JUDGE_HEADER.format(question=question)
    tail = JUDGE_SUFFIX + after
    return head, [JUDGE_STEP.format(step=s) for s in steps], tail


def check_head(tokenizer, question):
    """The generative judge's text before the first step: the instruction and question as the user turn,
    then the assistant's turn opened (the steps, checks and answers are written in it)."""
    before, after = chat_wrap(tokenizer)
    return before + CHECK_HEADER.format(question=question) + after


def check_step(step):
    """The text the generative judge reads before its check of `step`; it writes the check after it."""
    return CHECK_STEP.format(step=step) + CHECK_CUE


def check_answer(correct):
    """The generative judge's answer after ANSWER_CUE, ending its check of one step."""
    return f" {JUDGE_YES if correct else JUDGE_NO}\n"


def judge_answer_text(tokenizer, correct):
    """The judge's target reply, as it follows the prompt: ' Yes' after a plain prompt, 'Yes' in a chat turn."""
    word = JUDGE_YES if correct else JUDGE_NO
    return word if getattr(tokenizer, "chat_template", None) else " " + word


# ----------------------------------------------------------------------------- tokens


def encode(tokenizer, text):
    """Token ids of `text`. Templates render their special tokens as text, so none are added here except a
    BOS the tokenizer asks for."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def answer_token_ids(tokenizer, word):
    """First-token ids of the spellings a model may use for `word` ('Yes', ' Yes', 'YES', 'yes', ...)."""
    ids = []
    for variant in (word, word.upper(), word.lower()):
        for text in (variant, " " + variant):
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            # a variant split into pieces counts by its first piece only when that piece is a real prefix
            # of the word ('Ye' for 'Yes'), not a lone letter shared with other words
            first = tokenizer.decode(tokens[:1]).strip() if tokens else ""
            if tokens and tokens[0] not in ids and (len(tokens) == 1 or len(first) >= 2):
                ids.append(tokens[0])
    return ids


def left_pad(sequences, pad_id):
    """(ids, mask) tensors of token-id lists padded on the left to the longest one (mask 1 on real tokens)."""
    import torch

    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, x in enumerate(sequences):
        ids[r, width - len(x):], mask[r, width - len(x):] = torch.tensor(x, dtype=torch.long), 1
    return ids, mask


def additive_mask(visible, dtype):
    """(rows, 1, L, L) additive attention mask from a boolean (rows, L, L) one: 0 where visible, dtype-min
    where hidden. A boolean 4D mask is not used because eager attention does not reproduce separate
    forwards with it."""
    import torch

    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
        ~visible, torch.finfo(dtype).min)[:, None]


# ----------------------------------------------------------------------------- judge packing
# All n step prompts of one solution in ONE sequence: [head, s1, t1, s2, t2, ..., sn, tn], where t is the
# fixed question suffix. Tail t_k sees head..s_k and itself; s_{k+1} does not see t_k; positions of t_k
# continue from s_k as in the separate prompt. The score of step k is read at the last token of t_k.


def pack_judge(tokenizer, question, steps):
    """(input_ids, position_ids, groups, answer_index) lists for one solution. groups: 0 for the shared
    chain (head and steps), k+1 for the tokens of tail k."""
    head, step_texts, tail = judge_segments(tokenizer, question, steps)
    ids = encode(tokenizer, head)
    positions, groups, answer_index = list(range(len(ids))), [0] * len(ids), []
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    chain_end = len(ids)
    for k, text in enumerate(step_texts):
        step_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        positions += range(chain_end, chain_end + len(step_ids))
        ids += step_ids
        groups += [0] * len(step_ids)
        chain_end = positions[-1] + 1
        ids += tail_ids
        positions += range(chain_end, chain_end + len(tail_ids))
        groups += [k + 1] * len(tail_ids)
        answer_index.append(len(ids) - 1)
    return ids, positions, groups, answer_index


def step_prompt_ids(pack, k):
    """Token ids of the separate prompt for step k, cut from a pack: the shared chain up to step k and
    tail k (the same tokens the packed pass uses)."""
    ids, _, groups, answer_index = pack
    return [t for i, (t, g) in enumerate(zip(ids, groups)) if i <= answer_index[k] and g in (0, k + 1)]


def packed_batch(packs, pad_id, dtype=None):
    """Right-padded tensors and the 4D additive mask (batch, 1, L, L) for packed judge sequences."""
    import torch

    dtype = dtype or torch.float32
    width = max(len(p[0]) for p in packs)
    ids = torch.full((len(packs), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(packs), width), dtype=torch.long)
    grp = torch.full((len(packs), width), -1, dtype=torch.long)  # padding is its own group
    for r, (x, p, g, _) in enumerate(packs):
        ids[r, : len(x)], pos[r, : len(x)], grp[r, : len(x)] = torch.tensor(x), torch.tensor(p), torch.tensor(g)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    visible = causal & ((grp[:, None, :] == 0) | (grp[:, None, :] == grp[:, :, None]))
    return ids, pos, additive_mask(visible, dtype)
