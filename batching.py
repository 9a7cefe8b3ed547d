"""Pair batching for StepwiseDPOTrainer: pairs packed into rows, the attention mask that keeps them apart,
per-pair log-probabilities from one forward, and the reference log-probabilities computed once.

Prefix sharing (Wang & Hegde 2024, arXiv 2410.20305): chosen and rejected share one forward over
[prompt, chosen, rejected], the rejected part hidden from the chosen part and its positions restarting after
the prompt; short pairs share a row, each seeing only itself, so a batch computes little padding.
"""
import json
import os

import torch

from common import atomic_write_json
from models import logits_at
from prompts import additive_mask


def pack_rows(lengths, width):
    """Rows of pair indices: first-fit decreasing into rows of `width` tokens (at least the longest pair),
    so that pairs share rows instead of each padding its own; then the same number of rows filled longest
    first into the emptiest row, kept when its fullest row is shorter (every row pads to the fullest one)."""
    width = max(width, max(lengths))
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows, room = [], []
    for i in order:
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    balanced, fill = [[] for _ in rows], [0] * len(rows)
    for i in order:
        r = min(range(len(rows)), key=lambda r: (fill[r], r))
        balanced[r].append(i)
        fill[r] += lengths[i]
    return balanced if max(fill) < width - min(room) else rows


def collate(features, pad_id, prefix_sharing=True, pack_factor=2.0, tree=False):
    """A batch for StepwiseDPOTrainer (`tree`: collate_tree's layout).

    Prefix-shared (default): each pair is one segment [prompt, chosen, rejected]. Rejected tokens do not
    see chosen tokens and take the positions chosen tokens would have (restarting after the prompt);
    pairs are packed into rows up to `pack_factor` times the longest pair wide (pack_rows), each segment
    seeing only itself: less padding, at the price of wider attention (2 was fastest on CPU here).
    Plain: rows [prompt, chosen] then [prompt, rejected], right-padded.
    `part` marks 0 prompt / 1 chosen / 2 rejected / 3 padding and `segment` the pair of each position
    (-1 padding); together they become the 4D mask in the model's dtype.

    Targets are aligned to the position that predicts them (position t predicts token t+1): `*_targets`,
    `*_weights` (the step weight of each scored token, 0 elsewhere) and `*_scored` (1 where a token is
    scored); `pair` maps every position to its pair (n for padding) for the per-pair sums. In the shared
    layout the first rejected token is predicted from the last prompt position, which chosen's first
    token also uses, so it is gathered separately (`first_rejected` at `first_row`, `last_prompt`)."""
    if tree:
        return collate_tree(features, pad_id, pack_factor)
    n = len(features)
    sizes = [(len(f["prompt_ids"]), len(f["chosen_ids"]), len(f["rejected_ids"])) for f in features]
    if prefix_sharing:
        rows = pack_rows([sum(size) for size in sizes], int(pack_factor * max(map(sum, sizes))))
        slot = {}                                                # pair -> (row, offset of its segment)
        for r, row in enumerate(rows):
            offset = 0
            for i in row:
                slot[i] = (r, offset)
                offset += sum(sizes[i])
        width, n_rows = max(sum(sum(sizes[i]) for i in row) for row in rows), len(rows)
    else:
        width, n_rows = max(p + max(c, j) for p, c, j in sizes), 2 * n
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    pos = torch.zeros((n_rows, width), dtype=torch.long)
    part = torch.full((n_rows, width), 3, dtype=torch.long)
    segment = torch.full((n_rows, width), -1, dtype=torch.long)
    pair = torch.full((n_rows, width), n, dtype=torch.long)
    batch = {f"{side}_{what}": torch.zeros((n_rows, width), dtype=torch.long if what == "targets" else torch.float)
             for side in ("chosen", "rejected") for what in ("targets", "weights", "scored")}
    first_rejected, first_weight, first_row, last_prompt = [], [], [], []
    for i, ((p, c, j), f) in enumerate(zip(sizes, features)):
        prompt, chosen, rejected = f["prompt_ids"], f["chosen_ids"], f["rejected_ids"]
        if prefix_sharing:
            chosen_row, start = slot[i]
            rejected_row, span = chosen_row, slice(start, start + p + c + j)
            ids[chosen_row, span] = torch.tensor(prompt + chosen + rejected)
            pos[chosen_row, span] = torch.cat([torch.arange(p + c), torch.arange(p, p + j)])
            part[chosen_row, span] = torch.tensor([0] * p + [1] * c + [2] * j)
            segment[chosen_row, span], pair[chosen_row, span] = i, i
            # rejected token t >= 1 is predicted inside the rejected span; token 0 from the last prompt position
            rejected_from, rejected_ids, rejected_weights = start + p + c, rejected[1:], f["rejected_weights"][1:]
            first_rejected.append(rejected[0])
            first_weight.append(f["rejected_weights"][0])
            first_row.append(chosen_row)
            last_prompt.append(start + p - 1)
        else:
            chosen_row, rejected_row, start = i, n + i, 0
            for row, completion in ((chosen_row, chosen), (rejected_row, rejected)):
                end = p + len(completion)
                ids[row, :end] = torch.tensor(prompt + completion)
                pos[row, :end] = torch.arange(end)
                part[row, :p], part[row, p:end], segment[row, :end], pair[row, :end] = 0, 1, 0, i
            rejected_from, rejected_ids, rejected_weights = p - 1, rejected, f["rejected_weights"]
        chosen_from = start + p - 1                              # the position that predicts chosen token 0
        batch["chosen_targets"][chosen_row, chosen_from: chosen_from + c] = torch.tensor(chosen)
        batch["chosen_weights"][chosen_row, chosen_from: chosen_from + c] = torch.tensor(f["chosen_weights"])
        batch["chosen_scored"][chosen_row, chosen_from: chosen_from + c] = 1.0
        if rejected_ids:
            span = slice(rejected_from, rejected_from + len(rejected_ids))
            batch["rejected_targets"][rejected_row, span] = torch.tensor(rejected_ids)
            batch["rejected_weights"][rejected_row, span] = torch.tensor(rejected_weights)
            batch["rejected_scored"][rejected_row, span] = 1.0
    batch |= {"input_ids": ids, "position_ids": pos, "part": part, "segment": segment, "pair": pair}
    if prefix_sharing:
        batch |= {"first_rejected": torch.tensor(first_rejected), "first_rejected_weight": torch.tensor(first_weight),
                  "first_row": torch.tensor(first_row), "last_prompt": torch.tensor(last_prompt)}
    return batch | reference_columns(features)


