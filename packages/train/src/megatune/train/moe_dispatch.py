"""Token dispatch without a host synchronisation, for MoE layers whose experts all live on this rank.

With expert parallelism 1 and expert tensor parallelism 1 megatron-core's alltoall dispatcher exchanges nothing, but
it still stops the host on every MoE layer's forward: its permutation selects tokens with `masked_select` (the
output size is read back from the GPU) and it copies the per-expert token counts to the CPU for the experts. The
GPU then idles while the host launches the next kernels, once per layer and micro-batch (profiled on an H200:
BENCHMARKS.md, "MoE").

`LocalTokenDispatcher` computes the same permutation on the device from the router's map: each row of a dropless
top-k map holds exactly k experts, so the k expert ids of a token are `topk(map, k)` (fixed size), a stable sort of
the flattened ids gives megatron-core's order (expert-major, tokens ascending within an expert), the counts come from
a scatter-add, and the combine gathers each token's k rows back and sums them. GroupedExperts turns GPU counts into
grouped-GEMM offsets on the device. Nothing is read back, so the whole layer queues without waiting.

Both row movements are gathers in both directions. Autograd's backward of a row gather is an `index_add_` (atomic
adds, in bf16 one rounding per add; profiled at 0.55 ms per call, 53 ms of a 614 ms step on an H200), but each
movement here is a known permutation: the dispatch's backward gathers the permuted gradient back into token-major
order and sums each token's k rows (one rounding), the combine's backward gathers with the inverse permutation.

It plugs into megatron-core's MoELayer through its dispatcher interface (dispatch_preprocess ... combine_postprocess):
`use_local_dispatch(model)` swaps it in for the layers whose expert-parallel and expert-tensor-parallel groups both
have size 1 (elsewhere tokens must travel and megatron-core's dispatcher stays); build_model calls it for
`MoESettings.local_dispatch`.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher


class _Dispatch(torch.autograd.Function):
    """rows[r] = hidden[source[r]] (source = the token of each expert-ordered row); backward: each token's k
    gradient rows, gathered in token-major order through `restore`, summed."""

    @staticmethod
    def forward(ctx, hidden, source, restore, k):
        ctx.save_for_backward(restore)
        ctx.k = k
        return hidden.index_select(0, source)

    @staticmethod
    def backward(ctx, grad):
        (restore,) = ctx.saved_tensors
        return grad.index_select(0, restore).view(-1, ctx.k, grad.shape[-1]).sum(dim=1), None, None, None


class _Permute(torch.autograd.Function):
    """out = rows.index_select(0, index) for a permutation `index` whose inverse is `inverse`; backward gathers with
    the inverse."""

    @staticmethod
    def forward(ctx, rows, index, inverse):
        ctx.save_for_backward(inverse)
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class LocalTokenDispatcher(MoETokenDispatcher):
    """Dispatch/combine for a rank that holds every expert of its layer and shares its tokens with no other rank."""

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        if self.tp_size != 1 or self.ep_size != 1:
            raise ValueError(f"LocalTokenDispatcher needs expert-parallel and expert-tensor-parallel size 1, got "
                             f"ep={self.ep_size}, expert tp={self.tp_size}")
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        if config.moe_expert_capacity_factor is not None:
            raise ValueError("LocalTokenDispatcher is dropless; moe_expert_capacity_factor must be None")

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        """[s, b, h] tokens, [n, E] bool map with k experts a row, [n, E] probs -> tokens and probs in expert order."""
        self.hidden_shape = hidden_states.shape
        hidden = hidden_states.reshape(-1, self.hidden_shape[-1])
        k = self.topk
        experts = routing_map.to(probs.dtype).topk(k, dim=1, sorted=False).indices  # [n, k], no host sync
        flat = experts.reshape(-1)  # token-major: token t's experts at t*k .. t*k+k-1
        order = torch.argsort(flat, stable=True)  # expert-major, tokens ascending within an expert
        source = torch.div(order, k, rounding_mode="floor")  # the token of each permuted row
        self.order = order  # permuted row -> token-major slot
        self.restore = torch.empty_like(order)
        self.restore[order] = torch.arange(order.numel(), device=order.device)  # token-major slot -> permuted row
        self.tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        permuted_probs = _Permute.apply(probs.gather(1, experts).reshape(-1), order, self.restore)
        return _Dispatch.apply(hidden, source, self.restore, k), permuted_probs

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        return hidden_states, probs  # nothing to exchange

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        return hidden_states, self.tokens_per_expert, probs  # counts stay on the device

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def token_combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n*k, h] expert outputs (already scaled by their probs) -> each token's sum over its k experts."""
        n = hidden_states.shape[0] // self.topk
        out = _Permute.apply(hidden_states, self.restore, self.order).view(n, self.topk, -1).sum(dim=1)
        return out.view(self.hidden_shape)


def use_local_dispatch(model) -> int:
    """Give every MoELayer of `model` whose tokens stay on this rank (ep = expert tp = 1) a LocalTokenDispatcher in
    place of megatron-core's; returns how many layers changed. Call after building, before the first forward."""
    changed = 0
    for module in model.modules():
        dispatcher = getattr(module, "token_dispatcher", None)
        if isinstance(module, MoELayer) and dispatcher.ep_size == 1 and dispatcher.tp_size == 1:
            module.token_dispatcher = LocalTokenDispatcher(module.config, pg_collection=SimpleNamespace(
                ep=dispatcher.ep_group, expt_tp=dispatcher.tp_group, tp_ep=dispatcher.tp_ep_group))
            changed += 1
    return changed
