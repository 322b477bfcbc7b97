"""Fused elementwise kernels for the native (no Transformer Engine) layer spec, via torch.compile on CUDA.

Only small pure functions are compiled, never the model: RMSNorm, RoPE and the vocab-parallel cross entropy here,
SwiGLU through megatron-core's own `bias_swiglu_impl` (its `jit_fuser` is torch.compile on torch >= 2.2; build_model
turns it on with `bias_activation_fusion=True`). On CPU every function runs its eager twin (same arithmetic), so
CPU-mode tests exercise the same code paths without a C++ compiler.

- `rms_norm(x, w, eps)`: one kernel forward, one backward; fp32 statistics as HF's LlamaRMSNorm; saves x only.
- `fused_apply_rotary_pos_emb(t, freqs)`: registered as megatron-core's "fused RoPE" (`apply_rope_fusion=True`)
  when TE is absent, so SelfAttention calls it instead of the unfused cos/sin/rotate_half/cat chain. Accepts
  per-token freqs [s, b, 1, d] (MegatuneGPTModel's position ids) as well as [s, 1, 1, d].
- `vocab_parallel_cross_entropy(logits, target, group)`: per-token CE over TP-sharded logits [s, b, v/tp] that saves
  the bf16 logits and an fp32 log-sum-exp [s, b] for backward, instead of megatron-core's fp32 softmax copy (which
  at S=4096, b=2, vocab 152k is 5 GB, written and read several times per step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_COMPILED: dict = {}


def _fast(fn, x: torch.Tensor):
    """torch.compile'd `fn` for CUDA tensors (compiled once, lazily), the eager function otherwise."""
    if not x.is_cuda:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), statistics in fp32, result in x's dtype (times weight)."""
    return _fast(_rms_norm, x)(x, weight, eps)


def _rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    rot = freqs.shape[-1]
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    cos, sin = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    x1, x2 = torch.chunk(t_rot, 2, dim=-1)
    out = t_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out, t_pass), dim=-1)


def fused_apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, transpose_output_memory: bool = False,
                               interleaved: bool = False) -> torch.Tensor:
    """megatron-core's fused-RoPE signature: t [s, b, heads, d], freqs [s, b|1, 1, d_rot] (fp32 angles)."""
    if interleaved:
        raise ValueError("megatune's fused RoPE does not support rotary_interleaved (no HF Llama-like "
                         "model uses it); set apply_rope_fusion=False")
    return _fast(_rope, t)(t, freqs)


def register_rope() -> bool:
    """Make megatron-core's `apply_rope_fusion=True` use our RoPE when TE does not provide one. Returns True if
    ours is (now) the registered implementation."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_apply_rotary_pos_emb
    return rope_utils.fused_apply_rotary_pos_emb is fused_apply_rotary_pos_emb


def _logits_max(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().amax(dim=-1)


def _predicted_and_sumexp(logits: torch.Tensor, lmax: torch.Tensor, local_target: torch.Tensor):
    in_range = (local_target >= 0) & (local_target < logits.shape[-1])
    idx = torch.where(in_range, local_target, 0)
    predicted = torch.gather(logits, -1, idx.unsqueeze(-1)).squeeze(-1).float()
    predicted = torch.where(in_range, predicted, 0.0)
    sumexp = torch.exp(logits.float() - lmax.unsqueeze(-1)).sum(dim=-1)
    return predicted, sumexp


def _ce_grad(logits: torch.Tensor, lse: torch.Tensor, local_target: torch.Tensor, grad: torch.Tensor):
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    prob = torch.exp(logits.float() - lse.unsqueeze(-1))
    onehot = (vocab == local_target.unsqueeze(-1)).float()
    return ((prob - onehot) * grad.unsqueeze(-1)).to(logits.dtype)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group):
        size = 1 if group is None else torch.distributed.get_world_size(group)
        rank = 0 if group is None else torch.distributed.get_rank(group)
        local_target = target - rank * logits.shape[-1]  # out of [0, v/tp) on ranks not holding the target
        lmax = _fast(_logits_max, logits)(logits)
        if size > 1:
            torch.distributed.all_reduce(lmax, op=torch.distributed.ReduceOp.MAX, group=group)
        predicted, sumexp = _fast(_predicted_and_sumexp, logits)(logits, lmax, local_target)
        if size > 1:
            both = torch.stack((predicted, sumexp))
            torch.distributed.all_reduce(both, group=group)
            predicted, sumexp = both[0], both[1]
        lse = lmax + torch.log(sumexp)
        ctx.save_for_backward(logits, lse, local_target)
        return lse - predicted

    @staticmethod
    def backward(ctx, grad):
        logits, lse, local_target = ctx.saved_tensors
        return _fast(_ce_grad, logits)(logits, lse, local_target, grad.contiguous()), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group=None) -> torch.Tensor:
    """Per-token CE (fp32, shape of target) of logits [..., v/tp] sharded over `group` (None: not sharded)."""
    return _VocabParallelCE.apply(logits, target, group)


def use_fused_adamw(optimizer) -> int:
    """Switch megatron-core's torch.optim.AdamW (its fallback without TE/apex, foreach kernels) to torch's fused
    single-kernel AdamW; call before the first step. Returns how many param groups were switched. Measured need:
    the foreach step took 34 ms of a 216 ms Qwen2-1.5B step on an H200 (a fused step reads/writes each fp32 state
    once, about 10 ms). Not yet measured with this switch; checkpoint resume paths that create optimizer state
    themselves must keep `state["step"]` on the GPU for the fused kernel."""
    groups = [g for g in optimizer.param_groups
              if "fused" in g and all(p.is_cuda and p.dtype == torch.float32 for p in g["params"])]
    for g in groups:
        g["fused"], g["foreach"] = True, False
    return len(groups)
