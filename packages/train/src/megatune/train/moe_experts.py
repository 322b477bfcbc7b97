"""Expert MLPs as two grouped GEMMs without Transformer Engine, with megatron-core's sequential-expert names.

`GroupedExperts` replaces megatron-core's SequentialMLP (one MLP module and two GEMM launches per local expert) in
the MoELayer. The local experts' weights are two 3-D parameters,

    weight1 [experts, 2 * ffn/tp, hidden]   (gate rows, then up rows: megatron-core's gated linear_fc1 layout)
    weight2 [experts, hidden, ffn/tp]

and the tokens (already sorted by expert by the token dispatcher) go through
`grouped_mm(x, weight1^T) -> silu(gate) * up * prob -> grouped_mm(., weight2^T)`. On CUDA with bf16 that is
`torch.nn.functional.grouped_mm` (or `torch._grouped_mm` on older torch): one kernel per projection for all experts;
elsewhere (CPU, fp32) the same arithmetic runs as a loop of per-expert matmuls, which is what the CPU tests check.
The routing probability scales the activation before linear_fc2, as megatron-core's experts do.

Names: `state_dict()` yields `local_experts.{j}.linear_fc1.weight` / `local_experts.{j}.linear_fc2.weight` (views of
the 3-D parameters) and `load_state_dict` accepts them, so checkpoints and the converter see exactly what
SequentialMLP would produce, and either module loads the other's checkpoints. Each weight is tagged like
megatron-core's expert linears (`allreduce=False` under expert parallelism, so DDP reduces it over the
expert-data-parallel group; tensor-parallel partition attributes for the gradient norm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name
from megatron.core.transformer.module import MegatronModule
from megatune.train import fused

_NAMES = ("linear_fc1", "linear_fc2")


def _swiglu_scaled(h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up * prob, computed in fp32, result in h's dtype; h [n, 2f] = [gate | up], probs [n]."""
    gate, up = h.float().chunk(2, dim=-1)
    return (F.silu(gate) * up * probs.float()[:, None]).to(h.dtype)


def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def use_grouped_mm(x: torch.Tensor) -> bool:
    """One grouped GEMM kernel is available for x: CUDA, bf16, Hopper (sm90) or newer, a grouped_mm in torch."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and _grouped_mm_fn() is not None
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def _expert_matmul(x: torch.Tensor, b: torch.Tensor, counts: list[int] | None, offsets: torch.Tensor | None
                   ) -> torch.Tensor:
    """y[rows of expert j] = x[rows of expert j] @ b[j]; x [n, k] sorted by expert, b [E, k, m] -> [n, m]."""
    if offsets is not None:
        return _grouped_mm_fn()(x, b, offs=offsets)
    parts, start = [], 0
    for j, n in enumerate(counts):
        parts.append(x[start:start + n] @ b[j])
        start += n
    return torch.cat(parts) if parts else x.new_empty(0, b.shape[2])


def _expert_wgrad(dy: torch.Tensor, x: torch.Tensor, counts: list[int] | None, offsets: torch.Tensor | None
                  ) -> torch.Tensor:
    """dW[j] = dy[rows of expert j]^T @ x[rows of expert j] -> [E, out, in], the weight's own layout (zeros for an
    expert without rows)."""
    if offsets is not None:
        return _grouped_mm_fn()(dy.t(), x, offs=offsets)
    out, start = dy.new_zeros(len(counts), dy.shape[1], x.shape[1]), 0
    for j, n in enumerate(counts):
        if n:
            out[j] = dy[start:start + n].t() @ x[start:start + n]
        start += n
    return out


def _into_main_grad(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The weight gradient to hand autograd. Under megatron-core's DDP (the weight has a `main_grad`, fp32) it is
    added to main_grad here, in one vectorised kernel (fused.accumulate_), and autograd gets megatron-core's
    gradient-accumulation-fusion placeholder: `grad_added_to_main_grad` tells DDP's hook to drop it instead of
    adding it again. Otherwise the gradient itself."""
    main = getattr(weight, "main_grad", None)
    if main is None:
        return grad
    fused.accumulate_(main, grad)
    weight.grad_added_to_main_grad = True
    return torch.empty_like(weight)


