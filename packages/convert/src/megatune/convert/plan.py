"""Which parameters live on which (tp, pp) rank, with which shape, and how each rank's part is cut from HF tensors.

`rank_part` reads only the rows/columns a rank needs (a `Reader` serves slices, e.g. safetensors `get_slice`), so
building one rank touches about 1/tp of each tensor. It must equal `shard(kind, hf_to_full(...))[rank]`; the tests
check that equivalence. Apart from the reader callback everything here is pure.
"""

from __future__ import annotations

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


class DictReader:
    """A Reader over in-memory tensors (tests, and resharding already-loaded checkpoints)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        t = self.tensors[name]
        return t if start is None else t.narrow(dim, start, stop - start)


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