def collate_tree(features, pad_id, pack_factor=2.0):
    """A batch whose pairs of one problem (features with the same `group`, the question) share one token tree:
    every [prompt, chosen] and [prompt, rejected] sequence of the group is a path of a trie, so the question,
    the judge-accepted prefixes and the tokens chosen and rejected steps begin with are computed once. A
    trie's tokens are laid out in the order they were first met (a node after its parent), their position
    ids are their depths, and a token sees exactly itself and its ancestors (`visible`). Tries are packed
    into rows as pairs are in `collate`. Every scored token is an entry: the row and column that predict it,
    its id, its pair, side (0 chosen, 1 rejected) and weight; one position may predict tokens of several
    pairs. Exact: each token is computed from the same context as in separate forwards."""
    groups = {}
    for i, f in enumerate(features):
        groups.setdefault(f.get("group", i), []).append(i)
    tries = []                                  # per group: (token ids, parents, depths, {(pair, side): node path})
    for members in groups.values():
        ids, parent, depth, paths, children = [], [], [], {}, {}
        for i in members:
            f = features[i]
            for side, completion in enumerate((f["chosen_ids"], f["rejected_ids"])):
                node, path = -1, []
                for token in f["prompt_ids"] + completion:
                    child = children.get((node, token))
                    if child is None:
                        child = children[(node, token)] = len(ids)
                        ids.append(token)
                        parent.append(node)
                        depth.append(depth[node] + 1 if node >= 0 else 0)
                    node = child
                    path.append(node)
                paths[(i, side)] = path
        tries.append((ids, parent, depth, paths))
    sizes = [len(t[0]) for t in tries]
    rows = pack_rows(sizes, int(pack_factor * max(sizes)))
    width = max(sum(sizes[t] for t in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    visible = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)   # padding sees only itself
    entries = []                                # (row, column, target, pair, side, weight)
    for r, row in enumerate(rows):
        offset = 0
        for t in row:
            ids, parent, depth, paths = tries[t]
            n = len(ids)
            input_ids[r, offset:offset + n] = torch.tensor(ids)
            pos[r, offset:offset + n] = torch.tensor(depth)
            for node in range(n):
                if parent[node] >= 0:
                    visible[r, offset + node] |= visible[r, offset + parent[node]]
            for (i, side), path in paths.items():
                f, p = features[i], len(features[i]["prompt_ids"])
                completion, weights = ((f["chosen_ids"], f["chosen_weights"]) if side == 0
                                       else (f["rejected_ids"], f["rejected_weights"]))
                entries += [(r, offset + path[p + k - 1], token, i, side, w)
                            for k, (token, w) in enumerate(zip(completion, weights))]
            offset += n
    columns = list(zip(*entries))
    batch = {"input_ids": input_ids, "position_ids": pos, "visible": visible,
             **{f"entry_{name}": torch.tensor(values, dtype=torch.float if name == "weight" else torch.long)
                for name, values in zip(("row", "col", "target", "pair", "side", "weight"), columns)},
             "n_pairs": torch.tensor(len(features))}
    return batch | reference_columns(features)


def tree_logps(model, batch):
    """sequence_logps for a collate_tree batch: the head runs once per predicting position, each entry reads
    its target there, and the entries are summed by pair and side."""
    mask = additive_mask(batch["visible"], next(model.parameters()).dtype)
    width = batch["input_ids"].shape[1]
    where, at = torch.unique(batch["entry_row"] * width + batch["entry_col"], return_inverse=True)
    logits = logits_at(model, where // width, where % width, input_ids=batch["input_ids"], attention_mask=mask,
                       position_ids=batch["position_ids"]).float()
    token_logp = logits[at, batch["entry_target"]] - logits.logsumexp(-1)[at]
    n = int(batch["n_pairs"])
    slot = batch["entry_pair"] * 2 + batch["entry_side"]

    def per_pair(values):                                            # (entries,) -> (n, 2): by pair, side
        return values.new_zeros(2 * n).index_add(0, slot, values).view(n, 2)

    weighted, plain, count = (per_pair(token_logp * batch["entry_weight"]), per_pair(token_logp),
                              per_pair(torch.ones_like(token_logp)))
    return {"chosen": weighted[:, 0], "rejected": weighted[:, 1], "chosen_plain": plain[:, 0],
            "rejected_plain": plain[:, 1], "chosen_tokens": count[:, 0], "rejected_tokens": count[:, 1]}


def reference_columns(features):
    """The precomputed reference log-probs the features carry (precompute_reference), as batch columns."""
    return {key: torch.tensor([f[key] for f in features], dtype=torch.float64)
            for key in ("ref_chosen", "ref_rejected", "ref_chosen_plain") if key in features[0]}


def attention_mask_4d(part, segment, dtype):
    """(rows, 1, L, L) additive mask from `part` and `segment`: causal and within one segment; the prompt
    visible to all of its segment; chosen and rejected each see only themselves besides the prompt;
    padding sees only padding."""
    width = part.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=part.device).tril()
    q, k = part[:, :, None], part[:, None, :]
    # padding (segment -1) never shares a segment with a prompt, so it sees only padding
    visible = causal & (segment[:, :, None] == segment[:, None, :]) & ((k == 0) | (k == q))
    return additive_mask(visible, dtype)


