"""Which parameters live on which (tp, pp) rank, with which shape, and how each rank's part is cut from HF tensors.

`rank_part` reads only the rows/columns a rank needs (a `Reader` serves slices, e.g. safetensors `get_slice`), so
building one rank touches about 1/tp of each tensor. It must equal `shard(kind, hf_to_full(...))[rank]`; the tests
check that equivalence. Apart from the reader callback everything here is pure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from megatune.convert.arch import EMBEDDING, FINAL_NORM, LAYER_PARAMS, OUTPUT, OUTPUT_TIED, Param, Shape
from megatune.convert.layout import (
    COLUMN,
    FC1,
    REPLICATED,
    ROW,
    VOCAB,
    chunk_bounds,
    deinterleave_qkv,
    interleave_qkv,
    merge_gate_up,
    split_gate_up,
    stage_offsets,
)


class Reader(Protocol):
    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor: ...


class IntoReader(Reader, Protocol):
    """A Reader that can also fill caller-owned buffers (what `parts_into` needs)."""

    def read_rows_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor: ...

    def read_cols_into(self, name: str, outs: list[torch.Tensor]) -> None: ...


@dataclass(frozen=True)
class Entry:
    """One Megatron parameter on one PP stage: its stage-local name, its table row, its global HF names."""

    name: str
    param: Param
    hf_names: tuple[str, ...]


def stage_entries(shape: Shape, counts: Sequence[int], stage: int, naming: str = "local") -> list[Entry]:
    """The parameters of PP stage `stage` (local layer indices), in the order Megatron's state dict lists them."""
    pp = len(counts)
    offset = stage_offsets(list(counts))[stage]
    out = []
    if stage == 0:
        out.append(Entry(EMBEDDING.local, EMBEDDING, EMBEDDING.hf))
    for local in range(counts[stage]):
        layer = offset + local
        for p in LAYER_PARAMS:
            if p.when and not getattr(shape, p.when):
                continue
            out.append(Entry(f"decoder.layers.{local}.{p.name(naming)}", p,
                             tuple(f"model.layers.{layer}.{h}" for h in p.hf)))
    if stage == pp - 1:
        out.append(Entry(FINAL_NORM.local, FINAL_NORM, FINAL_NORM.hf))
        if not shape.tied:
            out.append(Entry(OUTPUT.local, OUTPUT, OUTPUT.hf))
        elif pp > 1:  # megatron-core keeps a copy of the tied embedding on the last stage
            out.append(Entry(OUTPUT_TIED.local, OUTPUT_TIED, OUTPUT_TIED.hf))
    return out


def is_tied_copy(entry: Entry) -> bool:
    return entry.param is OUTPUT_TIED


# ---------------------------------------------------------------- format: HF tensors <-> full Megatron tensor
def hf_to_full(entry: Entry, tensors: Sequence[torch.Tensor], shape: Shape) -> torch.Tensor:
    if entry.param.fmt == "qkv":
        return interleave_qkv(*tensors, groups=shape.groups)
    if entry.param.fmt == "gate_up":
        return merge_gate_up(*tensors)
    return tensors[0]


def full_to_hf(entry: Entry, full: torch.Tensor, shape: Shape) -> dict[str, torch.Tensor]:
    if entry.param.fmt == "qkv":
        parts = deinterleave_qkv(full, shape.heads, shape.groups, shape.head_dim)
    elif entry.param.fmt == "gate_up":
        parts = split_gate_up(full)
    else:
        parts = (full,)
    return {n: t.contiguous() for n, t in zip(entry.hf_names, parts)}