class _ExpertLinear(torch.autograd.Function):
    """y = x @ weight[j]^T per expert's rows. Backward computes the weight gradient directly in the weight's
    [E, out, in] layout and accumulates it into the fp32 main gradient itself (_into_main_grad): megatron-core's DDP
    hook would add bf16 into fp32 with torch's non-vectorised casting kernel (all parameters' adds together: 126 ms
    of a 614 ms 8-micro-batch step, Qwen3-30B-A3B shape, H200; the experts hold 86% of those parameters)."""

    @staticmethod
    def forward(ctx, x, weight, counts, offsets):
        ctx.save_for_backward(x, weight, offsets)
        ctx.counts = counts
        return _expert_matmul(x, weight.transpose(1, 2), counts, offsets)

    @staticmethod
    def backward(ctx, dy):
        x, weight, offsets = ctx.saved_tensors
        dy = dy.contiguous()
        dx = _expert_matmul(dy, weight, ctx.counts, offsets) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dw = _into_main_grad(weight, _expert_wgrad(dy, x, ctx.counts, offsets))
        return dx, dw, None, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int] | None, offsets: torch.Tensor | None
                   ) -> torch.Tensor:
    """y[rows of expert j] = x[rows of expert j] @ weight[j]^T; x [n, in] sorted by expert, weight [E, out, in];
    grouped_mm with device `offsets` (cumulative counts), else a loop over the host `counts`."""
    return _ExpertLinear.apply(x, weight, counts, offsets)


