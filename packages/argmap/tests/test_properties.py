"""Hypothesis properties of the derived counts; constraints are built into the strategies (no `assume`)."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from megatune.argmap import SftArguments, derive, from_megatron, to_megatron


@st.composite
def runs(draw):
    """(SftArguments, world_size): world size drawn as tp x pp x dp, so tp x pp always divides it."""
    tp, pp, dp = draw(st.integers(1, 8)), draw(st.integers(1, 4)), draw(st.integers(1, 16))
    sft = SftArguments(
        tp=tp, pp=pp, batch_size=draw(st.integers(1, 8)),
        gradient_accumulation_steps=draw(st.none() | st.integers(1, 32)),
        num_train_epochs=draw(st.integers(1, 5)),
        warmup_steps=draw(st.sampled_from([0, 0, 1, 10, 1000])),
        warmup_ratio=draw(st.floats(0.0, 1.0)),
        lr_scheduler_type=draw(st.sampled_from(["cosine", "linear", "constant", "constant_with_warmup"])),
    )
    return sft, tp * pp * dp


sizes = st.integers(1, 10**7)


@given(runs(), sizes, sizes)
def test_train_iters_monotonic_in_data_size(run, a: int, b: int) -> None:
    sft, world = run
    small, large = sorted((a, b))
    assert (derive(sft, world_size=world, train_len=small, val_len=0).train_iters
            <= derive(sft, world_size=world, train_len=large, val_len=0).train_iters)
    assert (derive(sft, world_size=world, train_len=1, val_len=small).eval_iters
            <= derive(sft, world_size=world, train_len=1, val_len=large).eval_iters)


@given(runs(), sizes, st.integers(0, 10**6))
def test_counts_never_zero_with_data_and_warmup_below_train_iters(run, train_len: int, val_len: int) -> None:
    sft, world = run
    d = derive(sft, world_size=world, train_len=train_len, val_len=val_len)
    assert d.train_iters >= 1
    assert (d.eval_iters >= 1) == (val_len > 0)
    assert 0 <= d.lr_warmup_iters < d.train_iters  # Megatron asserts warmup < decay iterations
    assert d.global_batch_size == sft.batch_size * d.gradient_accumulation_steps * d.data_parallel_size
    assert d.data_parallel_size * sft.tp * sft.pp == world
    # every sample is seen: iterations x global batch covers the data, with less than one batch to spare per epoch
    covered = d.train_iters * d.global_batch_size
    assert train_len * sft.num_train_epochs <= covered < train_len * sft.num_train_epochs + d.global_batch_size


@given(runs(), sizes, st.integers(0, 10**5))
def test_read_back_reproduces_megatron_arguments(run, train_len: int, val_len: int) -> None:
    sft, world = run
    meg = to_megatron(sft, world_size=world, train_len=train_len, val_len=val_len)
    again = to_megatron(SftArguments(**from_megatron(meg)), world_size=world, train_len=train_len, val_len=val_len)
    assert again == meg


@given(st.integers(1, 10**6), st.floats(0.0, 1.0))
def test_warmup_ratio_is_hf_ceil(train_len: int, ratio: float) -> None:
    sft = SftArguments(gradient_accumulation_steps=1, warmup_ratio=ratio)
    d = derive(sft, world_size=1, train_len=train_len, val_len=0)
    assert d.train_iters == train_len
    assert d.lr_warmup_iters == min(math.ceil(train_len * ratio), train_len - 1)
