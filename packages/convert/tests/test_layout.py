"""Property tests of the pure layout functions (hypothesis strategies from megatune.convert.testing.strategies)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from megatune.convert.layout import (
    COLUMN,
    FC1,
    REPLICATED,
    ROW,
    VOCAB,
    deinterleave_qkv,
    interleave_qkv,
    layer_stage,
    padded_vocab_size,
    shard,
    stage_layers,
    unshard,
)
from megatune.convert.plan import (
    hf_shape,
    part_row_ranges,
    parts_into,
    rank_part,
    stage_entries,
)
from megatune.convert.testing.oracle import DictReader, hf_to_full, reshard
from megatune.convert.testing.strategies import model_shapes, stage_splits, tensors

settings.register_profile("megatune", max_examples=60, deadline=None, database=None)
settings.load_profile("megatune")


def _hf_tensors(shape, pp_counts, seed=0):
    names = [n for p in range(len(pp_counts)) for e in stage_entries(shape, pp_counts, p) for n in e.hf_names]
    return {n: tensors(hf_shape(n, shape), seed + i) for i, n in enumerate(dict.fromkeys(names))}


@given(model_shapes())
def test_qkv_interleave_round_trip(ps):
    s = ps.shape
    q, k, v = (tensors((n * s.head_dim, s.hidden), i) for i, n in enumerate((s.heads, s.groups, s.groups)))
    fused = interleave_qkv(q, k, v, s.groups)  # (groups*(heads/groups+2)*hd, hidden)
    assert fused.shape == (s.qkv_rows, s.hidden)
    for a, b in zip(deinterleave_qkv(fused, s.heads, s.groups, s.head_dim), (q, k, v)):
        assert torch.equal(a, b)


@given(model_shapes(), st.sampled_from([COLUMN, ROW, REPLICATED, FC1, VOCAB]))
def test_unshard_shard_is_identity(ps, kind):
    s, tp = ps.shape, ps.tp
    rows = {COLUMN: s.qkv_rows, ROW: s.hidden, REPLICATED: s.hidden, FC1: 2 * s.ffn, VOCAB: s.vocab}[kind]
    cols = s.heads * s.head_dim if kind == ROW else s.hidden
    full = tensors((rows, cols), 1)
    padded = padded_vocab_size(s.vocab, 8, tp)
    parts = shard(kind, full, tp, padded_vocab=padded)
    assert len(parts) == tp and len({p.shape for p in parts}) == 1
    if kind == VOCAB:
        assert sum(p.shape[0] for p in parts) == padded and padded % (8 * tp) == 0
    assert torch.equal(unshard(kind, parts, vocab_size=s.vocab if kind == VOCAB else None), full)


@given(model_shapes(tps=(1, 2, 4, 8)), st.sampled_from([1, 2, 4, 8]), st.sampled_from([COLUMN, ROW, FC1, VOCAB]))
def test_reshard_equals_sharding_the_full_tensor(ps, tp_b, kind):
    s, tp_a = ps.shape, ps.tp
    full = tensors((8 * 2 * 3 * 5, 8 * 3), 2)  # divisible by every tp; FC1 halves stay divisible
    if kind == VOCAB:
        full = tensors((s.vocab, 8), 3)
    pa, pb = padded_vocab_size(full.shape[0], 4, tp_a), padded_vocab_size(full.shape[0], 4, tp_b)
    parts_a = shard(kind, full, tp_a, padded_vocab=pa)
    got = reshard(kind, parts_a, tp_b, vocab_size=full.shape[0] if kind == VOCAB else None, padded_vocab=pb)
    want = shard(kind, full, tp_b, padded_vocab=pb)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@given(model_shapes())
def test_rank_part_slices_equal_sharding_the_full_tensor(ps):
    """The streaming path (read only a rank's rows/cols) == the reference path (build full, then shard)."""
    s, tp = ps.shape, ps.tp
    counts = stage_layers(s.layers, ps.pp)
    hf = _hf_tensors(s, counts)
    reader = DictReader(hf)
    padded = padded_vocab_size(s.vocab, 4, tp)
    for p in range(ps.pp):
        for e in stage_entries(s, counts, p):
            full = hf_to_full(e, [hf[n] for n in e.hf_names], s)
            want = shard(e.param.kind, full, tp, padded_vocab=padded)
            for r in range(tp):
                assert torch.equal(rank_part(e, reader, s, tp, r, padded), want[r]), (e.name, r)


@given(model_shapes())
def test_parts_into_and_part_row_ranges_match_sharding(ps):
    """The buffer path (all parts read into one buffer) == shard(full); part_row_ranges inverts it per HF tensor."""
    s, tp = ps.shape, ps.tp
    counts = stage_layers(s.layers, ps.pp)
    hf = _hf_tensors(s, counts)
    padded = padded_vocab_size(s.vocab, 4, tp)
    buf = torch.empty(1 << 22, dtype=torch.uint8)
    for p in range(ps.pp):
        for e in stage_entries(s, counts, p):
            full = hf_to_full(e, [hf[n] for n in e.hf_names], s)
            want = shard(e.param.kind, full, tp, padded_vocab=padded)
            got = parts_into(e, DictReader(hf), s, tp, padded, buf, full.dtype)
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), e.name
            if e.param.kind != ROW:
                for n in e.hf_names:
                    rows = [want[t][a:b] for t, a, b in part_row_ranges(e, n, s, tp, padded)]
                    assert torch.equal(torch.cat(rows), hf[n]), (e.name, n)


