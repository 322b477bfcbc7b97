"""Which parameters live on which (tp, pp, ep) rank, with which shape, and how each rank's part is cut from HF
tensors: the family row (families.py) says what exists, the split kind and merge (splits.py) say how it is laid
out, and every function here derives from those two.

`rank_part` reads only the rows/columns a rank needs (a `Reader` serves slices), so building one rank touches about
1/tp of each tensor; `parts_into` reads all tp parts straight into a caller's buffer; `part_row_ranges` says where
an HF tensor's rows lie in the rank parts (what reading a Megatron checkpoint back needs). Apart from the reader
callbacks everything here is pure.

Expert parallelism: the routed experts of a layer are split contiguously over ep ranks (global expert
e = ep_rank * experts/ep + local index j); every other parameter is held by every ep rank.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Protocol

import torch
from megatune.convert.errors import ConvertError
from megatune.convert.families import BY_NAME, EMBEDDING, FINAL_NORM, OUTPUT, OUTPUT_TIED, Param, Shape
from megatune.convert.layout import stage_offsets
from megatune.convert.splits import Sizes, gather, placements, source_segments


class Reader(Protocol):
    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor: ...


class IntoReader(Reader, Protocol):
    """A Reader that can also fill caller-owned buffers (what `parts_into` needs)."""

    def read_rows_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor: ...

    def read_cols_into(self, name: str, outs: list[torch.Tensor]) -> None: ...


@dataclass(frozen=True)
class Entry:
    """One Megatron parameter on one PP stage: its stage-local name, its table row, its global HF names and their
    shapes, and the expert-parallel rank holding it (None: every ep rank)."""

    name: str
    param: Param
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    ep_rank: int | None = None


def _entry(p: Param, name: str, hf: Sequence[str], shape: Shape, ep_rank: int | None = None) -> Entry:
    return Entry(name, p, tuple(hf), tuple(shape.dims(d) for d in p.dims), ep_rank)


def _present(p: Param, shape: Shape, layer: int) -> bool:
    if p.when and not getattr(shape, p.when):
        return False
    return p.layers is None or (p.layers == "moe") == shape.is_moe_layer(layer)


def _layer_entries(shape: Shape, layer: int, local: int, naming: str, ep: int, ep_rank: int | None) -> list[Entry]:
    params = [p for p in shape.row.layer_params if _present(p, shape, layer)]
    out, i = [], 0
    while i < len(params):
        if not params[i].expert:
            p = params[i]
            out.append(_entry(p, f"decoder.layers.{local}.{p.name(naming)}",
                              [f"model.layers.{layer}.{h}" for h in p.hf], shape))
            i += 1
            continue
        group = []  # consecutive expert parameters: expert-major order, as megatron-core's SequentialMLP lists them
        while i < len(params) and params[i].expert:
            group.append(params[i])
            i += 1
        per = shape.experts // ep
        for e in range(shape.experts):
            owner, j = divmod(e, per)
            if ep_rank is None or owner == ep_rank:
                for p in group:
                    out.append(_entry(p, f"decoder.layers.{local}.{p.name(naming)}".replace("{j}", str(j)),
                                      [f"model.layers.{layer}.{h}".replace("{e}", str(e)) for h in p.hf], shape, owner))
    return out


def stage_entries(shape: Shape, counts: Sequence[int], stage: int, naming: str = "local", *, ep: int = 1,
                  ep_rank: int | None = 0) -> list[Entry]:
    """The parameters of PP stage `stage` on expert-parallel rank `ep_rank` (local layer and expert indices), in the
    order Megatron's state dict lists them. ep_rank=None: the parameters of every ep rank of the stage."""
    if ep > 1 and (not shape.experts or shape.experts % ep):
        raise ConvertError(f"cannot split {shape.experts} experts over ep={ep}; choose an ep that divides them")
    pp = len(counts)
    offset = stage_offsets(list(counts))[stage]
    out = []
    if stage == 0:
        out.append(_entry(EMBEDDING, EMBEDDING.local, EMBEDDING.hf, shape))
    for local in range(counts[stage]):
        out += _layer_entries(shape, offset + local, local, naming, ep, ep_rank)
    if stage == pp - 1:
        out.append(_entry(FINAL_NORM, FINAL_NORM.local, FINAL_NORM.hf, shape))
        if not shape.tied:
            out.append(_entry(OUTPUT, OUTPUT.local, OUTPUT.hf, shape))
        elif pp > 1:  # megatron-core keeps a copy of the tied embedding on the last stage
            out.append(_entry(OUTPUT_TIED, OUTPUT_TIED.local, OUTPUT_TIED.hf, shape))
    return out


