"""Reference paths the tests compare the streaming code against, and an in-memory Reader.

The reference builds the full tensor (merge the HF pieces), then shards it; the streaming paths (plan.rank_part,
plan.parts_into, MegatronReader.read_into) never build it. Both derive from the split kinds' and merges' rules
(splits.py); independent checks of those rules against megatron-core live in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from megatune.convert.families import Shape
from megatune.convert.plan import Entry, sizes
from megatune.convert.splits import merge_pieces, shard, split_full, unshard


class DictReader:
    """A Reader (plan.IntoReader) over in-memory tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        t = self.tensors[name]
        return t if start is None else t.narrow(dim, start, stop - start)

    def read_rows_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.tensors[name][start:stop])

    def read_cols_into(self, name: str, outs: list[torch.Tensor]) -> None:
        for o, t in zip(outs, torch.chunk(self.tensors[name], len(outs), dim=1)):
            o.copy_(t)


def hf_to_full(entry: Entry, tensors: Sequence[torch.Tensor], shape: Shape) -> torch.Tensor:
    """The entry's HF tensors -> its full (TP=1) Megatron tensor."""
    return merge_pieces(entry.param.fmt, list(tensors), sizes(shape, 1, None))


def full_to_hf(entry: Entry, full: torch.Tensor, shape: Shape) -> dict[str, torch.Tensor]:
    return dict(zip(entry.hf_names, split_full(entry.param.fmt, full, entry.hf_shapes, sizes(shape, 1, None))))


def reference_parts(entry: Entry, hf: dict[str, torch.Tensor], shape: Shape, tp: int,
                    padded_vocab: int) -> list[torch.Tensor]:
    """shard(kind, hf_to_full(...)): every rank's part, by way of the full tensor."""
    full = hf_to_full(entry, [hf[n] for n in entry.hf_names], shape)
    return shard(entry.param.kind, full, tp, padded_vocab=padded_vocab)


def reshard(kind: str, parts: list[torch.Tensor], tp: int, *, vocab_size: int | None = None,
            padded_vocab: int | None = None) -> list[torch.Tensor]:
    """tp=len(parts) -> tp parts (vocab padding is recomputed for the new tp by the caller's padded_vocab)."""
    return shard(kind, unshard(kind, parts, vocab_size=vocab_size), tp, padded_vocab=padded_vocab)
