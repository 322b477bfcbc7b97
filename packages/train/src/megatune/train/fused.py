"""Fused elementwise kernels for the native (no Transformer Engine) layer spec, via torch.compile on CUDA.

Only small pure functions are compiled, never the model: RMSNorm, RoPE and the vocab-parallel cross entropy here,
SwiGLU through megatron-core's own `bias_swiglu_impl` (its `jit_fuser` is torch.compile on torch >= 2.2; build_model
turns it on with `bias_activation_fusion=True`). On CPU every function runs its eager twin (same arithmetic), so
CPU-mode tests exercise the same code paths without a C++ compiler.

- `rms_norm(x, w, eps)`: one kernel forward, one backward; fp32 statistics as HF's LlamaRMSNorm; saves x only.
- `fused_apply_rotary_pos_emb(t, freqs)`: registered as megatron-core's "fused RoPE" (`apply_rope_fusion=True`)
  when TE is absent, so SelfAttention calls it instead of the unfused cos/sin/rotate_half/cat chain. Accepts
  per-token freqs [s, b, 1, d] (MegatuneGPTModel's position ids) as well as [s, 1, 1, d].
- `accumulate_(main, grad)`: fp32 main gradient += bf16 gradient in one vectorised kernel (the MoE experts' weight
  gradients, moe_experts.py).
- `vocab_parallel_cross_entropy(logits, target, group)`: per-token CE over TP-sharded logits [s, b, v/tp] that saves
  the bf16 logits and an fp32 log-sum-exp [s, b] for backward, instead of megatron-core's fp32 softmax copy (which
  at S=4096, b=2, vocab 152k is 5 GB, written and read several times per step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_COMPILED: dict = {}


def _fast(fn, x: torch.Tensor):
    """torch.compile'd `fn` for CUDA tensors when the device policy compiles kernels (compiled once, lazily), the
    eager function otherwise."""
    from megatune.train.policy import active

    if not (x.is_cuda and active().compiled_kernels):
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def _accumulate(main: torch.Tensor, grad: torch.Tensor) -> None:
    main.add_(grad)


def accumulate_(main: torch.Tensor, grad: torch.Tensor) -> None:
    """main += grad for a flat-viewable fp32 main gradient and a bf16 (or fp32) gradient of the same size. Eager
    torch adds mixed dtypes with its non-vectorised casting kernel (~2.7 TB/s on an H200); the compiled kernel
    reads and writes vectors."""
    _fast(_accumulate, main)(main.view(-1), grad.reshape(-1))


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


def use_fused_adamw(optimizer, devices: tuple[str, ...] = ("cuda",)) -> int:
    """Switch megatron-core's torch.optim.AdamW (its fallback without TE/apex: foreach kernels, several passes over
    every fp32 state) to torch's fused single-kernel AdamW. Same update rule; measured on an H200 (BENCHMARKS.md).

    Safe to call again after loading a checkpoint (checkpoint.load_checkpoint does: torch's `load_state_dict`
    restores the saved groups' `fused` flags): the fused kernel needs each parameter's `state["step"]` as its own fp32 tensor on the
    parameter's device, while megatron-core's distributed optimizer loads one shared CPU step tensor for all of
    them. `devices`: where to switch (torch has a fused CPU kernel too; tests use it). Returns how many param groups
    use the fused kernel (0 on CPU by default, or for non-AdamW optimizers)."""
    switched = 0
    for opt in torch_optimizers(optimizer):
        for g in opt.param_groups:
            if "fused" not in g or not g["params"] or not all(p.device.type in devices and p.dtype == torch.float32
                                                             for p in g["params"]):
                continue
            g["fused"], g["foreach"] = True, False
            switched += 1
            for p in g["params"]:
                st = opt.state.get(p)
                if st and "step" in st:
                    st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32, device=p.device)
    return switched


def torch_optimizers(optimizer):
    """The torch.optim optimizers inside megatron-core's wrappers (ChainedOptimizer -> MixedPrecision -> torch)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        yield optimizer
    elif hasattr(optimizer, "chained_optimizers"):
        for inner in optimizer.chained_optimizers:
            yield from torch_optimizers(inner)
    elif getattr(optimizer, "optimizer", None) is not None:
        yield from torch_optimizers(optimizer.optimizer)


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for apex's `multi_tensor_l2norm` (megatron-core's fallback computes one norm per tensor and
    synchronises with the host for each): torch._foreach_norm + one reduction, no host round trip."""
    tensors = tensor_lists[0]
    norms = torch.stack([n.float() for n in torch._foreach_norm(tensors)])
    return torch.linalg.vector_norm(norms).reshape(1), (norms if per_tensor else None)


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for apex's `multi_tensor_scale` (dst = src * scale), in a few multi-tensor kernels instead of
    one allocation and two kernels per tensor."""
    src, dst = tensor_lists
    if all(a is b for a, b in zip(src, dst)):
        if scale != 1.0:
            torch._foreach_mul_(dst, scale)
        return
    torch._foreach_copy_(dst, src if scale == 1.0 else torch._foreach_mul(src, scale))


def install_multi_tensor_ops() -> bool:
    """Replace megatron-core's per-tensor Python fallbacks for apex's multi-tensor L2 norm and scale (used by
    gradient clipping and fp16/bf16 parameter copies) with torch's foreach kernels. Does nothing when TE or apex
    provide the real ones. Returns True if ours are installed."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mc_optimizer

    installed = False
    if clip_grads.l2_norm_impl in (utils.local_multi_tensor_l2_norm, _foreach_l2_norm):
        clip_grads.l2_norm_impl = _foreach_l2_norm
        installed = True
    for mod in (clip_grads, mc_optimizer):
        if getattr(mod, "multi_tensor_scale_impl", None) in (utils.local_multi_tensor_scale, _foreach_scale):
            mod.multi_tensor_scale_impl = _foreach_scale
    return installed
