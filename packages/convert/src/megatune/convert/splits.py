"""Split kinds and merges: the one statement of how a Megatron tensor is laid out over tensor parallelism, and of how
several HF tensors form one Megatron tensor.

Two rules, kept apart (as in Megatron-Bridge):
- a **merge** (format) says how HF tensors (its *pieces*: q/k/v, gate/up, or one tensor) form the *full* Megatron
  tensor, the TP=1 layout: `segments(pieces)` lists piece row ranges whose concatenation is the full tensor.
- a **split kind** (parallelism) says how the full tensor lies on tp ranks: `row_segments(full, sizes)` lists full
  ranges (along the kind's `dim`) whose concatenation is the tp rank parts stacked in rank order (`None` marks zero
  rows, i.e. vocab padding); `rank_shape` follows from it.

    column      dim 0 in tp contiguous chunks
    row         dim 1 in tp contiguous chunks
    replicated  every rank holds the whole tensor (norms, router)
    vocab       dim 0 padded with zero rows to the padded vocab size, then chunked
    fc1         gated fc1 [gate; up]: rank t holds [gate_t; up_t]

QKV-by-group is the column kind over the `qkv` merge: the full tensor is group-major (per query group g: the q heads
of g, k_g, v_g) and megatron-core cuts it into tp contiguous chunks in every case. When tp > groups (megatron-core
>= 0.16, attention.py `get_query_key_value_tensors`) a chunk is a fraction of one group: the ranks all-gather the
fused activations and each picks its group `rank // (tp // groups)`, so the stored weight is not replicated and only
whole-tensor divisibility is needed. An expert's weights split like a dense MLP's (fc1, row): expert parallelism
only decides which rank file holds an expert (families.Param.expert), not how a tensor splits.

Everything else is derived from `source_segments` (merge composed with split): the parts of a full tensor (`shard`,
`unshard`), a rank's part read by slices, the parts read straight into a caller's buffer, and where an HF tensor's
rows lie in the rank files (`placements`). Pure: tensors and shapes in, tensors and ranges out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

Dims = tuple[int, ...]


class Segment(NamedTuple):
    source: int | None  # index of the source tensor (a merge piece, or 0 = the full tensor); None: zero rows
    start: int
    stop: int


class Placement(NamedTuple):
    """Rows [at, at + stop - start) of rank `rank`'s part (along the kind's dim) are source rows [start, stop)."""

    rank: int
    at: int
    source: int | None
    start: int
    stop: int


@dataclass(frozen=True)
class Sizes:
    """What a rule may read besides the tensor shapes."""

    tp: int
    padded_vocab: int | None = None  # vocab kind: rows after padding (a multiple of tp)
    groups: int = 1  # qkv merge: query groups


def chunk_bounds(n: int, tp: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous chunk of n rows; n must divide evenly (Megatron never splits unevenly)."""
    assert n % tp == 0, f"{n} rows do not split evenly over tp={tp}"
    size = n // tp
    return rank * size, (rank + 1) * size


