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


def _adamw_run(steps: int, *, fused_from: int | None, reload_at: int | None = None) -> list[torch.Tensor]:
    """AdamW over two params for `steps` steps; switch to the fused kernel at step `fused_from`; at `reload_at`
    save + load the state with one shared CPU step tensor, as megatron-core's distributed optimizer loads it."""
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(5, 4, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    for i in range(steps):
        if i == reload_at:
            saved = opt.state_dict()
            shared = torch.tensor(float(saved["state"][0]["step"]))
            for st in saved["state"].values():
                st["step"] = shared
            opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
            opt.load_state_dict(saved)
            if fused_from is not None and i >= fused_from:
                assert fused.use_fused_adamw(opt, devices=("cpu",)) == 1
        if i == fused_from:
            assert fused.use_fused_adamw(opt, devices=("cpu",)) == 1
        for p in params:
            p.grad = torch.sin(p.detach() * (i + 1))
        opt.step()
    return [p.detach().clone() for p in params]


def test_fused_adamw_switch_keeps_the_update_rule_and_survives_a_reload():
    ref = _adamw_run(6, fused_from=None)
    torch.testing.assert_close(_adamw_run(6, fused_from=2), ref, rtol=1e-5, atol=1e-6)
    # after a reload the fused kernel needs one step tensor per param: a shared one would count steps twice
    torch.testing.assert_close(_adamw_run(6, fused_from=1, reload_at=3), ref, rtol=1e-5, atol=1e-6)


def test_foreach_multi_tensor_ops_match_megatron_fallbacks():
    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

    g = torch.Generator().manual_seed(4)
    ts = [torch.randn(n, generator=g) for n in (3, 17, 64)]
    ours, _ = fused._foreach_l2_norm(0, None, [ts], False)
    torch.testing.assert_close(ours, torch.linalg.vector_norm(torch.cat(ts)).reshape(1))
    if torch.cuda.is_available():
        ref, _ = local_multi_tensor_l2_norm(0, None, [[t.cuda() for t in ts]], False)
        torch.testing.assert_close(ours, ref.cpu())
    src = [t.clone() for t in ts]
    dst_ref, dst = [torch.zeros_like(t, dtype=torch.bfloat16) for t in ts], [torch.zeros_like(t, dtype=torch.bfloat16) for t in ts]
    local_multi_tensor_scale(0, None, [src, dst_ref], 0.5)
    fused._foreach_scale(0, None, [src, dst], 0.5)
    torch.testing.assert_close(dst, dst_ref)
    fused._foreach_scale(0, None, [src, src], 0.5)  # in place, as gradient clipping calls it
    torch.testing.assert_close(src, [t * 0.5 for t in ts])


