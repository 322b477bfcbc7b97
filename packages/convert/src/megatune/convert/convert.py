"""Whole-checkpoint conversions, streamed: HF dir -> Megatron legacy dir, and back.

HF -> Megatron writes a PP stage's tp rank files side by side: each entry's tp parts are read straight into one
reused buffer (plan.parts_into) and appended to the rank files (torchfile.StreamingTorchFile), so peak memory is
about the largest entry (all its TP parts). Megatron -> HF reads each HF tensor in row chunks straight from the rank
files' records into a small ring of buffers (MegatronReader.read_into) while a writer thread appends them to
pre-planned safetensors shards. Both are independent of model size; written files and consumed rank files leave
the page cache as they go (fileio.py says why).

Output goes to a temporary sibling directory that is swapped into place at the end; on any error it is removed
(ckpt_layout.atomic_dir).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from megatune.convert.api import resolve_dtype, resolve_layers_per_stage
from megatune.convert.arch import architecture, check_parallel, shape_of
from megatune.convert.ckpt_layout import (
    AUX_FILES,
    HF_CONFIG,
    RANK_KEY,
    atomic_dir,
    copy_aux_files,
    rank_record,
    write_json_atomic,
)
from megatune.convert.errors import ConvertError
from megatune.convert.hf_io import HFReader, HFWriter, check_shapes, read_config
from megatune.convert.layout import padded_vocab_size
from megatune.convert.megatron_flags import write_megatron_args
from megatune.convert.megatron_io import (
    dtype_name,
    megatron_args_namespace,
    rank_file,
    write_latest,
    write_meta,
)
from megatune.convert.megatron_reader import MegatronReader
from megatune.convert.plan import hf_shape, is_tied_copy, parts_into, rank_shape, stage_entries
from megatune.convert.torchfile import Pending, StreamingTorchFile

FORMAT_VERSION = 1
RING_SLOTS, SLOT_BYTES = 4, 64 << 20  # Megatron -> HF read/write pipeline: 256 MB in flight at most


class Progress:
    """tqdm over bytes with a GB/s postfix; silent when disabled or tqdm is missing."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                           "[{elapsed}<{remaining}, {rate_fmt}]")
            except ImportError:
                pass

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in t. One reduction pass, no allocation: a non-finite element makes the fp32-accumulated sum
    non-finite; only when the sum is (NaN/Inf, or an overflow of huge finite values) is each element checked."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def nonfinite_error(hf_dir: Path, names: Sequence[str], reader: HFReader, to: torch.dtype) -> ConvertError:
    """Which HF tensor of an entry is non-finite (re-read on this error path only), or that the dtype overflowed."""
    bad = next((n for n in names if not all_finite(reader.read(n))), None)
    if bad is None:
        return ConvertError(f"{hf_dir}: tensor {names[0]!r} overflows {dtype_name(to)} (values beyond its range); "
                            f"convert with a wider --dtype, or pass --allow_nonfinite true to convert it anyway")
    return ConvertError(f"{hf_dir / reader.files[bad]}: tensor {bad!r} holds NaN or Inf values; the weights are "
                        f"damaged: re-download the model, or pass --allow_nonfinite true to convert it anyway")