@given(model_shapes(kv_below_tp=True))
def test_kv_heads_below_tp_follow_megatron_core(ps):
    """Replay megatron-core >= 0.16 `get_query_key_value_tensors` for groups < tp: all-gather the fused rows, take
    group rank // (tp/groups), then query heads rank % (tp/groups): each rank must see exactly its HF q heads and
    its group's k/v."""
    s, tp = ps.shape, ps.tp
    hd, qpg, per = s.head_dim, s.heads // s.groups, tp // s.groups
    q, k, v = (tensors((n * hd, s.hidden), i) for i, n in enumerate((s.heads, s.groups, s.groups)))
    parts = shard(COLUMN, interleave_qkv(q, k, v, s.groups), tp)
    gathered = torch.cat(parts)  # all_gather_last_dim_from_tensor_parallel_region
    size = gathered.shape[0] // s.groups
    for r in range(tp):
        idx = r // per
        block = gathered[idx * size:(idx + 1) * size]
        bq, bk, bv = torch.split(block, [qpg * hd, hd, hd])
        n = s.heads // tp  # num_attention_heads_per_partition // (tp / groups) after megatron's indexing
        j = r % per
        heads_q = bq[j * n * hd:(j + 1) * n * hd]
        assert torch.equal(heads_q, q[r * n * hd:(r + 1) * n * hd])
        assert torch.equal(bk, k[idx * hd:(idx + 1) * hd]) and torch.equal(bv, v[idx * hd:(idx + 1) * hd])


@given(stage_splits())
def test_stage_assignment_covers_each_layer_once(split):
    n, pp, first, last = split
    counts = stage_layers(n, pp, first, last)
    assert len(counts) == pp and sum(counts) == n
    if first is not None:
        assert counts[0] == first
    if last is not None:
        assert counts[-1] == last
    seen = [layer_stage(i, counts) for i in range(n)]
    assert len(set(seen)) == n  # every layer lands on exactly one (stage, local index)
    for stage in range(pp):
        assert sorted(loc for st_, loc in seen if st_ == stage) == list(range(counts[stage]))


def test_uneven_split_that_cannot_divide_is_rejected():
    import pytest

    with pytest.raises(ValueError, match="split evenly"):
        stage_layers(10, 4, first=2)
