"""Megatron-style batches: DP-sharded, seeded, resumable, optionally packed.

Design choices:
- The iterator is a pure function of (dataset, seed, dp_rank, dp_size, position): every rank computes the same
  global order and takes its own slice, so no collectives are needed and TP/PP ranks of one DP group agree.
- A "unit" is one row, or with packing one packed row (a list of documents). Packing is greedy first-fit over a
  seeded shuffle of the rows, done once, so the number of units and steps per epoch are fixed and a resume
  position stays meaningful. Epoch e visits units in permutation(seed, e).
- A step consumes `micro_batch_size * num_micro_batches * dp_size` units; micro-batch m of the step is the
  contiguous block m, and rank r takes the r-th `micro_batch_size` of it (Megatron's sampler layout). A final
  partial global batch is dropped so every rank runs the same number of steps.
- Labels are shifted here, per document, so no position is trained to predict the next document's first token.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow.compute as pc
import torch

IGNORE = -100


def pack_first_fit(lengths, capacity: int, order) -> list[list[int]]:
    """Greedy first-fit of items (in `order`) into bins of `capacity` tokens; returns item indices per bin.

    A max-segment-tree over bin slots finds the leftmost bin with room in O(log n), so packing a million rows
    stays fast. Unopened slots hold full capacity, hence "leftmost fitting slot" is exactly first-fit.
    """
    n = len(order)
    size = 1 << max(0, math.ceil(math.log2(max(n, 1))))
    tree = [capacity] * (2 * size)
    bins: list[list[int]] = []
    for item in order:
        need = int(lengths[item])
        if need > capacity:
            raise ValueError(f"row {item} has {need} tokens, more than the packing capacity max_length={capacity}")
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        slot = node - size
        if slot == len(bins):
            bins.append([])
        bins[slot].append(int(item))
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


def collate(samples, *, pad_token_id: int, pad_to_multiple_of: int = 8, fixed_length: int | None = None) -> dict:
    """samples: list (one per batch row) of lists of documents (input_ids, unshifted labels) -> tensors (B, S)."""
    rows = []
    for docs in samples:
        tok, lab, pos, doc = [], [], [], []
        for k, (ids, labels) in enumerate(docs):
            tok.extend(ids)
            lab.extend(labels[1:])
            lab.append(IGNORE)  # the last position of a document has no next token of its own
            pos.extend(range(len(ids)))
            doc.extend([k] * len(ids))
        rows.append((tok, lab, pos, doc))
    longest = max(len(r[0]) for r in rows)
    if fixed_length is not None:
        if longest > fixed_length:
            raise ValueError(f"a batch row has {longest} tokens, more than fixed_length={fixed_length}")
        seq = fixed_length
    else:
        m = max(1, pad_to_multiple_of or 1)
        seq = -(-longest // m) * m
    B = len(rows)
    tokens = torch.full((B, seq), pad_token_id, dtype=torch.int64)
    labels = torch.full((B, seq), IGNORE, dtype=torch.int64)
    position_ids = torch.zeros((B, seq), dtype=torch.int64)
    document_ids = torch.full((B, seq), -1, dtype=torch.int32)
    for b, (tok, lab, pos, doc) in enumerate(rows):
        n = len(tok)
        tokens[b, :n] = torch.tensor(tok, dtype=torch.int64)
        labels[b, :n] = torch.tensor(lab, dtype=torch.int64)
        position_ids[b, :n] = torch.tensor(pos, dtype=torch.int64)
        document_ids[b, :n] = torch.tensor(doc, dtype=torch.int32)
    loss_mask = (labels != IGNORE).float()
    return {
        "tokens": tokens,  # (B, S)
        "labels": labels,  # (B, S), already shifted: target of position t
        "loss_mask": loss_mask,  # (B, S)
        "position_ids": position_ids,  # (B, S), restart at each document
        "document_ids": document_ids,  # (B, S), -1 on padding
        "num_tokens": loss_mask.sum(),
    }


class BatchIterator:
    """Yields, per optimizer step, the list of `num_micro_batches` micro-batch dicts of this DP rank."""

    def __init__(self, dataset, micro_batch_size: int = 1, num_micro_batches: int = 1, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 42, pad_to_multiple_of: int = 8, fixed_length: int | None = None,
                 packing: bool = False, max_length: int = 2048, pad_token_id: int = 0, epochs: float | None = None):
        assert micro_batch_size >= 1 and num_micro_batches >= 1, "micro_batch_size and num_micro_batches must be >= 1"
        assert 0 <= dp_rank < dp_size, f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})"
        self.dataset = dataset.select_columns(["input_ids", "labels"])
        self.mbs, self.num_micro_batches = micro_batch_size, num_micro_batches
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.pad_to_multiple_of, self.fixed_length = pad_to_multiple_of, fixed_length
        self.packing, self.max_length, self.pad_token_id = packing, max_length, pad_token_id
        n = len(dataset)
        if packing:
            # Through the arrow format, not `dataset.data`, so a `select`ed dataset's index mapping is honoured.
            if "length" in dataset.column_names:
                lengths = dataset.with_format("arrow")["length"].to_numpy()
            else:
                lengths = pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_numpy()
            order = np.random.default_rng([seed, 0x9AC]).permutation(n)
            self.units = pack_first_fit(lengths, max_length, order)
        else:
            self.units = None
        self.num_units = len(self.units) if packing else n
        self.global_batch = micro_batch_size * num_micro_batches * dp_size
        self.steps_per_epoch = self.num_units // self.global_batch
        if self.steps_per_epoch == 0:
            what = "packed rows" if packing else "rows"
            raise ValueError(
                f"{self.num_units} {what} cannot fill one global batch of {self.global_batch} "
                f"(micro_batch_size {micro_batch_size} x num_micro_batches {num_micro_batches} x dp_size {dp_size}); "
                "use more data (e.g. `#N` sampling) or a smaller batch"
            )
        self.total_steps = None if epochs is None else max(1, math.floor(epochs * self.steps_per_epoch))
        self.epoch, self.index, self.step = 0, 0, 0
        self._order_epoch, self._order = None, None

    def __len__(self) -> int:
        if self.total_steps is None:
            raise TypeError("BatchIterator without `epochs` is endless")
        return self.total_steps

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_units)
            self._order_epoch = epoch
        return self._order

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "step": self.step, "seed": self.seed,
                "num_units": self.num_units, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_units"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data position: checkpoint has {key}={state[key]}, this run has "
                    f"{getattr(self, key)}; resume with the same data, max_length, packing and seed"
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.step = int(state.get("step", self.epoch * self.steps_per_epoch + self.index // self.global_batch))

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        if self.total_steps is not None and self.step >= self.total_steps:
            raise StopIteration
        if self.index + self.global_batch > self.num_units:
            self.epoch, self.index = self.epoch + 1, 0
        step_units = self._epoch_order(self.epoch)[self.index : self.index + self.global_batch]
        self.index += self.global_batch
        self.step += 1
        block = self.mbs * self.dp_size
        mine = [
            step_units[m * block + self.dp_rank * self.mbs : m * block + (self.dp_rank + 1) * self.mbs]
            for m in range(self.num_micro_batches)
        ]
        return [self._micro_batch(units) for units in mine]

    def _micro_batch(self, units) -> dict:
        groups = [self.units[u] for u in units] if self.packing else [[int(u)] for u in units]
        flat = [i for g in groups for i in g]
        rows = self.dataset[flat]  # one Arrow read per micro-batch
        docs = iter(zip(rows["input_ids"], rows["labels"]))
        samples = [[next(docs) for _ in g] for g in groups]
        return collate(samples, pad_token_id=self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of,
                       fixed_length=self.fixed_length)
