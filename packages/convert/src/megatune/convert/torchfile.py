"""Stream a `torch.save`-format file one tensor at a time, so writing a rank file never holds the whole file.

torch.save pickles the object (tensors appear as references to storages `data/<key>`) into `data.pkl`, then
writes each storage as its own zip record. We pickle a skeleton whose tensors are `Pending(shape, dtype)`
placeholders, reduced exactly as torch reduces a contiguous CPU tensor (`torch._utils._rebuild_tensor_v2` over a
typed storage), then append each storage record as the tensor is produced. The result loads with plain
`torch.load(..., weights_only=True, mmap=True)`; test_torchfile.py checks it against torch.save.
"""

from __future__ import annotations

import io
import math
import pickle
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatune.convert.fileio import SequentialWriter
from torch.serialization import _get_storage_alignment


@dataclass(frozen=True)
class Pending:
    """Where a tensor of this shape and dtype will be written later, as storage record `key`."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: torch.dtype
    numel: int


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


class _SkeletonPickler(pickle.Pickler):
    def persistent_id(self, obj: Any):
        if isinstance(obj, _StorageRef):  # same tuple torch.save emits for a TypedStorage
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj: Any):
        if isinstance(obj, Pending):
            ref = _StorageRef(obj.key, obj.dtype, math.prod(obj.shape))
            args = (ref, 0, torch.Size(obj.shape), _contiguous_stride(obj.shape), False, OrderedDict())
            return torch._utils._rebuild_tensor_v2, args
        if isinstance(obj, torch.Tensor):
            raise TypeError("skeleton must hold Pending placeholders, not tensors")
        return NotImplemented


class StreamingTorchFile:
    """`with StreamingTorchFile(path, skeleton) as f: f.write(key, tensor)` for every Pending in the skeleton."""

    def __init__(self, path: str | Path, skeleton: Any):
        self.path = Path(path)
        buf = io.BytesIO()
        _SkeletonPickler(buf, protocol=2).dump(skeleton)
        self._expected = {p.key: p for p in _pendings(skeleton)}
        self._written: set[str] = set()
        # The writer's file-object overload (what torch.save uses for buffers) emits the same bytes as its
        # file-name one; it lets SequentialWriter keep written data from piling up in the page cache.
        # No CRC32: it costs a CPU pass over every byte and torch.load does not need it.
        self._out = SequentialWriter(self.path)
        self._zip = torch._C.PyTorchFileWriter(self._out, False, _get_storage_alignment())
        data = buf.getvalue()
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record(".format_version", "1", 1)
        alignment = str(_get_storage_alignment())
        self._zip.write_record(".storage_alignment", alignment, len(alignment))
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))

    def write(self, key: str, tensor: torch.Tensor) -> None:
        p = self._expected[key]
        assert tuple(tensor.shape) == p.shape and tensor.dtype == p.dtype, \
            f"{self.path}: {key} expected {p.shape} {p.dtype}, got {tuple(tensor.shape)} {tensor.dtype}"
        assert key not in self._written, key
        t = tensor.contiguous()
        # a TP part is often a view into the full tensor: write just its bytes, through a storage slice that
        # shares memory (no copy; torch deprecates passing a raw data pointer)
        start = t.storage_offset() * t.element_size()
        storage = t.untyped_storage()[start:start + t.numel() * t.element_size()]
        self._zip.write_record(f"data/{key}", storage, storage.nbytes())
        self._written.add(key)

    def close(self) -> None:
        missing = set(self._expected) - self._written
        assert not missing, f"{self.path}: tensors never written: {sorted(missing)[:5]}"
        self._zip.write_end_of_file()
        self._out.close()

    def __enter__(self) -> StreamingTorchFile:
        return self

    def abort(self) -> None:
        """After an error: finalise torch's zip writer into the void and close the file (the caller removes it).
        Without this the writer's destructor finalises on its own, hits the failed file and aborts the process."""
        self._out.abandon()
        try:
            self._zip.write_end_of_file()
        except RuntimeError:
            pass

    def __exit__(self, exc_type, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _pendings(obj: Any):
    if isinstance(obj, Pending):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _pendings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _pendings(v)
