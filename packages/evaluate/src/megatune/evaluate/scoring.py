"""Log-likelihood requests packed for the forward pass: each context once, its continuations side by side, and
contexts that start alike (few-shot prompts of one subject) sharing that start.

A question's choices share their context, so the context is run once and every continuation hangs off it as a
branch; contexts sharing a long prefix (the k solved examples of a few-shot prompt) hang off that prefix the same
way ("tree" rows):

    row       p0 p1 p2 | q0 q1 | a0 | b0 b1 | r0 r1 r2 | c0       shared prefix, then per context its own tokens,
    position   0  1  2 |  3  4 |  5 |  5  6 |  3  4  5 |  6       then each continuation without its last token
    sees      the prefix causally; a context's tokens see the prefix and themselves; a branch sees its context

Continuation token t is predicted by the row entry before it (the last context token for t = 0), exactly as in
a separate forward over context + continuation, which is what lm-evaluation-harness runs for each request.
A request longer than the model's positions is cut from the left the lm-eval way, (context + continuation)[-(L+1):];
what is left of its context is its context here (shared with requests cut to the same tokens).

Whether contexts share a row is decided by cost: a row of L entries costs about L + alpha * L^2 (alpha: attention's
cost per pair of entries relative to the rest of the model's cost per entry, from the model's shape), so a short
common header (0-shot MMLU's first line) is not worth a longer row, five solved examples are.
Rows are sorted by length and batched right-padded: rows without branches (one context, one-token answers such as
" A") need no attention mask at all (plain causal attention, the fastest kernel); other batches get a 4D mask.
Only the logits of the predicting positions are computed (`logits_to_keep` with their indices).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Context:
    tokens: tuple[int, ...]
    conts: list[tuple[int, list[int]]] = field(default_factory=list)  # (request index, continuation tokens)

    @property
    def branch_tokens(self) -> int:
        return sum(len(c) - 1 for _, c in self.conts)


@dataclass
class Row:
    contexts: list[Context]
    shared: int  # leading tokens every context has in common, run once

    @property
    def length(self) -> int:
        return self.shared + sum(len(c.tokens) - self.shared + c.branch_tokens for c in self.contexts)

    @property
    def plain(self) -> bool:
        """One context whose answers are one token each: plain causal attention, no mask needed."""
        return len(self.contexts) == 1 and self.contexts[0].branch_tokens == 0

    def layout(self) -> tuple[list[int], list[int], list[int], list[int], list[tuple[int, list[int], list[int]]]]:
        """(tokens, positions, context ids (0 = shared prefix), branch ids (0 = context),
        [(request, targets, the row entries predicting them)])."""
        p = self.shared
        tokens, positions = list(self.contexts[0].tokens[:p]), list(range(p))
        ctx_id, branch = [0] * p, [0] * p
        scored = []
        for j, ctx in enumerate(self.contexts, 1):
            n = len(ctx.tokens)
            own = len(tokens)
            tokens += ctx.tokens[p:]
            positions += range(p, n)
            ctx_id += [j] * (n - p)
            branch += [0] * (n - p)
            last = own + n - p - 1 if n > p else p - 1  # the entry holding the context's last token
            for k, (req, cont) in enumerate(ctx.conts, 1):
                start = len(tokens)
                tokens += cont[:-1]
                positions += range(n, n + len(cont) - 1)
                ctx_id += [j] * (len(cont) - 1)
                branch += [k] * (len(cont) - 1)
                scored.append((req, cont, [last, *range(start, start + len(cont) - 1)]))
        return tokens, positions, ctx_id, branch, scored


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def build_rows(encoded: Sequence[tuple[list[int], list[int]]], max_length: int, alpha: float = 0.0,
               max_row: int = 4096) -> tuple[list[Row], int]:
    """Rows for (context, continuation) token pairs, longest first; returns (rows, number of requests cut to fit).
    `alpha` weighs attention's quadratic cost (see the module docstring); contexts share a row only when that is
    cheaper and the row stays within `max_row` entries."""
    contexts: dict[tuple[int, ...], Context] = {}  # every branch fits: len(context) + len(cont) <= max_length + 1
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
        contexts.setdefault(key, Context(key)).conts.append((i, cont))

    def cost(length: int) -> float:
        return length + alpha * length * length

    rows: list[Row] = []
    for ctx in sorted(contexts.values(), key=lambda c: c.tokens):  # alike contexts become neighbours
        if rows:
            row = rows[-1]
            joined = Row(row.contexts + [ctx], min(row.shared, _common(row.contexts[0].tokens, ctx.tokens)))
            alone = Row([ctx], len(ctx.tokens))
            if joined.length <= max_row and cost(joined.length) < cost(row.length) + cost(alone.length):
                rows[-1] = joined
                continue
        rows.append(Row([ctx], len(ctx.tokens)))
    return sorted(rows, key=lambda r: -r.length), cut


def attention_weight(config) -> float:
    """alpha for build_rows: attention's work per (query, key) pair over the rest of a layer's work per token."""
    h, heads = config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    ffn = getattr(config, "intermediate_size", None) or 4 * h
    per_token = 2 * (2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * ffn)
    return 4 * heads * head_dim / per_token


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
    width = max(len(t) for t, *_ in layouts)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    pos = torch.arange(width).repeat(len(batch), 1)
    ctx_id = torch.full((len(batch), width), -1, dtype=torch.long)  # -1 = padding
    branch = torch.zeros((len(batch), width), dtype=torch.long)
    rows_i, cols_i, targets, owner, requests = [], [], [], [], []
    for b, (tokens, positions, cid, br, scored) in enumerate(layouts):
        n = len(tokens)
        ids[b, :n] = torch.tensor(tokens)
        pos[b, :n] = torch.tensor(positions)
        ctx_id[b, :n] = torch.tensor(cid)
        branch[b, :n] = torch.tensor(br)
        for req, cont, at in scored:
            owner += [len(requests)] * len(cont)
            requests.append(req)
            rows_i += [b] * len(cont)
            cols_i += at
            targets += cont
    keep = sorted(set(cols_i))
    kw = {}
    if not all(row.plain for row in batch):
        kw["position_ids"] = pos.to(device)
        kw["attention_mask"] = _tree_mask(ctx_id, branch, model.dtype).to(device)
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


def _tree_mask(ctx_id: torch.Tensor, branch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive mask: entry k is visible from i when k <= i and k is the shared prefix, or k belongs
    to i's context and is either context or on i's branch. Padding sees only itself (a fully masked row would turn
    into NaN and leak through 0 * NaN)."""
    T = ctx_id.shape[1]
    ci, ck = ctx_id[:, :, None], ctx_id[:, None, :]  # (B, T, 1), (B, 1, T)
    bi, bk = branch[:, :, None], branch[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    visible = causal & (ci >= 0) & ((ck == 0) | ((ck == ci) & ((bk == 0) | (bk == bi))))
    visible |= torch.eye(T, dtype=torch.bool)
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[:, None]
