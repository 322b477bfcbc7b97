"""In-memory API used by megatune.train: one rank's Megatron-Core state dict, from HF or from a Megatron checkpoint
of any tp/pp/ep (re-sharded in memory), plus the checkpoint-layout helpers.

Expert parallelism: ep rank e holds the routed experts e*E/ep .. (e+1)*E/ep - 1 (local indices 0..E/ep - 1) and
every non-expert parameter; expert weights are tensor-parallel split like a dense MLP (expert TP = tp).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from megatune.convert.arch import check_parallel, shape_of
from megatune.convert.ckpt_layout import rank_record
from megatune.convert.errors import ConvertError
from megatune.convert.hf_io import HFReader, read_config
from megatune.convert.layout import padded_vocab_size, stage_layers
from megatune.convert.megatron_io import (
    DTYPES,
    META,
    load_rank_file,
    megatron_args_namespace,
    rank_file,
    read_latest,
    read_meta,
    write_latest,
    write_meta,
)
from megatune.convert.megatron_reader import MegatronReader
from megatune.convert.plan import rank_part, stage_entries

__all__ = [
    "hf_to_megatron_rank", "load_megatron_rank", "read_meta", "write_meta", "rank_file", "write_latest",
    "read_latest", "megatron_args_namespace", "resolve_layers_per_stage", "resolve_dtype",
]


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
    return DTYPES[dtype]


def resolve_layers_per_stage(num_layers: int, pp: int, layers_per_stage: Sequence[int] | None = None) -> list[int]:
    """Explicit per-stage counts (validated) or an even split."""
    if layers_per_stage is None:
        try:
            return stage_layers(num_layers, pp)
        except ValueError as e:
            raise ConvertError(f"{e}; choose a pp that divides num_hidden_layers or give uneven first/last stages"
                               ) from None
    counts = list(layers_per_stage)
    if len(counts) != pp or sum(counts) != num_layers or min(counts) < 0:
        raise ConvertError(f"layers_per_stage={counts} must list pp={pp} stage sizes summing to {num_layers}")
    return counts


def hf_to_megatron_rank(
    hf_dir: str | Path,
    *,
    tp: int,
    pp: int,
    tp_rank: int,
    pp_rank: int,
    naming: str = "local",
    dtype: str | torch.dtype | None = None,
    make_vocab_size_divisible_by: int = 128,
    layers_per_stage: Sequence[int] | None = None,
    ep: int = 1,
    ep_rank: int = 0,
) -> dict[str, torch.Tensor]:
    """One rank's GPTModel state dict (local layer and expert indices), reading only that rank's slices of the HF
    tensors."""
    if naming not in ("local", "te"):
        raise ConvertError(f"naming must be 'local' or 'te', got {naming!r}")
    cfg = read_config(Path(hf_dir))
    where = str(Path(hf_dir) / "config.json")
    shape = shape_of(cfg, where)
    check_parallel(shape, tp, where, ep)
    counts = resolve_layers_per_stage(shape.layers, pp, layers_per_stage)
    padded = padded_vocab_size(shape.vocab, make_vocab_size_divisible_by, tp)
    to = resolve_dtype(dtype)
    reader = HFReader(hf_dir)
    out = {}
    for e in stage_entries(shape, counts, pp_rank, naming, ep=ep, ep_rank=ep_rank):
        t = rank_part(e, reader, shape, tp, tp_rank, padded)
        out[e.name] = t.to(to) if to is not None else t
    return out


def load_megatron_rank(
    ckpt_dir: str | Path,
    *,
    tp: int,
    pp: int,
    tp_rank: int,
    pp_rank: int,
    iteration: int | str | None = None,
    ep: int = 1,
    ep_rank: int = 0,
) -> dict[str, torch.Tensor]:
    """One rank's `model` state dict; re-sharded in memory when the checkpoint's tp/pp/ep differ from (tp, pp, ep)."""
    meta = read_meta(ckpt_dir)
    iteration = read_latest(ckpt_dir) if iteration is None else iteration
    if (meta["tp"], meta["pp"], meta.get("ep", 1)) == (tp, pp, ep):
        path = rank_file(ckpt_dir, iteration, tp_rank, pp_rank, pp, ep_rank, ep)
        return dict(load_rank_file(path, mmap=False, rank=rank_record(tp, tp_rank, pp, pp_rank, ep, ep_rank))["model"])
    reader = MegatronReader(ckpt_dir, iteration, meta)
    shape = reader.dims
    check_parallel(shape, tp, str(Path(ckpt_dir) / META), ep)
    counts = meta["layers_per_stage"] if pp == meta["pp"] else resolve_layers_per_stage(shape.layers, pp)
    padded = padded_vocab_size(shape.vocab, meta["make_vocab_size_divisible_by"], tp)
    out = {}
    for e in stage_entries(shape, counts, pp_rank, meta["naming"], ep=ep, ep_rank=ep_rank):
        out[e.name] = rank_part(e, reader, shape, tp, tp_rank, padded).clone()  # own memory, not the file maps
    reader.release()
    return out
