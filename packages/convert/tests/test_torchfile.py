"""The streamed rank-file writer produces what torch.save would: same object back from torch.load(weights_only)."""

from __future__ import annotations

import argparse

import torch
from megatune.convert.torchfile import Pending, StreamingTorchFile


def test_streamed_file_loads_like_torch_save(tmp_path):
    tensors = {"a": torch.randn(3, 4).bfloat16(), "b": torch.arange(10.0)[2:7], "c": torch.ones(2, 2, dtype=torch.half)}
    skeleton = {"model": {k: Pending(k, tuple(v.shape), v.dtype) for k, v in tensors.items()},
                "checkpoint_version": 3.0, "iteration": 7, "args": argparse.Namespace(tp=2, name="x", r=None)}
    with StreamingTorchFile(tmp_path / "s.pt", skeleton) as f:
        for k in ("c", "a", "b"):  # any order
            f.write(k, tensors[k])
    ref = {"model": tensors, "checkpoint_version": 3.0, "iteration": 7, "args": skeleton["args"]}
    torch.save(ref, tmp_path / "r.pt")
    for mmap in (False, True):
        with torch.serialization.safe_globals([argparse.Namespace]):  # the allow-list megatron_io registers
            got = torch.load(tmp_path / "s.pt", weights_only=True, mmap=mmap)
        want = torch.load(tmp_path / "r.pt", weights_only=False)
        assert got.keys() == want.keys() and got["args"] == want["args"] and got["iteration"] == 7
        for k, v in want["model"].items():
            assert got["model"][k].dtype == v.dtype and torch.equal(got["model"][k], v)
