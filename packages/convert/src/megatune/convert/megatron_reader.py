"""A Reader (plan.Reader) that serves *HF-named full tensors* out of a Megatron legacy checkpoint.

Re-sharding tp=a -> tp=b and exporting to HF both reduce to "read the HF tensor, cut the target part", so the same
`rank_part` / `full_to_hf` code serves every direction. One PP stage's rank files are open at a time, memory-mapped,
and re-opened every `release_bytes` so that pages already consumed leave the process's RSS.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from megatune.convert.arch import EMBEDDING, Shape, shape_of
from megatune.convert.errors import ConvertError
from megatune.convert.layout import VOCAB, unshard
from megatune.convert.megatron_io import load_rank_file, rank_file, read_latest, read_meta
from megatune.convert.plan import Entry, full_to_hf, hf_shape, is_tied_copy, rank_shape, stage_entries


class MegatronReader:
    def __init__(self, ckpt_dir: str | Path, iteration: int | str | None = None, meta: dict | None = None,
                 release_bytes: int = 512 << 20):
        self.dir = Path(ckpt_dir)
        self.meta = meta or read_meta(self.dir)
        self.iteration = read_latest(self.dir) if iteration is None else iteration
        self.dims: Shape = shape_of(self.meta["hf_config"])
        self.tp, self.pp = self.meta["tp"], self.meta["pp"]
        self.counts = list(self.meta["layers_per_stage"])
        self.padded = self.meta["padded_vocab_size"]
        self.release_bytes = release_bytes
        self.where: dict[str, tuple[int, Entry]] = {}  # hf name -> (stage, entry)
        for stage in range(self.pp):
            for e in stage_entries(self.dims, self.counts, stage, self.meta["naming"]):
                if not is_tied_copy(e):
                    for n in e.hf_names:
                        self.where[n] = (stage, e)
        self._stage: int | None = None
        self._files: list[dict[str, torch.Tensor]] = []
        self._since_load = 0
        self._cache: tuple[str, dict[str, torch.Tensor]] | None = None  # last entry's HF tensors
        self._check_rank_dirs()

    def _check_rank_dirs(self) -> None:
        it_dir = rank_file(self.dir, self.iteration, 0, 0, self.pp).parent.parent
        if not it_dir.is_dir():
            raise ConvertError(f"{it_dir}: not found (named by {self.dir}/latest_checkpointed_iteration.txt)")
        found = sorted(p.name for p in it_dir.glob("mp_rank_*"))
        want = sorted(rank_file(self.dir, self.iteration, t, p, self.pp).parent.name
                      for t in range(self.tp) for p in range(self.pp))
        if found != want:
            raise ConvertError(f"{it_dir}: holds {len(found)} rank dirs ({', '.join(found[:4])}...) but "
                               f"megatune.json says tp={self.tp}, pp={self.pp} ({len(want)} ranks); "
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
        self._files = []  # drop the old maps first so two stages are never mapped at once
        self._files = [load_rank_file(rank_file(self.dir, self.iteration, t, stage, self.pp))["model"]
                       for t in range(self.tp)]
        self._stage, self._since_load = stage, 0

    def _entry_tensors(self, hf_name: str) -> dict[str, torch.Tensor]:
        if hf_name not in self.where:
            raise ConvertError(f"{self.dir}: no Megatron parameter maps to HF tensor {hf_name!r}")
        stage, entry = self.where[hf_name]
        if self._cache and self._cache[0] == entry.name + f"@{stage}":
            return self._cache[1]
        if stage != self._stage or self._since_load >= self.release_bytes:
            self._open_stage(stage)
        parts = []
        want = rank_shape(entry, hf_shape(entry.hf_names[0], self.dims), self.dims, self.tp, self.padded)
        for t, model in enumerate(self._files):
            path = rank_file(self.dir, self.iteration, t, stage, self.pp)
            parts.append(self._checked(model, entry, path, want))
        full = unshard(entry.param.kind, parts, vocab_size=self.dims.vocab)
        tensors = full_to_hf(entry, full, self.dims)  # contiguous copies: the maps can be dropped safely
        self._since_load += sum(t.numel() * t.element_size() for t in tensors.values())
        self._cache = (entry.name + f"@{stage}", tensors)
        return tensors

    def dtype(self) -> torch.dtype:
        """The stored dtype (read from rank 0's embedding header; no data is touched)."""
        model = load_rank_file(rank_file(self.dir, self.iteration, 0, 0, self.pp))["model"]
        return model[EMBEDDING.local].dtype

    def stream(self, hf_name: str) -> Iterator[torch.Tensor]:
        """The HF tensor as consecutive dim-0 pieces. Embedding / output layer (the largest tensors) come one TP
        part at a time straight from each rank file's map, never concatenated; everything else in one piece."""
        stage, entry = self.where.get(hf_name, (None, None))
        if entry is None or entry.param.kind != VOCAB:
            yield self.read(hf_name)
            return
        self.release()
        rows = self.padded // self.tp
        want = (rows, self.dims.hidden)
        for t in range(self.tp):
            path = rank_file(self.dir, self.iteration, t, stage, self.pp)
            part = self._checked(load_rank_file(path)["model"], entry, path, want)
            keep = max(0, min(rows, self.dims.vocab - t * rows))  # strip the vocab padding
            if keep:
                yield part[:keep]
            del part  # drops this file's map before the next one is opened

    def shape(self, name: str) -> tuple[int, ...]:
        return hf_shape(name, self.dims)

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        t = self._entry_tensors(name)[name]
        return t if start is None else t.narrow(dim, start, stop - start)

    def release(self) -> None:
        self._files, self._stage, self._cache = [], None, None
