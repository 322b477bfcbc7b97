"""Batches: label shift, padding, packing (hypothesis), DP sharding, epochs, bit-exact resume."""

from __future__ import annotations

import datasets
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from megatune.train.data import BatchIterator, collate, pack_first_fit


def _dataset(lengths):
    """Row i has tokens all equal to i + 1 (so a token names its row) and loss on its second half."""
    ids = [[i + 1] * n for i, n in enumerate(lengths)]
    labels = [[-100] * (n // 2) + [i + 1] * (n - n // 2) for i, n in enumerate(lengths)]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels, "length": list(lengths)})


def _rows_of(batch) -> list[set[int]]:
    return [set(row[row > 0].tolist()) for row in batch["tokens"]]


def test_collate_shifts_labels_and_pads():
    docs = [[([5, 6, 7, 8], [-100, -100, 7, 8])], [([9, 10], [-100, 10])]]
    b = collate(docs, pad_token_id=0, pad_to_multiple_of=8)
    assert b["tokens"].shape == (2, 8) and b["tokens"].dtype == torch.int64
    assert b["labels"][0].tolist() == [-100, 7, 8, -100] + [-100] * 4
    assert b["labels"][1].tolist() == [10, -100] + [-100] * 6
    assert b["document_ids"][0].tolist() == [0] * 4 + [-1] * 4 and b["document_ids"].dtype == torch.int32
    assert b["loss_mask"].sum() == b["num_tokens"] == 3
    assert collate(docs, pad_token_id=0, fixed_length=32)["tokens"].shape == (2, 32)
    with pytest.raises(ValueError, match="fixed_length"):
        collate(docs, pad_token_id=0, fixed_length=3)


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(4, 64),
    data=st.data(),
)
def test_packing_never_crosses_documents_and_loses_no_token(capacity, data):
    lengths = data.draw(st.lists(st.integers(2, capacity), min_size=1, max_size=40))
    order = data.draw(st.permutations(range(len(lengths))))
    bins = pack_first_fit(lengths, capacity, order)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths))), "every row packed exactly once"
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    naive: list[list[int]] = []  # the textbook O(n * bins) first-fit the segment tree must reproduce
    for i in order:
        fit = next((b for b in naive if sum(lengths[j] for j in b) + lengths[i] <= capacity), None)
        fit.append(i) if fit is not None else naive.append([i])
    assert bins == naive
    docs = [[([d + 1] * lengths[d], [-100] + [d + 1] * (lengths[d] - 1)) for d in b] for b in bins]
    batch = collate(docs, pad_token_id=0, pad_to_multiple_of=8)
    tok, lab, doc, pos = batch["tokens"], batch["labels"], batch["document_ids"], batch["position_ids"]
    assert int((tok > 0).sum()) == sum(lengths), "no token lost or duplicated"
    for r in range(tok.shape[0]):
        for t in range(tok.shape[1]):
            if doc[r, t] < 0:
                assert tok[r, t] == 0 and lab[r, t] == -100
                continue
            if t == 0 or doc[r, t] != doc[r, t - 1]:
                assert pos[r, t] == 0, "position ids restart at each document"
            if lab[r, t] != -100:
                assert t + 1 < tok.shape[1] and doc[r, t + 1] == doc[r, t], "a target never crosses documents"
                assert lab[r, t] == tok[r, t + 1]


def test_iterator_shapes_and_micro_batch_count():
    it = BatchIterator(_dataset([5, 9, 3, 12] * 4), micro_batch_size=2, num_micro_batches=3, pad_token_id=0, epochs=1)
    assert len(it) == 2
    steps = list(it)
    assert len(steps) == 2 and all(len(s) == 3 for s in steps)
    for mb in steps[0]:
        assert mb["tokens"].shape[0] == 2 and mb["tokens"].shape[1] % 8 == 0
        for k in ("tokens", "labels", "loss_mask", "position_ids", "document_ids"):
            assert mb[k].shape == mb["tokens"].shape
        assert set(mb["document_ids"].unique().tolist()) <= {-1, 0}


@pytest.mark.parametrize("packing", [False, True])
def test_dp_shards_disjoint_and_covering(packing):
    ds = _dataset([3 + (i * 7) % 13 for i in range(64)])
    kw = dict(micro_batch_size=2, seed=7, packing=packing, max_length=24, pad_token_id=0, epochs=2)
    single = list(BatchIterator(ds, num_micro_batches=4, **kw))
    ranks = [list(BatchIterator(ds, num_micro_batches=2, dp_rank=r, dp_size=2, **kw)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) > 1
    for step, whole in enumerate(single):
        seen = [row for r in range(2) for mb in ranks[r][step] for row in _rows_of(mb)]
        flat = [i for rows in seen for i in rows]
        assert len(flat) == len(set(flat)), "DP ranks never share a row within a step"
        assert set(flat) == {i for mb in whole for rows in _rows_of(mb) for i in rows}, "ranks cover the batch"


def test_epochs_shuffle_by_seed_and_epoch():
    ds = _dataset([4] * 16)
    order = lambda seed: [min(r) for s in BatchIterator(ds, 2, 2, seed=seed, pad_token_id=0, epochs=2)  # noqa: E731
                          for mb in s for r in _rows_of(mb)]
    a, b = order(1), order(1)
    assert a == b and a != order(2)
    assert sorted(a[:16]) == sorted(a[16:]) == list(range(1, 17)) and a[:16] != a[16:]
    it = BatchIterator(ds, 2, 2, pad_token_id=0, epochs=1.5)
    assert len(it) == 6 and len(list(it)) == 6


@pytest.mark.parametrize("packing", [False, True])
def test_resume_is_bit_exact(packing):
    ds = _dataset([3 + (i * 5) % 17 for i in range(50)])
    kw = dict(micro_batch_size=2, num_micro_batches=2, dp_rank=1, dp_size=2, seed=3, packing=packing,
              max_length=32, pad_token_id=0, epochs=3)
    ref = list(BatchIterator(ds, **kw))
    for stop in (1, len(ref) // 2, len(ref) - 1):  # includes a stop right before an epoch boundary
        it = BatchIterator(ds, **kw)
        for _ in range(stop):
            next(it)
        state = it.state_dict()
        resumed = BatchIterator(ds, **kw)
        resumed.load_state_dict(dict(state))
        rest = list(resumed)
        assert len(rest) == len(ref) - stop
        for got, want in zip(rest, ref[stop:]):
            for g, w in zip(got, want):
                for key in ("tokens", "labels", "loss_mask", "position_ids", "document_ids"):
                    assert torch.equal(g[key], w[key])


def test_resume_refuses_other_data():
    it = BatchIterator(_dataset([4] * 16), 2, 2, pad_token_id=0)
    with pytest.raises(ValueError, match="same data"):
        BatchIterator(_dataset([4] * 20), 2, 2, pad_token_id=0).load_state_dict(it.state_dict())


def test_too_little_data_is_clear():
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        BatchIterator(_dataset([4] * 3), micro_batch_size=2, num_micro_batches=2, pad_token_id=0)
