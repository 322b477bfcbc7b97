"""Pure layout functions: the HF <-> full-tensor formats in the shapes callers use (q/k/v, gate/up), vocab padding,
sharding a full tensor over tp, and pipeline-stage assignment.

The rules themselves live in splits.py (one `row_segments` per split kind, one `segments` per merge); the functions
here are thin views of them. No file I/O, no torch.distributed: tensors in, tensors out.
"""

from __future__ import annotations

import torch
from megatune.convert.splits import (
    COLUMN,
    FC1,
    GATE_UP,
    QKV,
    REPLICATED,
    ROW,
    VOCAB,
    Sizes,
    chunk_bounds,
    merge_pieces,
    shard,
    split_full,
    unshard,
)

__all__ = ["COLUMN", "ROW", "REPLICATED", "FC1", "VOCAB", "KINDS", "chunk_bounds", "shard", "unshard",
           "interleave_qkv", "deinterleave_qkv", "merge_gate_up", "split_gate_up", "padded_vocab_size",
           "stage_layers", "stage_offsets", "layer_stage"]
KINDS = (COLUMN, ROW, REPLICATED, FC1, VOCAB)


# ---------------------------------------------------------------- format: HF <-> full Megatron tensor
def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """q (heads*hd, ...), k and v (groups*hd, ...) -> (groups*(heads/groups+2)*hd, ...), group-major."""
    return merge_pieces(QKV, [q, k, v], Sizes(1, groups=groups))


def deinterleave_qkv(
    qkv: torch.Tensor, heads: int, groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of interleave_qkv: (groups*(heads/groups+2)*hd, ...) -> q (heads*hd, ...), k, v (groups*hd, ...)."""
    rest = tuple(qkv.shape[1:])
    assert heads % groups == 0 and qkv.shape[0] == (heads + 2 * groups) * head_dim, (qkv.shape, heads, groups, head_dim)
    q, k, v = split_full(QKV, qkv, [(heads * head_dim, *rest), (groups * head_dim, *rest), (groups * head_dim, *rest)],
                         Sizes(1, groups=groups))
    return q, k, v


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(ffn, h), (ffn, h) -> (2*ffn, h): the TP=1 fc1 layout [gate; up]."""
    return merge_pieces(GATE_UP, [gate, up], Sizes(1))


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = (fc1.shape[0] // 2, *fc1.shape[1:])
    gate, up = split_full(GATE_UP, fc1, [half, half], Sizes(1))
    return gate, up


# ---------------------------------------------------------------- vocab padding
def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128, tp: int = 1) -> int:
    """Megatron-LM's `_vocab_size_with_padding`: round up to a multiple of divisible_by * tp."""
    multiple = make_vocab_size_divisible_by * tp
    return -(-vocab_size // multiple) * multiple


# ---------------------------------------------------------------- pipeline stages
def stage_layers(num_layers: int, pp: int, first: int | None = None, last: int | None = None) -> list[int]:
    """Layers per PP stage. Optional uneven first/last stage (Megatron-LM's --decoder-first/last-pipeline-num-layers);
    the remaining layers are spread evenly over the other stages and must divide."""
    assert pp >= 1 and num_layers >= 1
    if pp == 1:
        if first not in (None, num_layers) or last not in (None, num_layers):
            raise ValueError(f"pp=1 holds all {num_layers} layers; uneven first/last stages need pp > 1")
        return [num_layers]
    counts: list[int | None] = [None] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    fixed = sum(c for c in counts if c is not None)
    free = counts.count(None)
    rest = num_layers - fixed
    if rest < 0:
        raise ValueError(f"first={first} and last={last} stage layers add up to {fixed}, more than the model's "
                         f"{num_layers} layers")
    if (free == 0 and rest != 0) or (free and rest % free):
        raise ValueError(
            f"{num_layers} layers cannot be split over pp={pp} with first={first}, last={last}: "
            f"the {rest} remaining layers must split evenly over {free} stage(s)"
        )
    return [c if c is not None else rest // free for c in counts]


def stage_offsets(counts: list[int]) -> list[int]:
    """Global index of each stage's first layer."""
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += c
    return out


def layer_stage(layer: int, counts: list[int]) -> tuple[int, int]:
    """Global layer index -> (pp stage, local index on that stage)."""
    for stage, start in enumerate(stage_offsets(counts)):
        if layer < start + counts[stage]:
            return stage, layer - start
    raise IndexError(f"layer {layer} beyond {sum(counts)} layers")