def sequence_logps(model, batch, prefix_sharing=True):
    """Per pair: (chosen weighted sum, rejected weighted sum, chosen plain sum, rejected plain sum,
    chosen token count, rejected token count) of log pi(token), from one forward. The vocabulary projection
    runs only at the positions that predict a scored token (common.logits_at): in a Step-DPO pair most
    tokens are prompt and prefix."""
    if "visible" in batch:
        return tree_logps(model, batch)
    mask = attention_mask_4d(batch["part"], batch["segment"], next(model.parameters()).dtype)  # model may be DDP-wrapped
    scored = (batch["chosen_scored"] + batch["rejected_scored"]) > 0
    if prefix_sharing:
        scored[batch["first_row"], batch["last_prompt"]] = True
    rows, cols = scored.nonzero(as_tuple=True)
    logits = logits_at(model, rows, cols, input_ids=batch["input_ids"], attention_mask=mask,
                       position_ids=batch["position_ids"]).float()  # (positions, vocab)
    lse = logits.logsumexp(-1)
    n = len(batch["first_rejected"]) if prefix_sharing else len(batch["input_ids"]) // 2
    pair = batch["pair"][rows, cols]

    def per_pair(values):                                            # (positions,) -> (n,) sums by pair
        return values.new_zeros(n + 1).index_add(0, pair, values)[:n]

    out = {}
    for side in ("chosen", "rejected"):
        token_logp = logits.gather(-1, batch[f"{side}_targets"][rows, cols, None]).squeeze(-1) - lse
        scored_here = batch[f"{side}_scored"][rows, cols]
        out[side] = [per_pair(token_logp * batch[f"{side}_weights"][rows, cols]), per_pair(token_logp * scored_here),
                     per_pair(scored_here)]
    if prefix_sharing:
        where = torch.full(scored.shape, -1, dtype=torch.long, device=scored.device)
        where[rows, cols] = torch.arange(len(rows), device=scored.device)
        at = where[batch["first_row"], batch["last_prompt"]]
        first = logits[at, batch["first_rejected"]] - lse[at]
        out["rejected"][0] = out["rejected"][0] + first * batch["first_rejected_weight"]
        out["rejected"][1] = out["rejected"][1] + first
        out["rejected"][2] = out["rejected"][2] + 1
    return {"chosen": out["chosen"][0], "rejected": out["rejected"][0], "chosen_plain": out["chosen"][1],
            "rejected_plain": out["rejected"][1], "chosen_tokens": out["chosen"][2],
            "rejected_tokens": out["rejected"][2]}