# ---------------------------------------------------------------- split kinds (parallelism)
class SplitKind(str):
    """A split kind is its name (so tables, JSON and comparisons with "column" keep working) plus its one rule."""

    dim = 0  # the dimension split over ranks
    copies = False  # every rank holds the whole tensor: one part is stored per rank, read from rank 0

    def row_segments(self, full: Dims, sizes: Sizes) -> list[Segment]:
        """Ranges of the full tensor along `dim` whose concatenation is the rank parts stacked in rank order."""
        raise NotImplementedError

    def parts(self, tp: int) -> int:
        """How many distinct parts the rule produces (1 for copies)."""
        return 1 if self.copies else tp

    def rank_shape(self, full: Dims, sizes: Sizes) -> Dims:
        total = sum(s.stop - s.start for s in self.row_segments(full, sizes))
        n = self.parts(sizes.tp)
        assert total % n == 0, f"{self}: {total} rows do not split over {n} parts"
        return (*full[:self.dim], total // n, *full[self.dim + 1:])


class Column(SplitKind):
    def row_segments(self, full, sizes):
        chunk_bounds(full[0], sizes.tp, 0)
        return [Segment(0, 0, full[0])]


class Row(SplitKind):
    dim = 1

    def row_segments(self, full, sizes):
        chunk_bounds(full[1], sizes.tp, 0)
        return [Segment(0, 0, full[1])]


class Replicated(SplitKind):
    copies = True

    def row_segments(self, full, sizes):
        return [Segment(0, 0, full[0])]


class Vocab(SplitKind):
    def row_segments(self, full, sizes):
        padded = full[0] if sizes.padded_vocab is None else sizes.padded_vocab
        assert padded >= full[0], f"padded vocab {padded} < {full[0]} rows"
        chunk_bounds(padded, sizes.tp, 0)
        return [Segment(0, 0, full[0])] + ([Segment(None, full[0], padded)] if padded > full[0] else [])


class GatedFC1(SplitKind):
    def row_segments(self, full, sizes):
        ffn = full[0] // 2
        out = []
        for t in range(sizes.tp):
            a, b = chunk_bounds(ffn, sizes.tp, t)
            out += [Segment(0, a, b), Segment(0, ffn + a, ffn + b)]  # [gate_t; up_t]
        return out


COLUMN, ROW, REPLICATED, VOCAB, FC1 = Column("column"), Row("row"), Replicated("replicated"), Vocab("vocab"), \
    GatedFC1("fc1")
KINDS: dict[str, SplitKind] = {k: k for k in (COLUMN, ROW, REPLICATED, FC1, VOCAB)}


def split_kind(kind: str) -> SplitKind:
    if isinstance(kind, SplitKind):
        return kind
    assert kind in KINDS, f"unknown split kind {kind!r}; known: {', '.join(KINDS)}"
    return KINDS[kind]


# ---------------------------------------------------------------- merges (format)
class Merge(str):
    """How HF pieces form the full tensor along dim 0."""

    def segments(self, pieces: Sequence[Dims], sizes: Sizes) -> list[Segment]:
        raise NotImplementedError

    def full_shape(self, pieces: Sequence[Dims], sizes: Sizes) -> Dims:
        return (sum(s.stop - s.start for s in self.segments(pieces, sizes)), *pieces[0][1:])


class Single(Merge):
    def segments(self, pieces, sizes):
        return [Segment(0, 0, pieces[0][0])]

    def full_shape(self, pieces, sizes):
        return tuple(pieces[0])


class Stack(Merge):
    """[piece 0; piece 1; ...], e.g. fc1 = [gate; up]."""

    def segments(self, pieces, sizes):
        assert all(tuple(p) == tuple(pieces[0]) for p in pieces), f"{self}: pieces differ in shape: {pieces}"
        return [Segment(i, 0, p[0]) for i, p in enumerate(pieces)]


class QKVGroups(Merge):
    """q (heads*hd, ...), k and v (groups*hd, ...) -> group-major [q heads of g; k_g; v_g] for each group g."""

    def segments(self, pieces, sizes):
        (q, *rest), (k, *_), (v, *_) = pieces
        g = sizes.groups
        assert q % g == 0 and k == v and k % g == 0, f"qkv pieces {pieces} do not split into {g} groups"
        qg, kg = q // g, k // g
        return [s for i in range(g) for s in (Segment(0, i * qg, (i + 1) * qg), Segment(1, i * kg, (i + 1) * kg),
                                               Segment(2, i * kg, (i + 1) * kg))]


SINGLE, GATE_UP, QKV = Single("single"), Stack("gate_up"), QKVGroups("qkv")


# ---------------------------------------------------------------- derived: merge composed with split
def source_segments(kind: SplitKind, merge: Merge, pieces: Sequence[Dims], sizes: Sizes) -> list[Segment]:
    """Piece ranges (along kind.dim) whose concatenation is the rank parts stacked in rank order."""
    full = merge.full_shape(pieces, sizes)
    if isinstance(merge, Single):
        return kind.row_segments(full, sizes)
    assert kind.dim == 0, f"a {kind} split cannot follow the {merge} merge (merges stack rows)"
    merged, out = merge.segments(pieces, sizes), []
    for src, a, b in kind.row_segments(full, sizes):
        if src is None:
            out.append(Segment(None, a, b))
            continue
        at = 0
        for piece, pa, pb in merged:  # the full range [a, b) crosses these piece ranges
            lo, hi = max(a, at), min(b, at + pb - pa)
            if lo < hi:
                out.append(Segment(piece, pa + lo - at, pa + hi - at))
            at += pb - pa
    return out


def placements(kind: SplitKind, merge: Merge, pieces: Sequence[Dims], sizes: Sizes) -> list[Placement]:
    """`source_segments` cut at part boundaries: where every source range lands in which rank's part."""
    per = kind.rank_shape(merge.full_shape(pieces, sizes), sizes)[kind.dim]
    out, pos = [], 0
    for src, a, b in source_segments(kind, merge, pieces, sizes):
        while a < b:
            rank, r = divmod(pos, per)
            n = min(per - r, b - a)
            out.append(Placement(rank, r, src, a, a + n))
            pos, a = pos + n, a + n
    return out


def gather(kind: SplitKind, merge: Merge, pieces: Sequence[Dims], sizes: Sizes, rank: int,
           read: Callable[[int, int, int, int], torch.Tensor]) -> torch.Tensor:
    """Rank `rank`'s part, from `read(source, dim, start, stop)` slices (zeros for padding)."""
    blocks = []
    for p in placements(kind, merge, pieces, sizes):
        if p.rank != rank:
            continue
        if p.source is None:
            like = read(0, kind.dim, 0, 1)
            blocks.append(like.new_zeros(*like.shape[:kind.dim], p.stop - p.start, *like.shape[kind.dim + 1:]))
        else:
            blocks.append(read(p.source, kind.dim, p.start, p.stop))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=kind.dim)


