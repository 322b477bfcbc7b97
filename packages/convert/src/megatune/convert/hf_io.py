"""Hugging Face safetensors checkpoints: a slice reader and a streaming sharded writer.

Memory: the reader reads each requested slice with positional reads (no mmap) into a fresh tensor or the caller's
buffer, so RSS is only what the caller holds. The writer knows every name/shape/dtype up front, writes each shard's
header first, then each tensor's bytes as they arrive (a tensor may arrive in dim-0 pieces, e.g. one per TP rank).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from megatune.convert.arch import Shape
from megatune.convert.ckpt_layout import AUX_FILES, HF_CONFIG, copy_aux_files, write_json_atomic
from megatune.convert.errors import ConvertError
from megatune.convert.fileio import IOV_MAX, SequentialWriter, as_bytes, preadv_full, read_into

INDEX = "model.safetensors.index.json"
__all__ = ["AUX_FILES", "copy_aux_files", "HFReader", "HFWriter", "read_config", "read_header", "INDEX"]
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def read_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / HF_CONFIG
    if not path.is_file():
        raise ConvertError(f"{path}: not found; --model_id_or_path must be a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: invalid JSON ({e}); re-download the model") from None


def read_header(path: Path) -> tuple[int, dict]:
    """(data start offset, header) of a safetensors file, validated against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > 100 << 20:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"truncated: tensors end at byte {8 + n + end}, file has {size}")
        return 8 + n, header
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing safetensors shard; re-download the model") from None
    except (ValueError, KeyError, TypeError, struct.error) as e:  # JSONDecodeError is a ValueError
        raise ConvertError(f"{path}: corrupt safetensors file ({e}); re-download the model") from None