def precompute_reference(model, features, batch_size, pad_id, prefix_sharing, cache_path=None, pack_factor=2.0,
                         bf16=False, tree=False):
    """Reference log-probs of every pair, one pass before training; the frozen reference makes this exact.
    Stored in each feature as ref_chosen / ref_rejected (weighted) and ref_chosen_plain, and cached. `bf16`:
    under bf16 autocast, as a bf16 training run computes the policy's (so the first step starts at the
    reference exactly)."""
    from tqdm import tqdm

    if cache_path and os.path.exists(cache_path):
        with open(cache_path) as f:
            values = json.load(f)
    else:
        values = []
        model.eval()
        with torch.no_grad(), torch.autocast(model.device.type, torch.bfloat16, enabled=bf16):
            for start in tqdm(range(0, len(features), batch_size), desc="reference log-probs"):
                batch = collate(features[start:start + batch_size], pad_id, prefix_sharing, pack_factor, tree)
                batch = {k: v.to(model.device) for k, v in batch.items()}
                out = sequence_logps(model, batch, prefix_sharing)
                values += [list(v) for v in zip(out["chosen"].tolist(), out["rejected"].tolist(),
                                                out["chosen_plain"].tolist())]
        if cache_path:
            atomic_write_json(cache_path, values)
    for f, (c, r, cp) in zip(features, values):
        f["ref_chosen"], f["ref_rejected"], f["ref_chosen_plain"] = c, r, cp
