"""A Reader (plan.Reader) that serves *HF-named full tensors* out of a Megatron legacy checkpoint.

Re-sharding tp=a -> tp=b and exporting to HF both reduce to "read the HF tensor, cut the target part", so the same
`rank_part` code serves every direction. The rank files are read record by record with positional reads, not
through torch.load's mmap: the pickle is loaded on the meta device (shapes, dtypes, file offsets, no data), then
each HF tensor is assembled straight from its rows in the rank files (plan.part_row_ranges) into the caller's
buffer (`read_into`). Nothing stays mapped, no page-fault storm, and consumed pages leave the page cache.
With expert parallelism a routed expert's tensors are read from the ep rank that holds it, every other tensor
from ep rank 0 (all ep ranks hold the same copy).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from megatune.convert.ckpt_layout import (
    META,
    RANK_DIR_GLOB,
    TRACKER,
    load_rank_file,
    rank_file,
    rank_record,
    read_latest,
    read_meta,
)
from megatune.convert.errors import ConvertError
from megatune.convert.families import EMBEDDING, Shape, shape_of
from megatune.convert.fileio import IOV_MAX, as_bytes, drop_cache, preadv_full
from megatune.convert.plan import Entry, hf_shape, is_tied_copy, part_row_ranges, rank_shape, stage_entries


class MegatronReader:
    def __init__(self, ckpt_dir: str | Path, iteration: int | str | None = None, meta: dict | None = None):
        # (ep rank, tp rank) -> (path, fd, meta-device model) of the open stage's rank files
        self._files: dict[tuple[int, int], tuple[Path, int, dict[str, torch.Tensor]]] = {}
        self.dir = Path(ckpt_dir)
        self.meta = meta or read_meta(self.dir)
        self.iteration = read_latest(self.dir) if iteration is None else iteration
        self.dims: Shape = shape_of(self.meta["hf_config"], where=str(self.dir / META))
        self.tp, self.pp, self.ep = self.meta["tp"], self.meta["pp"], self.meta.get("ep", 1)
        self.counts = list(self.meta["layers_per_stage"])
        self.padded = self.meta["padded_vocab_size"]
        self.where: dict[str, tuple[int, Entry]] = {}  # hf name -> (stage, entry)
        for stage in range(self.pp):
            for e in stage_entries(self.dims, self.counts, stage, self.meta["naming"], ep=self.ep, ep_rank=None):
                if not is_tied_copy(e):
                    for n in e.hf_names:
                        self.where[n] = (stage, e)
        self._stage: int | None = None
        self._cache: tuple[str, torch.Tensor] | None = None  # read(): the last HF tensor, for repeated slices
        self._dtype: torch.dtype | None = None
        self._check_rank_dirs()

    def _check_rank_dirs(self) -> None:
        it_dir = rank_file(self.dir, self.iteration, 0, 0, self.pp).parent.parent
        if not it_dir.is_dir():
            raise ConvertError(f"{it_dir}: not found (named by {self.dir}/{TRACKER})")
        found = sorted(p.name for p in it_dir.glob(RANK_DIR_GLOB))
        want = sorted(rank_file(self.dir, self.iteration, t, p, self.pp, e, self.ep).parent.name
                      for t in range(self.tp) for p in range(self.pp) for e in range(self.ep))
        if found != want:
            raise ConvertError(f"{it_dir}: holds {len(found)} rank dirs ({', '.join(found[:4])}...) but "
                               f"{META} says tp={self.tp}, pp={self.pp}, ep={self.ep} ({len(want)} ranks); "
                               f"the checkpoint and its megatune.json disagree")

    def _checked(self, model: dict, entry: Entry, path: Path, want: tuple[int, ...]) -> torch.Tensor:
        if entry.name not in model:
            raise ConvertError(f"{path}: tensor {entry.name!r} missing; was the checkpoint written for another "
                               f"architecture or layer-spec naming (megatune.json naming={self.meta['naming']!r})?")
        part = model[entry.name]
        if tuple(part.shape) != want:
            raise ConvertError(f"{path}: tensor {entry.name!r} has shape {tuple(part.shape)}, expected {want} for "
                               f"tp={self.tp}; the rank files were written with a different tensor-parallel size "
                               f"than megatune.json says")
        return part

    def names(self) -> list[str]:
        return list(self.where)

    def _open_stage(self, stage: int) -> None:
        """Open every (ep, tp) rank file of the stage: expert tensors come from their ep rank, the rest from 0."""
        self.release()
        for e in range(self.ep):
            for t in range(self.tp):
                path = rank_file(self.dir, self.iteration, t, stage, self.pp, e, self.ep)
                rank = rank_record(self.tp, t, self.pp, stage, self.ep, e)
                model = load_rank_file(path, meta=True, rank=rank)["model"]
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger read-ahead: records are read in order
                self._files[e, t] = (path, fd, model)
        self._stage = stage

    def dtype(self) -> torch.dtype:
        """The stored dtype (read from rank 0's embedding header; no data is touched)."""
        if self._dtype is None:
            model = load_rank_file(rank_file(self.dir, self.iteration, 0, 0, self.pp, 0, self.ep), meta=True)["model"]
            self._dtype = model[EMBEDDING.local].dtype
        return self._dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return hf_shape(name, self.dims)

    def read_into(self, hf_name: str, out: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Fill `out` (contiguous, the stored dtype) with rows [start, stop) of HF tensor `hf_name` (default: all),
        read directly from the rank files where plan.part_row_ranges puts them: dim-0 row ranges, or for a kind
        split along dim 1 a preadv scatter of each part's rows into their column block of every HF row."""
        if hf_name not in self.where:
            raise ConvertError(f"{self.dir}: no Megatron parameter maps to HF tensor {hf_name!r}")
        stage, entry = self.where[hf_name]
        if stage != self._stage:
            self._open_stage(stage)
        e = entry.ep_rank or 0
        want = rank_shape(entry, entry.hf_shapes[0], self.dims, self.tp, self.padded)
        files = [self._files[e, t] for t in range(self.tp)]
        parts = [self._checked(model, entry, path, want) for path, _, model in files]
        full = self.shape(hf_name)
        stop = full[0] if stop is None else stop
        assert out.is_contiguous() and tuple(out.shape) == (stop - start, *full[1:]), hf_name
        if parts[0].dtype != out.dtype:
            raise ConvertError(f"{files[0][0]}: tensor {entry.name!r} is {parts[0].dtype}, expected "
                               f"{out.dtype} like the embedding; mixed-dtype checkpoints are not supported")
        dst, size = as_bytes(out), out.element_size()
        ranges = part_row_ranges(entry, hf_name, self.dims, self.tp, self.padded)
        if entry.param.kind.dim == 1:  # HF row r = [part_0 row r, part_1 row r, ...] (column blocks in HF order)
            row, col = full[1] * size, 0
            for t, a, b in ranges:
                assert (a, b) == (0, want[1]), (entry.name, ranges)  # whole part rows: contiguous in the file
                piece = (b - a) * size
                for r0 in range(start, stop, IOV_MAX):
                    iov = [dst[(r - start) * row + col:(r - start) * row + col + piece]
                           for r in range(r0, min(stop, r0 + IOV_MAX))]
                    self._read(files[t], parts[t], r0 * piece, iov)
                col += piece
            return out
        row = math.prod(full[1:]) * size
        at, hf_row = 0, 0  # bytes filled; HF row at the start of the current range
        for t, a, b in ranges:
            lo, hi = max(start, hf_row), min(stop, hf_row + b - a)  # this range clipped to [start, stop)
            if lo < hi:
                self._read(files[t], parts[t], (a + lo - hf_row) * row, [dst[at:at + (hi - lo) * row]])
                at += (hi - lo) * row
            hf_row += b - a
        assert at == len(dst), (hf_name, at, len(dst))
        return out

    @staticmethod
    def _read(file: tuple[Path, int, dict], part: torch.Tensor, start: int, iov: list[memoryview]) -> None:
        """Bytes [start, start + len(iov)) of a rank file's stored `part` (a meta tensor) into the iov buffers."""
        path, fd, _ = file
        if not part.is_contiguous():
            raise ConvertError(f"{path}: a non-contiguous tensor of shape {tuple(part.shape)} is stored; "
                               f"re-save the checkpoint with contiguous parameters")
        offset = part.untyped_storage()._checkpoint_offset + part.storage_offset() * part.element_size() + start
        n = sum(len(v) for v in iov)
        if preadv_full(fd, iov, offset) != n:
            raise ConvertError(f"{path}: truncated (a record ends past the end of the file); the file is corrupt")
        drop_cache(fd, offset, n)  # read once: let the pages go rather than grow the page cache

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """A fresh tensor (the API path); the last tensor is kept so that rank_part's repeated slices read once."""
        if self._cache is None or self._cache[0] != name:
            self._cache = None
            self._cache = (name, self.read_into(name, torch.empty(self.shape(name), dtype=self.dtype())))
        t = self._cache[1]
        return t if start is None else t.narrow(dim, start, stop - start)

    def release(self) -> None:
        for _, fd, _ in self._files.values():
            os.close(fd)
        self._files, self._stage, self._cache = {}, None, None

    def __del__(self) -> None:
        self.release()