# ---------------------------------------------------------------- one rank's part, read by slices
def rank_shape(entry: Entry, hf_shape: tuple[int, ...], shape: Shape, tp: int, padded_vocab: int) -> tuple[int, ...]:
    """Shape of the rank part, from the shape of the entry's first HF tensor."""
    kind, rest = entry.param.kind, tuple(hf_shape[1:])
    if entry.param.fmt == "qkv":
        return (shape.qkv_rows // tp, *rest)
    if kind == REPLICATED:
        return tuple(hf_shape)
    if kind == ROW:
        return (hf_shape[0], hf_shape[1] // tp)
    if kind == FC1:
        return (2 * hf_shape[0] // tp, *rest)
    if kind == VOCAB:
        return (padded_vocab // tp, *rest)
    return (hf_shape[0] // tp, *rest)


def rank_part(entry: Entry, reader: Reader, shape: Shape, tp: int, rank: int, padded_vocab: int) -> torch.Tensor:
    p, names = entry.param, entry.hf_names
    if p.fmt == "qkv":
        return _qkv_part(names, reader, shape, tp, rank)
    if p.kind == REPLICATED:
        return reader.read(names[0])
    if p.kind == ROW:
        a, b = chunk_bounds(reader.shape(names[0])[1], tp, rank)
        return reader.read(names[0], 1, a, b)
    if p.kind == FC1:
        a, b = chunk_bounds(reader.shape(names[0])[0], tp, rank)
        return torch.cat([reader.read(names[0], 0, a, b), reader.read(names[1], 0, a, b)])  # [gate_i; up_i]
    if p.kind == VOCAB:
        vocab = reader.shape(names[0])[0]
        a, b = chunk_bounds(padded_vocab, tp, rank)
        real = reader.read(names[0], 0, min(a, vocab), min(b, vocab))  # (rows <= b-a, h)
        if real.shape[0] == b - a:
            return real
        return torch.cat([real, real.new_zeros(b - a - real.shape[0], *real.shape[1:])])
    assert p.kind == COLUMN, p
    a, b = chunk_bounds(reader.shape(names[0])[0], tp, rank)
    return reader.read(names[0], 0, a, b)


def _qkv_part(names: Sequence[str], reader: Reader, shape: Shape, tp: int, rank: int) -> torch.Tensor:
    """Rows [a, b) of the group-major fused QKV, built group by group from q/k/v row slices.
    With tp > groups the chunk is a fraction of one group (see layout.py); the group is read whole then cut."""
    hd, qpg = shape.head_dim, shape.heads // shape.groups
    size = (qpg + 2) * hd  # rows per query group
    a, b = chunk_bounds(shape.groups * size, tp, rank)
    blocks = []
    for g in range(a // size, -(-b // size)):
        q = reader.read(names[0], 0, g * qpg * hd, (g + 1) * qpg * hd)
        k = reader.read(names[1], 0, g * hd, (g + 1) * hd)
        v = reader.read(names[2], 0, g * hd, (g + 1) * hd)
        block = torch.cat([q, k, v])  # (size, ...)
        blocks.append(block[max(a, g * size) - g * size: min(b, (g + 1) * size) - g * size])
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def parts_into(entry: Entry, reader: IntoReader, shape: Shape, tp: int, padded_vocab: int, buf: torch.Tensor,
               dtype: torch.dtype) -> list[torch.Tensor]:
    """All tp parts of `entry`, == shard(kind, hf_to_full(...)), read straight into `buf` (uint8, reused across
    entries) in rank order: no full tensor is built and nothing is concatenated, so each byte is copied once."""
    p, names = entry.param, entry.hf_names
    hf0 = reader.shape(names[0])
    part = rank_shape(entry, hf0, shape, tp, padded_vocab)
    n = 1 if p.kind == REPLICATED else tp
    size = n * math.prod(part)
    flat = buf[:size * dtype.itemsize].view(dtype)
    parts = list(flat.view(n, *part).unbind(0))
    if p.kind == ROW:  # rank t holds columns block t of every row
        reader.read_cols_into(names[0], parts)
        return parts
    rows = flat.view(-1, *part[1:])  # the parts stacked along dim 0: filled by HF row ranges, in order
    at = 0
    for name, a, b in _row_segments(entry, shape, tp, padded_vocab, hf0):
        if name is None:
            rows[at:at + b - a].zero_()
        else:
            reader.read_rows_into(name, a, b, rows[at:at + b - a])
        at += b - a
    assert at == rows.shape[0], (entry.name, at, rows.shape)
    return parts * tp if p.kind == REPLICATED else parts


def _row_segments(entry: Entry, shape: Shape, tp: int, padded_vocab: int, hf0: tuple[int, ...]):
    """(hf name, start, stop) row ranges whose concatenation is the entry's parts stacked in rank order;
    name None is zero rows (vocab padding)."""
    p, names = entry.param, entry.hf_names
    if p.fmt == "qkv":  # the full fused tensor is group-major [q_g; k_g; v_g]; the parts are its tp chunks
        hd, qpg = shape.head_dim, shape.heads // shape.groups
        for g in range(shape.groups):
            yield names[0], g * qpg * hd, (g + 1) * qpg * hd
            yield names[1], g * hd, (g + 1) * hd
            yield names[2], g * hd, (g + 1) * hd
    elif p.kind == FC1:  # rank t: [gate_t; up_t]
        for t in range(tp):
            a, b = chunk_bounds(hf0[0], tp, t)
            yield names[0], a, b
            yield names[1], a, b
    elif p.kind == VOCAB:
        yield names[0], 0, hf0[0]
        yield None, hf0[0], padded_vocab
    else:  # column (parts are consecutive row chunks) or replicated (one copy)
        yield names[0], 0, hf0[0]


def part_row_ranges(entry: Entry, hf_name: str, shape: Shape, tp: int, padded_vocab: int) -> list[tuple[int, int, int]]:
    """Where HF tensor `hf_name`'s dim-0 rows lie in the entry's stored parts: (rank, start, stop) in HF row order.
    The inverse of `parts_into`, derived from the same `_row_segments` (not for ROW kind: split along dim 1)."""
    hf0 = hf_shape(entry.hf_names[0], shape)
    per = rank_shape(entry, hf0, shape, tp, padded_vocab)[0]  # rows per part
    out, at = [], 0
    for name, a, b in _row_segments(entry, shape, tp, padded_vocab, hf0):
        s, end = at, at + b - a
        while name == hf_name and s < end:  # split the stacked range at part boundaries
            t, r = divmod(s, per)
            n = min(per - r, end - s)
            out.append((t, r, r + n))
            s += n
        at += b - a
    return out


class DictReader:
    """A Reader over in-memory tensors (tests, and resharding already-loaded checkpoints)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        t = self.tensors[name]
        return t if start is None else t.narrow(dim, start, stop - start)

    def read_rows_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.tensors[name][start:stop])

    def read_cols_into(self, name: str, outs: list[torch.Tensor]) -> None:
        for o, t in zip(outs, torch.chunk(self.tensors[name], len(outs), dim=1)):
            o.copy_(t)


def hf_shape(hf_name: str, shape: Shape) -> tuple[int, ...]:
    """Shape of an HF tensor, from the config alone (the HF writer needs every shape before the first byte)."""
    s, h = shape, shape.hidden
    q, kv = s.heads * s.head_dim, s.groups * s.head_dim
    suffix = hf_name.split(".", 3)[-1] if hf_name.startswith("model.layers.") else hf_name
    table = {
        "model.embed_tokens.weight": (s.vocab, h), "lm_head.weight": (s.vocab, h), "model.norm.weight": (h,),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q), "self_attn.q_norm.weight": (s.head_dim,),
        "self_attn.k_norm.weight": (s.head_dim,),
        "mlp.gate_proj.weight": (s.ffn, h), "mlp.up_proj.weight": (s.ffn, h), "mlp.down_proj.weight": (h, s.ffn),
    }
    return table[suffix]
