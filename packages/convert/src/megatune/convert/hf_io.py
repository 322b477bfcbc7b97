"""Hugging Face safetensors checkpoints: a slice reader and a streaming sharded writer.

Memory: the reader copies only the requested slice out of safetensors' mmap, and drops its file handles every
`release_bytes` so the touched mmap pages leave the process (they count in RSS while mapped). The writer knows
every name/shape/dtype up front, writes each shard's header first, then each tensor's bytes as it arrives.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from megatune.convert.errors import ConvertError

INDEX = "model.safetensors.index.json"
# Files copied along with the weights (config, generation config, tokenizer and chat template).
AUX_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def read_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConvertError(f"{path}: not found; --model_id_or_path must be a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: invalid JSON ({e}); re-download the model") from None


class HFReader:
    """Reader (see plan.Reader) over a directory of safetensors shards."""

    def __init__(self, hf_dir: str | Path, release_bytes: int = 512 << 20):
        self.dir = Path(hf_dir)
        self.release_bytes = release_bytes
        self._handles: dict[str, object] = {}
        self._since_release = 0
        self.bytes_read = 0
        index = self.dir / INDEX
        if index.is_file():
            try:
                self.files = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError) as e:
                raise ConvertError(f"{index}: invalid index ({e}); re-download the model") from None
        else:
            self.files = {}
            shards = sorted(self.dir.glob("*.safetensors"))
            if not shards:
                raise ConvertError(f"{self.dir}: no *.safetensors files (and no {INDEX}); "
                                   f"convert .bin weights to safetensors first")
            for shard in shards:
                for name in self._open(shard.name).keys():
                    self.files[name] = shard.name
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}

    def _open(self, file: str):
        if file not in self._handles:
            path = self.dir / file
            if not path.is_file():
                raise ConvertError(f"{path}: missing safetensors shard (listed in {INDEX}); re-download the model")
            try:
                self._handles[file] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ConvertError(f"{path}: corrupt safetensors file ({e}); re-download the model") from None
        return self._handles[file]

    def _slice(self, name: str):
        if name not in self.files:
            raise ConvertError(f"{self.dir}: tensor {name!r} not found in the checkpoint; is config.json's "
                               f"architecture right for these weights?")
        try:
            return self._open(self.files[name]).get_slice(name)
        except SafetensorError as e:
            raise ConvertError(f"{self.dir / self.files[name]}: cannot read tensor {name!r} ({e}); "
                               f"re-download the model") from None

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            sl = self._slice(name)
            self._shapes[name] = tuple(sl.get_shape())
            self._dtypes[name] = DTYPES[sl.get_dtype()]
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        self.shape(name)
        return self._dtypes[name]

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        sl = self._slice(name)
        try:
            if start is None:
                t = sl[:]
            elif dim == 0:
                t = sl[start:stop]
            else:
                t = sl[:, start:stop]
        except Exception as e:  # safetensors raises plain errors on truncated data
            raise ConvertError(f"{self.dir / self.files[name]}: cannot read tensor {name!r} ({e}); "
                               f"re-download the model") from None
        self.bytes_read += t.numel() * t.element_size()
        self._since_release += t.numel() * t.element_size()
        if self._since_release >= self.release_bytes:
            self.release()
        return t

    def release(self) -> None:
        """Close every handle: unmaps the files so pages already read stop counting in this process's RSS."""
        self._handles.clear()
        self._since_release = 0


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
    """Streams tensors, in the planned order, into model.safetensors or model-XXXXX-of-YYYYY.safetensors + index."""

    def __init__(self, out_dir: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int):
        self.dir = Path(out_dir)
        self.specs = specs
        self.shards = plan_shards(specs, max_shard_size)
        n = len(self.shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._next = 0  # index into specs of the next tensor expected
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
        self._f = open(self.dir / self.files[s], "wb")  # noqa: SIM115 - closed in _start_shard/close
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._shard = s

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, shape, dtype = self.specs[self._next]
        assert name == want and tuple(tensor.shape) == shape and tensor.dtype == dtype, \
            f"expected {want} {shape} {dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
        shard = next(s for s, idx in enumerate(self.shards) if self._next in idx)
        if shard != self._shard:
            self._start_shard(shard)
        self._f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        assert self._next == len(self.specs), f"only {self._next} of {len(self.specs)} tensors written"
        if self._f:
            self._f.close()
        if len(self.files) > 1:
            total = sum(math.prod(s) * d.itemsize for _, s, d in self.specs)
            weight_map = {self.specs[i][0]: self.files[s] for s, idx in enumerate(self.shards) for i in idx}
            (self.dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2) + "\n")


def copy_aux_files(src: Path, dst: Path, names: Iterable[str] = AUX_FILES) -> list[str]:
    copied = []
    for name in names:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