def hf_to_megatron(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: str | torch.dtype | None = None,
    model_type: str | None = None,
    naming: str = "local",
    make_vocab_size_divisible_by: int = 128,
    layers_per_stage: Sequence[int] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    allow_nonfinite: bool = False,
    ep: int = 1,
) -> Path:
    """HF dir -> Megatron legacy dir (ep > 1: routed experts split over ep rank files, plan.stage_entries).
    Refused before anything is written: tensors whose shapes disagree with
    config.json, too little free space; while writing: a NaN/Inf tensor (unless allow_nonfinite)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg = read_config(hf_dir)
    arch = architecture(cfg, where=str(hf_dir / "config.json"))
    shape = shape_of(cfg, where=str(hf_dir / "config.json"))
    check_parallel(shape, tp, where=str(hf_dir / "config.json"), ep=ep)
    counts = resolve_layers_per_stage(shape.layers, pp, layers_per_stage)
    padded = padded_vocab_size(shape.vocab, make_vocab_size_divisible_by, tp)
    reader = HFReader(hf_dir)
    to = resolve_dtype(dtype) or reader.dtype(reader.names()[0])
    meta = {
        "format_version": FORMAT_VERSION, "model_type": model_type or arch.name, "architecture": arch.hf_class,
        "hf_config": cfg, "dtype": dtype_name(to), "tp": tp, "pp": pp, "layers_per_stage": counts,
        "vocab_size": shape.vocab, "padded_vocab_size": padded,
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by, "naming": naming,
        "tied_embeddings": shape.tied, "ep": ep,
    }
    args = megatron_args_namespace(meta)
    stages = [stage_entries(shape, counts, p, naming, ep=ep, ep_rank=None) for p in range(pp)]  # every ep rank's
    check_shapes(reader, {n: hf_shape(n, shape) for es in stages for e in es for n in e.hf_names}, shape)
    shapes = [[rank_shape(e, reader.shape(e.hf_names[0]), shape, tp, padded) for e in es] for es in stages]
    total = tp * sum(torch.Size(s).numel() * to.itemsize * (ep if e.ep_rank is None else 1)
                     for es, ss in zip(stages, shapes) for e, s in zip(es, ss))
    bar = Progress(total, f"HF -> Megatron tp{tp} pp{pp}", progress)
    with atomic_dir(out_dir, overwrite, inputs=[hf_dir], need=total + (1 << 20), flag="--megatron_output_dir") as tmp:
        for p, entries in enumerate(stages):
            # A stage's tp rank files are written side by side: each HF tensor is read once, whole and
            # sequentially, then cut into its tp parts (layout.shard); a stage's files close when it is done.
            files: list[StreamingTorchFile] = []  # [ep rank * tp + tp rank]
            try:
                for r in range(ep):
                    held = [(i, e, s) for i, (e, s) in enumerate(zip(entries, shapes[p])) if e.ep_rank in (None, r)]
                    skeleton = {"model": {e.name: Pending(str(i), s, to) for i, e, s in held},
                                "checkpoint_version": 3.0, "iteration": 0, "args": args}
                    for t in range(tp):
                        path = rank_file(tmp, "release", t, p, pp, r, ep)
                        path.parent.mkdir(parents=True)
                        files.append(StreamingTorchFile(path, {**skeleton, RANK_KEY: rank_record(tp, t, pp, p, ep, r)}))
                # One buffer, sized for the stage's largest entry, takes every entry's parts in turn
                # (plan.parts_into): reused memory needs no fresh page faults, each byte is copied once on the way in.
                src = [reader.dtype(e.hf_names[0]) for e in entries]
                buf = torch.empty(max(tp * math.prod(s) * d.itemsize for s, d in zip(shapes[p], src)),
                                  dtype=torch.uint8)
                for i, e in enumerate(entries):
                    parts = parts_into(e, reader, shape, tp, padded, buf, src[i])
                    for t, part in enumerate(parts):
                        out = part.to(to)  # a copy only when converting dtypes
                        if not allow_nonfinite and not all_finite(out):
                            raise nonfinite_error(hf_dir, e.hf_names, reader, to)
                        for r in ([e.ep_rank] if e.ep_rank is not None else range(ep)):  # experts: one ep rank
                            files[r * tp + t].write(str(i), out)
                            bar.update(part.numel() * to.itemsize)
                    del parts
                del buf
                for f in files:
                    f.close()
            except BaseException:
                for f in files:  # close torch's zip writers now: finalising later on a failed file aborts
                    f.abort()
                raise
        bar.close()
        reader.release()
        write_meta(tmp, meta)
        copy_aux_files(hf_dir, tmp)
        write_megatron_args(tmp, meta, "torch", final_dir=out_dir)
        write_latest(tmp, "release")  # last: a reader never sees a tracker pointing at missing files
    return out_dir


def megatron_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    iteration: int | str | None = None,
    max_shard_size: int = 5 * 10**9,
    overwrite: bool = False,
    progress: bool = False,
    allow_nonfinite: bool = False,
) -> Path:
    """Megatron legacy dir -> HF dir (default CKPT_DIR/{model_type}-hf). A NaN/Inf tensor is refused unless
    allow_nonfinite; too little free space is refused before anything is written."""
    ckpt_dir = Path(ckpt_dir)
    reader = MegatronReader(ckpt_dir, iteration)
    meta, shape = reader.meta, reader.dims
    out_dir = Path(out_dir) if out_dir is not None else ckpt_dir / f"{meta['model_type']}-hf"
    to = reader.dtype()
    names = [n for p in range(meta["pp"])
             for e in stage_entries(shape, meta["layers_per_stage"], p, meta["naming"], ep=reader.ep, ep_rank=None)
             if not is_tied_copy(e)
             for n in e.hf_names]
    specs = [(n, hf_shape(n, shape), to) for n in names]
    total = sum(torch.Size(s).numel() * to.itemsize for _, s, _ in specs)
    bar = Progress(total, "Megatron -> HF", progress)
    with atomic_dir(out_dir, overwrite, inputs=[ckpt_dir], need=total + (1 << 20), flag="--hf_output_dir") as tmp:
        writer = HFWriter(tmp, specs, max_shard_size)
        try:
            _pipeline(reader, writer, specs, to, bar, allow_nonfinite)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        bar.close()
        reader.release()
        cfg = dict(meta["hf_config"])
        for key in ("torch_dtype", "dtype"):  # record the dtype the weights are now in
            if key in cfg or key == "torch_dtype":
                cfg[key] = dtype_name(to)
        write_json_atomic(tmp / HF_CONFIG, cfg)
        copy_aux_files(ckpt_dir, tmp, [f for f in AUX_FILES if f != HF_CONFIG])
    return out_dir


def _pipeline(reader: MegatronReader, writer: HFWriter, specs: list, to: torch.dtype, bar: Progress,
              allow_nonfinite: bool) -> None:
    """A two-stage pipeline over a ring of buffers: this thread reads row chunks straight from the rank files
    (MegatronReader.read_into), a writer thread appends them to the shards, so disk reads and writes overlap (each
    byte is copied once each way; memory is the ring, whatever the tensor sizes)."""
    ring = torch.empty(RING_SLOTS, SLOT_BYTES, dtype=torch.uint8)
    pending: list[Future | None] = [None] * RING_SLOTS
    k = 0
    with ThreadPoolExecutor(1, thread_name_prefix="hf-writer") as pool:
        for n, s, _ in specs:
            rows, row = (s[0], math.prod(s[1:]) * to.itemsize) if s else (1, to.itemsize)
            assert row <= SLOT_BYTES, f"{n}: a row of {row} bytes exceeds the {SLOT_BYTES}-byte buffer slot"
            step = SLOT_BYTES // row
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                if pending[k] is not None:
                    pending[k].result()  # the slot's previous chunk is on disk (re-raises a write error)
                chunk = ring[k, :(r1 - r0) * row].view(to)
                chunk = chunk.view(r1 - r0, *s[1:]) if s else chunk[0]
                reader.read_into(n, chunk, r0, r1)
                if not allow_nonfinite and not all_finite(chunk):
                    raise ConvertError(f"{reader.dir}: tensor {n!r} (rows {r0}..{r1 - 1}) holds NaN or Inf "
                                       f"values; training diverged or the checkpoint is damaged: export an "
                                       f"earlier iteration, or pass --allow_nonfinite true to export it anyway")
                pending[k] = pool.submit(writer.write, n, chunk)
                bar.update((r1 - r0) * row)
                k = (k + 1) % RING_SLOTS
        for f in pending:
            if f is not None:
                f.result()
