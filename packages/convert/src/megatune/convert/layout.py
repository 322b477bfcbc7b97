"""Pure layout functions: how a Hugging Face tensor becomes Megatron-Core's tensor(s), and back.

Two separate concerns, kept apart (as in Megatron-Bridge):
- *format* (merge/split): HF q/k/v or gate/up tensors <-> one "full" Megatron tensor, i.e. the TP=1 layout.
- *parallelism* (shard/unshard): the full tensor <-> the per-TP-rank parts, by a declared kind.

Kinds (the split dimension is declared, never guessed):
  column      split dim 0 into tp contiguous chunks (also the fused QKV, see below)
  row         split dim 1
  replicated  every rank holds the whole tensor (norms)
  fc1         full [gate; up] -> rank i holds [gate_i; up_i]
  vocab       pad dim 0 to the padded vocab size with zero rows, then split dim 0

Fused QKV: per query group g the rows are [q heads of g (heads/groups of them), k_g, v_g]. Megatron-Core splits
this tensor into tp contiguous chunks in every case. When tp > groups (megatron-core >= 0.16,
transformer/attention.py `get_query_key_value_tensors`), a rank's chunk is a fraction of one group: the ranks
all-gather the fused activations and each picks its group `rank // (tp // groups)`, so the *stored* weight is not
replicated; only whole-tensor divisibility (rows % tp == 0, heads % tp == 0, tp % groups == 0) is needed.

No file I/O, no torch.distributed: tensors in, tensors out.
"""

from __future__ import annotations

import torch

COLUMN, ROW, REPLICATED, FC1, VOCAB = "column", "row", "replicated", "fc1", "vocab"
KINDS = (COLUMN, ROW, REPLICATED, FC1, VOCAB)


# ---------------------------------------------------------------- format: HF <-> full Megatron tensor
def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """q (heads*hd, ...), k and v (groups*hd, ...) -> (groups*(heads/groups+2)*hd, ...), group-major."""
    assert q.shape[0] % groups == 0 and k.shape == v.shape and k.shape[0] % groups == 0, (q.shape, k.shape, groups)
    rest = q.shape[1:]
    parts = [t.reshape(groups, t.shape[0] // groups, *rest) for t in (q, k, v)]  # (g, rows/g, ...)
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def deinterleave_qkv(
    qkv: torch.Tensor, heads: int, groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of interleave_qkv: (groups*(heads/groups+2)*hd, ...) -> q (heads*hd, ...), k, v (groups*hd, ...)."""
    qpg = heads // groups
    assert heads % groups == 0 and qkv.shape[0] == groups * (qpg + 2) * head_dim, (qkv.shape, heads, groups, head_dim)
    rest = qkv.shape[1:]
    g = qkv.reshape(groups, (qpg + 2) * head_dim, *rest)
    q, k, v = torch.split(g, [qpg * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(ffn, h), (ffn, h) -> (2*ffn, h): the TP=1 fc1 layout [gate; up]."""
    assert gate.shape == up.shape, (gate.shape, up.shape)
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


# ---------------------------------------------------------------- vocab padding
def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128, tp: int = 1) -> int:
    """Megatron-LM's `_vocab_size_with_padding`: round up to a multiple of divisible_by * tp."""
    multiple = make_vocab_size_divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    """(V, ...) -> (padded, ...) with zero rows appended (Megatron never reads logits of padding ids)."""
    assert padded >= t.shape[0], (padded, t.shape)
    if padded == t.shape[0]:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])], dim=0)


def strip_vocab(t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return t[:vocab_size]


# ---------------------------------------------------------------- parallelism: full <-> TP parts
def chunk_bounds(n: int, tp: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous chunk of n rows; n must divide evenly (Megatron never splits unevenly)."""
    assert n % tp == 0, f"{n} rows do not split evenly over tp={tp}"
    size = n // tp
    return rank * size, (rank + 1) * size


def shard(kind: str, full: torch.Tensor, tp: int, *, padded_vocab: int | None = None) -> list[torch.Tensor]:
    """Full (TP=1, unpadded) Megatron tensor -> tp contiguous parts, in rank order."""
    if kind == REPLICATED:
        return [full] * tp
    if kind == ROW:
        assert full.shape[1] % tp == 0, f"dim 1 of {tuple(full.shape)} does not split over tp={tp}"
        return [t.contiguous() for t in torch.chunk(full, tp, dim=1)]
    if kind == FC1:
        gate, up = split_gate_up(full)
        assert gate.shape[0] % tp == 0, f"ffn {gate.shape[0]} does not split over tp={tp}"
        return [torch.cat([g, u], dim=0) for g, u in zip(torch.chunk(gate, tp), torch.chunk(up, tp))]
    if kind == VOCAB:
        full = pad_vocab(full, padded_vocab if padded_vocab is not None else full.shape[0])
    assert kind in (COLUMN, VOCAB), kind
    assert full.shape[0] % tp == 0, f"dim 0 of {tuple(full.shape)} does not split over tp={tp}"
    return [t.contiguous() for t in torch.chunk(full, tp, dim=0)]


def unshard(kind: str, parts: list[torch.Tensor], *, vocab_size: int | None = None) -> torch.Tensor:
    """Inverse of shard: tp parts -> the full tensor (vocab padding stripped when vocab_size is given)."""
    if kind == REPLICATED:
        return parts[0]
    if kind == ROW:
        return torch.cat(parts, dim=1)
    if kind == FC1:
        gates, ups = zip(*(split_gate_up(p) for p in parts))
        return merge_gate_up(torch.cat(gates), torch.cat(ups))
    full = torch.cat(parts, dim=0)
    if kind == VOCAB and vocab_size is not None:
        full = strip_vocab(full, vocab_size)
    return full


def reshard(kind: str, parts: list[torch.Tensor], tp: int, *, vocab_size: int | None = None,
            padded_vocab: int | None = None) -> list[torch.Tensor]:
    """tp=len(parts) -> tp parts (vocab padding is recomputed for the new tp by the caller's padded_vocab)."""
    return shard(kind, unshard(kind, parts, vocab_size=vocab_size), tp, padded_vocab=padded_vocab)


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
    if rest < 0 or (free == 0 and rest != 0) or (free and rest % free):
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
