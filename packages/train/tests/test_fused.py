"""fused.py's kernels (eager twins on CPU; the compiled CUDA versions are checked in test_gpu_parity.py) equal the
reference arithmetic: cross entropy and its gradient, RoPE as megatron-core applies it, RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatune.train import fused


def test_cross_entropy_matches_torch_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 3, 50, generator=g, dtype=torch.float64) * 4).requires_grad_()
    target = torch.randint(0, 50, (7, 3), generator=g)
    loss = fused.vocab_parallel_cross_entropy(logits, target)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.view(-1, 50), target.view(-1), reduction="none").view(7, 3)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    weights = torch.rand(7, 3, generator=g, dtype=torch.float64)
    (loss * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-6, atol=1e-6)


def test_rope_matches_megatron_unfused():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    g = torch.Generator().manual_seed(1)
    t = torch.randn(6, 2, 4, 16, generator=g)
    for freqs in (torch.rand(6, 1, 1, 16, generator=g) * 6, torch.rand(6, 2, 1, 16, generator=g) * 6):
        torch.testing.assert_close(fused.fused_apply_rotary_pos_emb(t, freqs), _apply_rotary_pos_emb_bshd(t, freqs))


def test_rms_norm_matches_hf_formula():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(5, 2, 32, generator=g), torch.randn(32, generator=g)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-6), ref)