class HFReader:
    """Reader (see plan.Reader) over a directory of safetensors shards.

    Reads with positional reads rather than through an mmap: no page-fault cost per 4 KiB, nothing stays mapped,
    so RSS is just the tensors the caller holds. `read_rows_into` / `read_cols_into` fill the caller's (reused)
    buffers, which also saves the first-touch page faults of a fresh tensor per read."""

    def __init__(self, hf_dir: str | Path):
        self._fds: dict[Path, int] = {}  # shard file descriptors, kept open between reads
        self.dir = Path(hf_dir)
        self.bytes_read = 0
        self._headers: dict[str, tuple[int, dict]] = {}
        index = self.dir / INDEX
        if index.is_file():
            try:
                self.files = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConvertError(f"{index}: invalid index ({e}); re-download the model") from None
        else:
            shards = sorted(self.dir.glob("*.safetensors"))
            if not shards:
                raise ConvertError(f"{self.dir}: no *.safetensors files (and no {INDEX}); "
                                   f"convert .bin weights to safetensors first")
            self.files = {k: s.name for s in shards for k in self._header(s.name)[1] if k != "__metadata__"}

    def _header(self, file: str) -> tuple[int, dict]:
        if file not in self._headers:
            self._headers[file] = read_header(self.dir / file)
        return self._headers[file]

    def _info(self, name: str) -> tuple[Path, int, dict]:
        if name not in self.files:
            raise ConvertError(f"{self.dir}: tensor {name!r} not found in the checkpoint; is config.json's "
                               f"architecture right for these weights?")
        start, header = self._header(self.files[name])
        if name not in header:
            raise ConvertError(f"{self.dir / self.files[name]}: tensor {name!r} listed in {INDEX} but absent "
                               f"from the shard; re-download the model")
        return self.dir / self.files[name], start, header[name]

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)[2]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        path, _, info = self._info(name)
        if info["dtype"] not in DTYPES:
            raise ConvertError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        return DTYPES[info["dtype"]]

    def _span(self, name: str) -> tuple[int, int, list[int], torch.dtype, int]:
        """(fd, file offset of the data, shape, dtype, bytes per dim-0 row) of a validated tensor."""
        path, data_start, info = self._info(name)
        shape, dtype = list(info["shape"]), self.dtype(name)
        begin, end = info["data_offsets"]
        if math.prod(shape) * dtype.itemsize != end - begin:
            raise ConvertError(f"{path}: tensor {name!r}: {end - begin} bytes for shape {shape} {info['dtype']}; "
                               f"corrupt file, re-download the model")
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
            os.posix_fadvise(self._fds[path], 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger read-ahead when cold
        row = math.prod(shape[1:]) * dtype.itemsize if shape else dtype.itemsize
        return self._fds[path], data_start + begin, shape, dtype, row

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """A fresh tensor (the API path); a dim-0 slice reads only its rows."""
        shape, dtype = self._span(name)[2:4]
        if start is not None and dim == 0:  # rows are contiguous: read just them
            out = torch.empty([stop - start, *shape[1:]], dtype=dtype)
            return self.read_rows_into(name, start, stop, out)
        out = self.read_rows_into(name, 0, shape[0] if shape else 1, torch.empty(shape, dtype=dtype))
        return out if start is None else out.narrow(dim, start, stop - start)

    def read_rows_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [start, stop) of dim 0 straight into `out` (contiguous, same dtype): one positional read."""
        fd, offset, shape, dtype, row = self._span(name)
        if not (out.is_contiguous() and out.dtype == dtype and out.numel() * dtype.itemsize == (stop - start) * row):
            raise ConvertError(f"{self.dir / self.files[name]}: tensor {name!r} is stored as {shape} {dtype}, which "
                               f"does not fit the {list(out.shape)} {out.dtype} rows [{start}, {stop}) that "
                               f"config.json implies; the file header was changed: re-download the model")
        if out.numel():
            if read_into(fd, offset + start * row, as_bytes(out)) != (stop - start) * row:
                raise ConvertError(f"{self.dir / self.files[name]}: tensor {name!r} truncated; re-download the model")
            self.bytes_read += (stop - start) * row
        return out

    def read_cols_into(self, name: str, outs: list[torch.Tensor]) -> None:
        """Split every row of a 2-D tensor into len(outs) equal column blocks, block t into outs[t]: the file is read
        sequentially, scattered by preadv (up to IOV_MAX row pieces per call), so no gather copy is needed."""
        fd, offset, shape, dtype, row = self._span(name)
        piece = row // len(outs)
        assert all(o.is_contiguous() and o.dtype == dtype and o.numel() * dtype.itemsize == shape[0] * piece
                   for o in outs)
        views = [as_bytes(o) for o in outs]
        step = max(1, IOV_MAX // len(outs))
        for r0 in range(0, shape[0], step):
            iov = [v[r * piece:(r + 1) * piece] for r in range(r0, min(shape[0], r0 + step)) for v in views]
            if preadv_full(fd, iov, offset + r0 * row) != len(iov) * piece:
                raise ConvertError(f"{self.dir / self.files[name]}: tensor {name!r} truncated; re-download the model")
        self.bytes_read += shape[0] * row

    def release(self) -> None:
        """Close the shard files (reopened on the next read)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.release()


def config_dims(dims: Shape) -> dict[str, int]:
    """config.json keys (or products of them) and the tensor dimensions they fix, for naming a mismatch."""
    return {"hidden_size": dims.hidden, "intermediate_size": dims.ffn, "vocab_size": dims.vocab,
            "head_dim": dims.head_dim, "num_attention_heads x head_dim": dims.heads * dims.head_dim,
            "num_key_value_heads x head_dim": dims.groups * dims.head_dim}


def check_shapes(reader: HFReader, want: dict[str, tuple[int, ...]], dims: Shape) -> None:
    """Every stored tensor's shape against the shape config.json implies (`want`): one line naming the tensor, its
    file and the config key, before anything is written."""
    for name, shape in want.items():
        got = reader.shape(name)
        if tuple(got) == tuple(shape):
            continue
        keys = ""
        if len(got) == len(shape):
            i = next(i for i, (a, b) in enumerate(zip(got, shape)) if a != b)
            named = [k for k, v in config_dims(dims).items() if v == shape[i]]
            keys = f" (dim {i}: {shape[i]} from {' / '.join(named) or 'the config'})"
        raise ConvertError(f"{reader.dir / reader.files[name]}: tensor {name!r} has shape {list(got)}, but "
                           f"{reader.dir / HF_CONFIG} implies {list(shape)}{keys}; config.json does not match the "
                           f"weights: fix config.json or re-download the model")


def plan_shards(specs: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int) -> list[list[int]]:
    """Group tensor indices into shards of at most max_shard_size bytes (a larger tensor gets a shard alone)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(specs):
        n = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


class HFWriter:
    """Streams tensors, in the planned order, into model.safetensors or model-0000i-of-0000n.safetensors + index."""

    def __init__(self, out_dir: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int,
                 keep_cache: bool = False):
        self.dir = Path(out_dir)
        self.keep_cache = keep_cache  # False: written shards leave the page cache (fileio.SequentialWriter)
        self.specs = specs
        self.shards = plan_shards(specs, max_shard_size)
        n = len(self.shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._next = 0  # index into specs of the next tensor expected
        self._rows = 0  # rows of it written so far
        self._shard = -1
        self._f = None

    def _start_shard(self, s: int) -> None:
        if self._f:
            self._f.close()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for i in self.shards[s]:
            name, shape, dtype = self.specs[i]
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
        self._f = SequentialWriter(self.dir / self.files[s], self.keep_cache)  # closed in _start_shard/close
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._shard = s

    def write(self, name: str, *pieces: torch.Tensor) -> None:
        """Write tensor `name`, given whole or as consecutive dim-0 pieces (concatenated on disk, never in memory).
        Pieces may also come over several calls (the Megatron -> HF pipeline writes row chunks as they are read)."""
        want, shape, dtype = self.specs[self._next]
        for p in pieces:
            assert name == want and p.dtype == dtype and tuple(p.shape[1:]) == shape[1:] and \
                (p.dim() or not shape), f"expected {want} {shape} {dtype}, got {name} {tuple(p.shape)} {p.dtype}"
            shard = next(s for s, idx in enumerate(self.shards) if self._next in idx)
            if shard != self._shard:
                self._start_shard(shard)
            self._f.write(p.contiguous().view(-1).view(torch.uint8).numpy().data)
            self._rows += p.shape[0] if p.dim() else 1
        assert self._rows <= (shape[0] if shape else 1), f"{name}: more rows than {shape}"
        if self._rows == (shape[0] if shape else 1):
            self._next, self._rows = self._next + 1, 0

    def abort(self) -> None:
        """After an error: close the open shard without writing more (the caller removes the directory)."""
        if self._f:
            self._f.abandon()

    def close(self) -> None:
        assert self._next == len(self.specs), f"only {self._next} of {len(self.specs)} tensors written"
        if self._f:
            self._f.close()
        if len(self.files) > 1:
            total = sum(math.prod(s) * d.itemsize for _, s, d in self.specs)
            weight_map = {self.specs[i][0]: self.files[s] for s, idx in enumerate(self.shards) for i in idx}
            write_json_atomic(self.dir / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
