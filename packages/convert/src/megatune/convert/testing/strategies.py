"""Hypothesis strategies for layout shapes, with divisibility built in (draw the factors, then multiply, as
zarr.testing.strategies does) instead of filtering with `assume`.

    from megatune.convert.testing.strategies import model_shapes
    @given(model_shapes())
    def test_x(s): ...   # s.tp always divides s.heads, s.ffn and the fused QKV; s.groups may be < s.tp
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from megatune.convert.arch import Shape

TPS = (1, 2, 4, 8)


@dataclass(frozen=True)
class ParallelShape:
    """A model shape together with a tp (and pp) that Megatron-Core accepts for it."""

    shape: Shape
    tp: int
    pp: int

    def __getattr__(self, name: str):
        return getattr(self.shape, name)


@st.composite
def model_shapes(draw, tps=TPS, max_layers: int = 6, kv_below_tp: bool | None = None) -> ParallelShape:
    """Shapes valid for tensor parallelism at the drawn tp. kv_below_tp=True forces groups < tp (megatron-core
    >= 0.16 semantics), False forces groups >= tp, None lets hypothesis choose."""
    tp = draw(st.sampled_from([t for t in tps if not (kv_below_tp and t == 1)]))
    if kv_below_tp is None:
        below = tp > 1 and draw(st.booleans())
    else:
        below = kv_below_tp
    if below:  # groups is a proper divisor of tp; heads per group a multiple of tp / groups
        groups = draw(st.sampled_from([g for g in (1, 2, 4) if g < tp and tp % g == 0]))
        heads = groups * (tp // groups) * draw(st.integers(1, 2))
    else:  # tp divides groups
        groups = tp * draw(st.integers(1, 2))
        heads = groups * draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    if below:  # the fused QKV (groups * (heads/groups + 2) * head_dim rows) must split into tp chunks
        head_dim *= tp // groups
    ffn = tp * draw(st.integers(1, 6))
    pp = draw(st.sampled_from([p for p in (1, 2, 4) if p <= max_layers]))
    layers = pp * draw(st.integers(1, max(1, max_layers // pp)))  # even stages: pp divides the layers
    shape = Shape(
        layers=layers, hidden=draw(st.sampled_from([4, 8, 12])), heads=heads, groups=groups, head_dim=head_dim,
        ffn=ffn, vocab=draw(st.integers(3, 300)), tied=draw(st.booleans()), qkv_bias=draw(st.booleans()),
        qk_norm=draw(st.booleans()),
    )
    return ParallelShape(shape, tp, pp)


def tensors(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Distinct values everywhere (an arange, shuffled by seed), so any misplaced element shows up."""
    n = 1
    for d in shape:
        n *= d
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(n, generator=g).to(dtype) + 1).reshape(shape)


@st.composite
def stage_splits(draw, max_layers: int = 40, max_pp: int = 8) -> tuple[int, int, int | None, int | None]:
    """(num_layers, pp, first, last) where the layers left after first/last split evenly over the middle."""
    pp = draw(st.integers(1, max_pp))
    if pp == 1:
        n = draw(st.integers(1, max_layers))
        return n, 1, None, None
    first = draw(st.none() | st.integers(0, 6))
    last = draw(st.none() | st.integers(0, 6))
    free = pp - (first is not None) - (last is not None)
    per = draw(st.integers(1, 5)) if free else 0
    n = (first or 0) + (last or 0) + free * per
    if n == 0:
        n, first = 1, (1 if first is not None else first)
        if first is None:  # only possible when both were given as 0 with free == 0
            last = 1
    return n, pp, first, last
