"""`--save_safetensors true`: every checkpoint also gets an HF directory, written straight from the training ranks.

No rank gathers the model. The file layout (shards, headers, byte offsets) is a pure function of the config and
the dtype, so every rank computes the same plan (the shard plan of `export --to_hf`: hf_io.plan_shards); rank 0
creates the files at their final size, then every rank writes the bytes of the parameters it holds at their offsets
with positional writes, one tensor at a time (convert's `part_row_ranges` says which rows, or columns for
row-parallel weights, of which HF tensor each tp rank's part holds). Data-parallel rank 0 of each (tp, pp, ep)
coordinate writes; replicated tensors (norms, router) are written by tp rank 0 only. The result is what
`megatune export --to_hf` makes from the same checkpoint, tensor for tensor.

The directory is written inside the checkpoint's staging directory, so it is published with the checkpoint, atomically.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from megatune.convert import ckpt_layout
from megatune.convert.hf_io import DTYPE_NAMES, INDEX, plan_shards
from megatune.train.states import unwrap

MAX_SHARD_SIZE = 5 * 10**9  # export --to_hf's default


def hf_dir_name(meta: dict) -> str:
    return f"{meta['model_type']}-hf"


def _plan(meta: dict, shape, dtype: torch.dtype, max_shard_size: int):
    """[(hf name, shape)], file names, and {hf name: (file index, byte offset of the tensor's data)}."""
    from megatune.convert.plan import hf_shape, is_tied_copy, stage_entries

    names = [n for p in range(meta["pp"])
             for e in stage_entries(shape, meta["layers_per_stage"], p, meta["naming"], ep=meta.get("ep", 1),
                                    ep_rank=None) if not is_tied_copy(e) for n in e.hf_names]
    specs = [(n, hf_shape(n, shape), dtype) for n in names]
    shards = plan_shards(specs, max_shard_size)
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    headers, where = [], {}
    for s, idx in enumerate(shards):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for i in idx:
            name, shp, _ = specs[i]
            n = math.prod(shp) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shp), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8-byte alignment
        headers.append((struct.pack("<Q", len(raw)) + raw, offset))
        base = 8 + len(raw)
        for i in idx:
            where[specs[i][0]] = (s, base + header[specs[i][0]]["data_offsets"][0])
    return specs, files, headers, where, shards


def _pwrite(fd: int, data: torch.Tensor, offset: int) -> None:
    view = memoryview(data.contiguous().view(-1).view(torch.uint8).numpy())
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_hf(model_chunks, out_dir: str | Path, meta: dict, aux_dir=None, *, max_shard_size: int = MAX_SHARD_SIZE
             ) -> Path:
    """Every rank calls (collective). `meta`: this run's megatune.json (states.run_meta); `aux_dir`: where the
    tokenizer files are copied from."""
    from megatune.convert.arch import shape_of
    from megatune.convert.plan import is_tied_copy, part_row_ranges, stage_entries

    out_dir = Path(out_dir)
    model = unwrap(model_chunks[0])
    params = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    dtype = next(iter(params.values())).dtype
    shape = shape_of(meta["hf_config"])
    specs, files, headers, where, shards = _plan(meta, shape, dtype, max_shard_size)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        for f, (head, size) in zip(files, headers):
            with open(out_dir / f, "wb") as fh:
                fh.write(head)
                fh.truncate(len(head) + size)
    _barrier()
    tp, tp_rank, ep = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(), meta.get("ep", 1)
    ep_rank = ps.get_expert_model_parallel_rank()
    dense_writer = ps.get_data_parallel_rank() == 0
    expert_writer = ps.get_expert_data_parallel_rank() == 0 if ep > 1 else dense_writer
    fds = {}
    try:
        for e in stage_entries(shape, meta["layers_per_stage"], ps.get_pipeline_model_parallel_rank(), meta["naming"],
                               ep=ep, ep_rank=ep_rank):
            if is_tied_copy(e) or not (expert_writer if e.ep_rank is not None and ep > 1 else dense_writer):
                continue
            part = params[e.name].detach()
            for hf_name, hf_shp in zip(e.hf_names, e.hf_shapes):
                s, base = where[hf_name]
                if s not in fds:
                    fds[s] = os.open(out_dir / files[s], os.O_WRONLY)
                _write_slices(fds[s], base, part, e, hf_name, hf_shp, shape, tp, tp_rank, meta["padded_vocab_size"],
                              part_row_ranges)
        for fd in fds.values():
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    _barrier()
    if rank0:
        if len(files) > 1:
            total = sum(math.prod(s) * d.itemsize for _, s, d in specs)
            weight_map = {specs[i][0]: files[s] for s, idx in enumerate(shards) for i in idx}
            ckpt_layout.write_json_atomic(out_dir / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        cfg = dict(meta["hf_config"])
        for key in ("torch_dtype", "dtype"):  # the dtype the weights are in, as export --to_hf records it
            if key in cfg or key == "torch_dtype":
                cfg[key] = str(dtype).removeprefix("torch.")
        ckpt_layout.write_json_atomic(out_dir / ckpt_layout.HF_CONFIG, cfg)
        if aux_dir is not None:
            ckpt_layout.copy_aux_files(aux_dir, out_dir, [f for f in ckpt_layout.AUX_FILES if f != ckpt_layout.HF_CONFIG])
        ckpt_layout.fsync_dir(out_dir)
    _barrier()
    return out_dir


def _write_slices(fd, base, part, entry, hf_name, hf_shp, shape, tp, tp_rank, padded, part_row_ranges) -> None:
    """This tp rank's slices of HF tensor `hf_name` (rows; columns for row-parallel weights) at their offsets."""
    item = part.element_size()
    dim = entry.param.kind.dim
    at = 0  # position along `dim` in the HF tensor
    for rank, a, b in part_row_ranges(entry, hf_name, shape, tp, padded):
        n = b - a
        if (tp_rank == 0) if entry.param.kind.copies else (rank == tp_rank):
            piece = part.narrow(dim, a, n).cpu()
            if dim == 0:
                row = math.prod(hf_shp[1:]) * item
                _pwrite(fd, piece, base + at * row)
            else:  # columns [at, at + n) of every row of an [R, C] tensor
                cols = hf_shp[1]
                for r in range(hf_shp[0]):
                    _pwrite(fd, piece[r], base + (r * cols + at) * item)
        at += n


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def after_write(aux_dir=None, max_shard_size: int = MAX_SHARD_SIZE):
    """A checkpoint format's `after_write` hook: the HF dir inside the staging iteration directory."""
    def write(staging: Path, states, meta: dict) -> None:
        write_hf(states["model"].chunks, Path(staging) / hf_dir_name(meta), meta, aux_dir,
                 max_shard_size=max_shard_size)
    return write