def is_tied_copy(entry: Entry) -> bool:
    return entry.param is OUTPUT_TIED


def sizes(shape: Shape, tp: int, padded_vocab: int | None) -> Sizes:
    return Sizes(tp, padded_vocab, shape.groups)


# ---------------------------------------------------------------- one rank's part, read by slices
def rank_shape(entry: Entry, hf0: tuple[int, ...], shape: Shape, tp: int, padded_vocab: int) -> tuple[int, ...]:
    """Shape of a rank's part. `hf0`, the shape of the entry's first HF tensor as stored, must be the row's."""
    assert tuple(hf0) == entry.hf_shapes[0], (entry.hf_names[0], tuple(hf0), entry.hf_shapes[0])
    p, s = entry.param, sizes(shape, tp, padded_vocab)
    return p.kind.rank_shape(p.fmt.full_shape(entry.hf_shapes, s), s)


def rank_part(entry: Entry, reader: Reader, shape: Shape, tp: int, rank: int, padded_vocab: int) -> torch.Tensor:
    p, names = entry.param, entry.hf_names
    return gather(p.kind, p.fmt, entry.hf_shapes, sizes(shape, tp, padded_vocab), 0 if p.kind.copies else rank,
                  lambda src, dim, a, b: reader.read(names[src], dim, a, b))


def parts_into(entry: Entry, reader: IntoReader, shape: Shape, tp: int, padded_vocab: int, buf: torch.Tensor,
               dtype: torch.dtype) -> list[torch.Tensor]:
    """All tp parts of `entry`, == shard(kind, merged HF tensors), read straight into `buf` (uint8, reused across
    entries) in rank order: no full tensor is built and nothing is concatenated, so each byte is copied once."""
    p, names, s = entry.param, entry.hf_names, sizes(shape, tp, padded_vocab)
    part = rank_shape(entry, entry.hf_shapes[0], shape, tp, padded_vocab)
    n = p.kind.parts(tp)
    flat = buf[:n * math.prod(part) * dtype.itemsize].view(dtype)
    parts = list(flat.view(n, *part).unbind(0))
    segments = source_segments(p.kind, p.fmt, entry.hf_shapes, s)
    if p.kind.dim == 0:
        rows = flat.view(-1, *part[1:])  # the parts stacked along dim 0: filled by source row ranges, in order
        at = 0
        for src, a, b in segments:
            if src is None:
                rows[at:at + b - a].zero_()
            else:
                reader.read_rows_into(names[src], a, b, rows[at:at + b - a])
            at += b - a
        assert at == rows.shape[0], (entry.name, at, rows.shape)
    else:  # split along dim 1: each source row is cut into the parts' column blocks (a scatter read)
        assert [(src, a, b) for src, a, b in segments] == [(0, 0, entry.hf_shapes[0][1])], (entry.name, segments)
        reader.read_cols_into(names[0], parts)
    return parts * tp if p.kind.copies else parts


def part_row_ranges(entry: Entry, hf_name: str, shape: Shape, tp: int, padded_vocab: int) -> list[tuple[int, int, int]]:
    """Where HF tensor `hf_name`'s slices along the kind's dim lie in the entry's stored parts: (rank, start, stop)
    in HF order (rows for dim-0 kinds, columns for the row kind). The inverse of `parts_into`."""
    src = entry.hf_names.index(hf_name)
    p = entry.param
    return [(q.rank, q.at, q.at + q.stop - q.start)
            for q in placements(p.kind, p.fmt, entry.hf_shapes, sizes(shape, tp, padded_vocab)) if q.source == src]


# ---------------------------------------------------------------- HF shapes, from the row
@cache
def _hf_rules(family: str) -> dict[str, tuple[str | int, ...]]:
    """HF name pattern ({e} for an expert index; per-layer names relative to the layer) -> shape rule."""
    return {h: d for p in BY_NAME[family].params for h, d in zip(p.hf, p.dims)}


def hf_shape(hf_name: str, shape: Shape) -> tuple[int, ...]:
    """Shape of an HF tensor, from the config alone (the HF writer needs every shape before the first byte)."""
    suffix = hf_name.split(".", 3)[-1] if hf_name.startswith("model.layers.") else hf_name
    rule = _hf_rules(shape.family).get(re.sub(r"(^|\.)experts\.\d+\.", r"\1experts.{e}.", suffix))
    if rule is None:
        raise ConvertError(f"no parameter of the {shape.row.hf_class} family maps to HF tensor {hf_name!r}")
    return shape.dims(rule)