def merge_pieces(merge: Merge, pieces: Sequence[torch.Tensor], sizes: Sizes) -> torch.Tensor:
    """HF pieces -> the full tensor."""
    segs = merge.segments([tuple(p.shape) for p in pieces], sizes)
    if isinstance(merge, Single):
        return pieces[0]
    return torch.cat([pieces[s.source][s.start:s.stop] for s in segs])


def split_full(merge: Merge, full: torch.Tensor, pieces: Sequence[Dims], sizes: Sizes) -> list[torch.Tensor]:
    """Inverse of merge_pieces: the full tensor -> contiguous HF pieces of the given shapes."""
    if isinstance(merge, Single):
        return [full.contiguous()]
    out = [full.new_empty(p) for p in pieces]
    at = 0
    for s in merge.segments(pieces, sizes):
        out[s.source][s.start:s.stop] = full[at:at + s.stop - s.start]
        at += s.stop - s.start
    return out


def shard(kind: str, full: torch.Tensor, tp: int, *, padded_vocab: int | None = None) -> list[torch.Tensor]:
    """Full (TP=1, unpadded) Megatron tensor -> tp parts, in rank order (copies: the same tensor tp times)."""
    kind = split_kind(kind)
    sizes, shape = Sizes(tp, padded_vocab), [tuple(full.shape)]
    parts = [gather(kind, SINGLE, shape, sizes, r, lambda _, d, a, b: full.narrow(d, a, b - a)).contiguous()
             for r in range(kind.parts(tp))]
    return parts * tp if kind.copies else parts


def unshard(kind: str, parts: Sequence[torch.Tensor], *, vocab_size: int | None = None) -> torch.Tensor:
    """Inverse of shard: tp parts -> the full tensor (vocab padding stripped when vocab_size is given)."""
    kind = split_kind(kind)
    if kind.copies:
        return parts[0]
    d, tp = kind.dim, len(parts)
    stacked = parts[0].shape[d] * tp
    full_shape = list(parts[0].shape)
    full_shape[d] = stacked if vocab_size is None else vocab_size
    sizes = Sizes(tp, padded_vocab=stacked)
    full = parts[0].new_empty(full_shape)
    for p in placements(kind, SINGLE, [tuple(full_shape)], sizes):
        if p.source is not None:
            full.narrow(d, p.start, p.stop - p.start).copy_(parts[p.rank].narrow(d, p.at, p.stop - p.start))
    return full

