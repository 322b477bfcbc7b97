"""The MoE layer's hand-written backward passes (CPU, float64) equal autograd's on the reference arithmetic:

- moe_dispatch's row movements: the dispatch gather (backward: each token's k rows gathered and summed, no
  index_add_) and the combine permutation (backward: the inverse permutation);
- moe_experts' expert linear: input and weight gradients equal autograd's through a per-expert loop, including
  experts without tokens; under megatron-core's DDP contract (a `main_grad`) the weight gradient is added into
  main_grad across micro-batches, `grad_added_to_main_grad` is set, and what autograd receives is only a placeholder.
"""

from __future__ import annotations

import torch
from megatune.train import fused


def _routing(n: int, experts: int, k: int, g: torch.Generator):
    """A dropless top-k map's permutation as LocalTokenDispatcher builds it."""
    flat = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n)]).reshape(-1)
    order = torch.argsort(flat, stable=True)
    restore = torch.empty_like(order)
    restore[order] = torch.arange(order.numel())
    return flat, order, restore


def test_dispatch_and_combine_gradients_equal_autograd():
    from megatune.train.moe_dispatch import _Dispatch, _Permute

    g = torch.Generator().manual_seed(0)
    n, k, h = 11, 3, 5
    _, order, restore = _routing(n, 6, k, g)
    source = torch.div(order, k, rounding_mode="floor")
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(n * k, h, generator=g, dtype=torch.float64)

    rows = _Dispatch.apply(hidden, source, restore, k)
    ref_rows = hidden.index_select(0, source)
    torch.testing.assert_close(rows, ref_rows, rtol=0, atol=0)
    (grad,) = torch.autograd.grad((rows * weights).sum(), hidden)
    (ref,) = torch.autograd.grad((ref_rows * weights).sum(), hidden)
    torch.testing.assert_close(grad, ref, rtol=1e-12, atol=1e-12)

    expert_out = torch.randn(n * k, h, generator=g, dtype=torch.float64, requires_grad=True)
    combined = _Permute.apply(expert_out, restore, order).view(n, k, h).sum(dim=1)
    ref_combined = expert_out.index_select(0, restore).view(n, k, h).sum(dim=1)
    torch.testing.assert_close(combined, ref_combined, rtol=0, atol=0)
    w = torch.randn(n, h, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((combined * w).sum(), expert_out)
    (ref,) = torch.autograd.grad((ref_combined * w).sum(), expert_out)
    torch.testing.assert_close(grad, ref, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda x: _Dispatch.apply(x, source, restore, k), (hidden,))
    assert torch.autograd.gradcheck(lambda x: _Permute.apply(x, restore, order), (expert_out,))


def _expert_case(g: torch.Generator):
    counts = [4, 0, 7, 1, 0, 3]
    x = torch.randn(sum(counts), 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(len(counts), 8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    return counts, x, w


def _loop_reference(x, w, counts):
    parts, start = [], 0
    for j, c in enumerate(counts):
        parts.append(x[start:start + c] @ w[j].t())
        start += c
    return torch.cat(parts)


def test_expert_linear_gradients_equal_autograd_loop():
    from megatune.train.moe_experts import grouped_linear

    g = torch.Generator().manual_seed(1)
    counts, x, w = _expert_case(g)
    dy = torch.randn(sum(counts), 8, generator=g, dtype=torch.float64)
    y = grouped_linear(x, w, counts, None)
    ref = _loop_reference(x, w, counts)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gx, gw = torch.autograd.grad((y * dy).sum(), (x, w))
    rx, rw = torch.autograd.grad((ref * dy).sum(), (x, w))
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-12, atol=1e-12)
    assert gw[1].abs().max() == 0 and gw[4].abs().max() == 0  # experts without tokens
    assert torch.autograd.gradcheck(lambda a, b: grouped_linear(a, b, counts, None), (x, w))


def test_expert_weight_gradient_goes_into_main_grad():
    """Megatron-core DDP's contract: main_grad accumulates over micro-batches; its hook sees grad_added_to_main_grad
    and drops the placeholder (the hook's logic is replayed here on what autograd delivers)."""
    from megatune.train.moe_experts import grouped_linear

    g = torch.Generator().manual_seed(2)
    counts, x, w = _expert_case(g)
    w.main_grad = torch.full(w.shape, 0.5, dtype=torch.float64)
    w.grad_added_to_main_grad = False
    expected = w.main_grad.clone()
    for micro in range(3):
        dy = torch.randn(sum(counts), 8, generator=g, dtype=torch.float64)
        (rw,) = torch.autograd.grad((_loop_reference(x, w, counts) * dy).sum(), w)
        expected += rw
        (placeholder,) = torch.autograd.grad((grouped_linear(x, w, counts, None) * dy).sum(), w)
        assert w.grad_added_to_main_grad and placeholder.shape == w.shape, micro
    torch.testing.assert_close(w.main_grad, expected, rtol=1e-12, atol=1e-12)
    frozen = w.detach().requires_grad_(False)
    frozen.main_grad = torch.zeros_like(w.main_grad)
    (gx,) = torch.autograd.grad(grouped_linear(x, frozen, counts, None).sum(), x)  # no weight gradient wanted
    assert gx.shape == x.shape and frozen.main_grad.abs().max() == 0


def test_accumulate_adds_a_lower_precision_gradient():
    main = torch.arange(12, dtype=torch.float32).view(3, 4)
    grad = torch.linspace(-1, 1, 12).view(3, 4).to(torch.bfloat16)
    expected = main + grad.float()
    fused.accumulate_(main, grad)
    torch.testing.assert_close(main, expected, rtol=0, atol=0)
