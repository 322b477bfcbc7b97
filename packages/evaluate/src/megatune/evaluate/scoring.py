"""Log-likelihood requests packed for the forward pass: one row per context, its continuations side by side.

A question's choices share their context, so the context is run once and every continuation hangs off it as a
branch (prefix sharing, "tree" rows):

    row       c0 c1 c2 c3 | a0 a1 | b0 b1 b2        context, then each continuation without its last token
    position   0  1  2  3 |  4  5 |  4  5  6        a branch continues the context's positions
    sees      the context causally; a branch sees the context and its own earlier tokens, never another branch

Continuation token t is predicted by the row entry before it (the last context token for t = 0), exactly as in
a separate forward over context + continuation, which is what lm-evaluation-harness runs for each request.
A request longer than the model's positions is cut from the left the lm-eval way, (context + continuation)[-(L+1):];
what is left of its context is its row's context (shared with requests cut to the same tokens).

Rows are sorted by length and batched right-padded: rows without branches (one-token answers such as " A") need no
attention mask at all (plain causal attention, the fastest kernel); batches with branches get a 4D mask.
Only the logits of the predicting positions are computed (`logits_to_keep` with their indices).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Row:
    context: tuple[int, ...]
    conts: list[tuple[int, list[int]]] = field(default_factory=list)  # (request index, continuation tokens)

    def layout(self) -> tuple[list[int], list[int], list[int], list[tuple[int, list[int], list[int]]]]:
        """(tokens, positions, branch ids, [(request, targets, predicting row entries)])."""
        n = len(self.context)
        tokens, positions, branch = list(self.context), list(range(n)), [0] * n
        scored = []
        for k, (req, cont) in enumerate(self.conts, 1):
            start = len(tokens)
            tokens += cont[:-1]
            positions += range(n, n + len(cont) - 1)
            branch += [k] * (len(cont) - 1)
            scored.append((req, cont, [n - 1, *range(start, start + len(cont) - 1)]))
        return tokens, positions, branch, scored

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(c) - 1 for _, c in self.conts)


def build_rows(encoded: Sequence[tuple[list[int], list[int]]], max_length: int) -> tuple[list[Row], int]:
    """Group (context, continuation) token pairs into rows; returns (rows, number of requests cut to fit).
    A cut request's context is what is left of it, so requests cut to the same tokens (one-token answers to one
    long question) still share a row."""
    rows: dict[tuple[int, ...], Row] = {}  # every branch fits: len(context) + len(continuation) <= max_length + 1
    cut = 0
    for i, (ctx, cont) in enumerate(encoded):
        if not cont:
            raise ValueError(f"request {i}: the continuation encodes to no tokens")
        if len(cont) > max_length:
            raise ValueError(f"request {i}: the continuation alone has {len(cont)} tokens, more than the model's "
                             f"{max_length} positions")
        if len(ctx) + len(cont) > max_length + 1:
            cut += 1
            seq = (ctx + cont)[-(max_length + 1):]
            ctx = seq[:len(seq) - len(cont)]
        key = tuple(ctx)
        rows.setdefault(key, Row(key)).conts.append((i, cont))
    return sorted(rows.values(), key=lambda r: -r.length), cut


def batches(rows: list[Row], batch_size: int, max_tokens: int) -> list[list[Row]]:
    """Consecutive rows (sorted longest first) while the padded batch holds at most `max_tokens` entries."""
    out: list[list[Row]] = []
    for row in rows:
        if out and len(out[-1]) < batch_size and (len(out[-1]) + 1) * out[-1][0].length <= max_tokens:
            out[-1].append(row)
        else:
            out.append([row])
    return out


@torch.inference_mode()
def score_batch(model, batch: list[Row], pad_id: int, device: torch.device) -> list[tuple[int, float, bool]]:
    """[(request index, summed log-prob, greedy)] for every continuation in the batch: one forward pass."""
    layouts = [row.layout() for row in batch]
    width = max(len(t) for t, _, _, _ in layouts)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    pos = torch.arange(width).repeat(len(batch), 1)
    branch = torch.full((len(batch), width), -1, dtype=torch.long)  # -1 = padding
    rows_i, cols_i, targets, owner, requests = [], [], [], [], []
    for b, (tokens, positions, br, scored) in enumerate(layouts):
        n = len(tokens)
        ids[b, :n] = torch.tensor(tokens)
        pos[b, :n] = torch.tensor(positions)
        branch[b, :n] = torch.tensor(br)
        for req, cont, at in scored:
            owner += [len(requests)] * len(cont)
            requests.append(req)
            rows_i += [b] * len(cont)
            cols_i += at
            targets += cont
    keep = sorted(set(cols_i))
    kw = {}
    if bool((branch > 0).any()):
        kw["position_ids"] = pos.to(device)
        kw["attention_mask"] = _tree_mask(branch, model.dtype).to(device)
    col_of = {c: j for j, c in enumerate(keep)}
    logits = model(input_ids=ids.to(device), logits_to_keep=torch.tensor(keep, device=device), **kw).logits
    picked = logits[torch.tensor(rows_i, device=device), torch.tensor([col_of[c] for c in cols_i], device=device)]
    logprobs = torch.log_softmax(picked.float(), dim=-1)  # (N, V), N = scored tokens in the batch
    tgt = torch.tensor(targets, device=device)
    token_lp = logprobs.gather(-1, tgt[:, None])[:, 0]
    miss = (logprobs.argmax(-1) != tgt).to(torch.float32)
    owner_t = torch.tensor(owner, device=device)
    total = torch.zeros(len(requests), dtype=torch.float64, device=device).index_add_(0, owner_t, token_lp.double())
    misses = torch.zeros(len(requests), device=device).index_add_(0, owner_t, miss)
    return [(r, float(t), m == 0) for r, t, m in zip(requests, total.tolist(), misses.tolist())]


def _tree_mask(branch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive mask: entry j is visible from i when j <= i and j is context (branch 0) or on i's
    branch. Padding sees only itself (a fully masked row would turn into NaN and leak through 0 * NaN)."""
    T = branch.shape[1]
    bi, bj = branch[:, :, None], branch[:, None, :]  # (B, T, 1), (B, 1, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    visible = causal & (bj >= 0) & (bi >= 0) & ((bj == 0) | (bj == bi))
    visible |= torch.eye(T, dtype=torch.bool)
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[:, None]