class GroupedExperts(MegatronModule):
    """Drop-in for megatron-core's SequentialMLP in MoELayer (same constructor, forward and state-dict names)."""

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None):
        super().__init__(config=config)
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        self.ep_group, self.tp_group, self.dp_group = pg_collection.ep, pg_collection.expt_tp, pg_collection.expt_dp
        tp = self.tp_group.size()
        if config.moe_ffn_hidden_size % tp:
            raise ValueError(f"expert ffn size {config.moe_ffn_hidden_size} is not divisible by the expert tensor "
                             f"parallel size {tp}; choose a tp dividing moe_intermediate_size")
        if config.add_bias_linear:
            raise ValueError("GroupedExperts has no expert biases (no supported MoE family uses them); "
                             "set add_bias_linear=False")
        self.num_local_experts = num_local_experts
        ffn, hidden = config.moe_ffn_hidden_size // tp, config.hidden_size
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight1 = torch.nn.Parameter(torch.empty(num_local_experts, 2 * ffn, hidden, dtype=config.params_dtype,
                                                      device=device))
        self.weight2 = torch.nn.Parameter(torch.empty(num_local_experts, hidden, ffn, dtype=config.params_dtype,
                                                      device=device))
        if config.perform_initialization:
            with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                for j in range(num_local_experts):
                    config.init_method(self.weight1.data[j])
                    config.output_layer_init_method(self.weight2.data[j])
        expert_parallel = config.expert_model_parallel_size > 1
        for weight, dim in ((self.weight1, 1), (self.weight2, 2)):
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)
            weight.allreduce = not expert_parallel

    def forward(self, hidden: torch.Tensor, tokens_per_expert, probs: torch.Tensor):
        """hidden [n, h] sorted by local expert, tokens_per_expert [E_local] (CPU from megatron-core's dispatchers,
        on the device from moe_dispatch's), probs [n] -> ([n, h], None)."""
        counts, offsets = None, None
        if use_grouped_mm(hidden):  # offsets on the device; GPU counts (moe_dispatch) are never read back
            counts_t = tokens_per_expert if torch.is_tensor(tokens_per_expert) else torch.tensor(tokens_per_expert)
            offsets = counts_t.to(hidden.device, non_blocking=True).cumsum(0, dtype=torch.int32)
        else:
            counts = [int(c) for c in (tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert)
                                       else tokens_per_expert)]
        h = grouped_linear(hidden, self.weight1, counts, offsets)  # [n, 2f]
        act = fused._fast(_swiglu_scaled, h)(h, probs)  # [n, f]
        return grouped_linear(act, self.weight2, counts, offsets), None  # [n, h]

    def backward_dw(self):  # MoELayer's delayed-wgrad hook: our weight gradients are never delayed
        pass

    # ----------------------------------------------------------------------- SequentialMLP's state-dict names
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for j in range(self.num_local_experts):
            for name, weight in zip(_NAMES, (self.weight1, self.weight2)):
                w = weight[j]
                destination[f"{prefix}local_experts.{j}.{name}.weight"] = w if keep_vars else w.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        whole = {f"{prefix}weight1": self.weight1, f"{prefix}weight2": self.weight2}  # from sharded_state_dict
        if all(k in state_dict for k in whole):
            for key, weight in whole.items():
                if tuple(state_dict[key].shape) != tuple(weight.shape):
                    error_msgs.append(f"{key}: shape {tuple(state_dict[key].shape)} in the checkpoint, "
                                      f"{tuple(weight.shape)} in the model")
                    continue
                with torch.no_grad():
                    weight.copy_(state_dict[key])
            return
        for j in range(self.num_local_experts):
            for name, weight in zip(_NAMES, (self.weight1, self.weight2)):
                key = f"{prefix}local_experts.{j}.{name}.weight"
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                value = state_dict[key]
                if tuple(value.shape) != tuple(weight.shape[1:]):
                    error_msgs.append(f"{key}: shape {tuple(value.shape)} in the checkpoint, "
                                      f"{tuple(weight.shape[1:])} in the model")
                    continue
                with torch.no_grad():
                    weight[j].copy_(value)
        known = {f"{prefix}local_experts.{j}.{n}.weight" for j in range(self.num_local_experts) for n in _NAMES}
        for key in state_dict:
            if key.startswith(prefix) and key not in known and not key.endswith("_extra_state"):
                unexpected_keys.append(key)

    # ----------------------------------------------------------------------- dist checkpointing (torch_dist)
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """SequentialMLP's distributed-checkpoint layout: `{prefix}experts.linear_fc1.weight` / `linear_fc2.weight`,
        each one global tensor [..., experts, rows, cols] (the expert axis after the layer axis, rows/cols split over
        expert TP, fc1 stored as its gate and up halves), so checkpoints reshard over ep/tp and load into either
        module. One sharded tensor per 3-D parameter (under the keys weight1/weight2, which _load_from_state_dict
        takes), so the optimizer's states map onto them; plus SequentialMLP's empty per-expert `_extra_state`."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
        from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

        if (metadata or {}).get("singleton_local_shards"):
            raise NotImplementedError("GroupedExperts: singleton_local_shards checkpoints are not supported; save "
                                      "with megatron-core's default (non-singleton) layout")
        p = len(sharded_offsets)  # prepended (virtual) axes, the layer axis; our expert axis is local axis 0
        expert_axis = (p, self.ep_group.rank(), self.ep_group.size())
        tp_rank, tp = self.tp_group.rank(), self.tp_group.size()
        replica = (0, 0, self.dp_group.rank())  # replicated over expert data parallelism only
        key = f"{prefix}experts."
        fc2 = ShardedTensor.from_rank_offsets(f"{key}linear_fc2.weight", self.weight2, *sharded_offsets, expert_axis,
                                              (p + 2, tp_rank, tp), replica_id=replica, prepend_axis_num=p)

        def split_gate_up(k, t, replica_id, flattened_range):
            gate, up = (half.contiguous() for half in torch.chunk(t, 2, dim=1))
            return [ShardedTensor.from_rank_offsets(k, half, *sharded_offsets, expert_axis, (p + 1, rank, 2 * tp),
                                                    replica_id=replica_id, prepend_axis_num=p)
                    for half, rank in ((gate, tp_rank), (up, tp_rank + tp))]

        def merge_gate_up(parts):
            return torch.cat(parts, dim=1)

        fc1 = ShardedTensorFactory(f"{key}linear_fc1.weight", self.weight1, split_gate_up, merge_gate_up, replica)
        out = {f"{prefix}weight1": fc1, f"{prefix}weight2": fc2}
        # SequentialMLP's linears also store an (empty) `_extra_state` object per expert: write and read the same
        n = self.num_local_experts
        for j in range(n):
            offsets = (*sharded_offsets, (p, self.ep_group.rank() * n + j, self.ep_group.size() * n))
            for name in _NAMES:
                out[f"{prefix}local_experts.{j}.{name}._extra_state"] = make_sharded_object_for_checkpoint(
                    None, f"{key}{name}._extra_state", offsets, replica_id=(0, tp_rank, self.dp_group.rank()))
        return out
