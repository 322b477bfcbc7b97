"""megatune's native (no Transformer Engine) layer spec for MoE models, and its wiring into a GPTModel chunk.

A sparse layer is spec.py's native layer with its MLP replaced by megatron-core's `MoELayer`:
- router: moe_router.HFRouter (HF's top-k / normalisation, HF's load-balancing loss, z-loss);
- token dispatcher: megatron-core's alltoall (default; all-to-all over EP, all-gather / reduce-scatter over TP) or
  allgather, chosen by `moe_token_dispatcher_type`; where no tokens travel (ep = expert tp = 1) build_model swaps in
  moe_dispatch.LocalTokenDispatcher (same numbers, no host synchronisation);
- experts: moe_experts.GroupedExperts (grouped GEMMs) or megatron-core's SequentialMLP, both named
  `mlp.experts.local_experts.{j}.linear_fc1/linear_fc2.weight`;
- shared expert (Qwen2-MoE): megatron-core's SharedExpertMLP with its sigmoid gate (`mlp.shared_experts.*`,
  `mlp.shared_experts.gate_weight`).
Dense layers (Qwen's `mlp_only_layers` / `decoder_sparse_step`) keep the plain native layer; the pattern is
`config.moe_layer_freq` (a list, one entry per layer).

`attach(model, book)` hooks the decoder so the MoEBook sees each micro-batch start and each backward begin
(moe_router.py), and opens the pipeline side channel the aux-loss counts travel on.

CPU mode: moe_cpu.enable() lets megatron-core's alltoall dispatcher run without CUDA (see there).
"""

from __future__ import annotations

import copy
import functools

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
    get_transformer_layer_offset,
)
from megatune.train import moe_cpu
from megatune.train.moe_experts import GroupedExperts
from megatune.train.moe_router import HFRouter, MoEBook, StageSync
from megatune.train.policy import active as active_policy
from megatune.train.spec import native_layer_spec, norm_module


def moe_layer_spec(qk_layernorm: bool, *, book: MoEBook, grouped_gemm: bool,
                   normalization: str = "RMSNorm") -> ModuleSpec:
    """spec.native_layer_spec with megatron-core's MoELayer (our router, experts and shared expert) as its MLP."""
    spec = copy.deepcopy(native_layer_spec(qk_layernorm, normalization))
    mlp = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    experts = ModuleSpec(module=GroupedExperts) if grouped_gemm else ModuleSpec(module=SequentialMLP, submodules=mlp)
    spec.submodules.mlp = ModuleSpec(
        module=MoELayer,
        submodules=MoESubmodules(experts=experts, shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=mlp),
                                 router=functools.partial(HFRouter, book=book)))
    return spec


def moe_block_spec(config, qk_layernorm: bool, *, book: MoEBook, grouped_gemm: bool,
                   vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """This PP stage's layers: sparse or dense by config.moe_layer_freq, final norm of the family's kind."""
    pattern = config.moe_layer_freq
    if not isinstance(pattern, list) or len(pattern) != config.num_layers:
        raise ValueError(f"moe_layer_freq must be a list of {config.num_layers} 0/1 entries, got {pattern!r}")
    if active_policy().device_type == "cpu":
        moe_cpu.enable()
    dense = native_layer_spec(qk_layernorm, config.normalization)
    sparse = moe_layer_spec(qk_layernorm, book=book, grouped_gemm=grouped_gemm, normalization=config.normalization)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[sparse if pattern[offset + i] else dense for i in range(n)],
                                      layer_norm=norm_module(config.normalization))


def moe_block(config, shape, settings, qk_layernorm: bool) -> tuple[TransformerBlockSubmodules, MoEBook]:
    """The block spec of this stage and the MoEBook its routers report to (attach it after building the model)."""
    book = MoEBook(num_experts=shape.experts, topk=config.moe_router_topk, norm_topk=shape.norm_topk,
                   num_layers=config.num_layers, moe_layers=sum(shape.moe_layers), aux_coeff=settings.aux_coeff,
                   z_coeff=settings.z_coeff, sequence_parallel=config.sequence_parallel, device=active_policy().device)
    return moe_block_spec(config, qk_layernorm, book=book, grouped_gemm=settings.grouped_gemm), book


def attach(model, book: MoEBook) -> None:
    """Hook `model.decoder` (a GPTModel chunk built with moe_block_spec) into `book`; call on every rank."""

    def open_record(module, args, kwargs):
        book.forward_record = book.open_record() if module.training and torch.is_grad_enabled() else None

    def sync_output(module, args, kwargs, output):
        rec = book.forward_record
        if rec is None:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        book.close_record(rec, hidden)
        hidden = StageSync.apply(hidden, book, rec)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    model.decoder.register_forward_pre_hook(open_record, with_kwargs=True)
    model.decoder.register_forward_hook(sync_output, with_kwargs=True)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        book.side_group = pipeline_side_group()
    model.megatune_moe_book = book


_SIDE_GROUPS: dict = {}


def pipeline_side_group():
    """A gloo process group over this rank's pipeline ranks for the aux-loss counts (collective: every rank calls
    it, once per layout)."""
    dist = torch.distributed
    mine = tuple(dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()))
    key = (id(dist.group.WORLD), mine)  # groups die with the default group: one cache entry per process group
    if key not in _SIDE_GROUPS:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        for ranks in sorted(set(everyone)):
            group = dist.new_group(list(ranks), backend="gloo")
            if ranks == mine:
                _SIDE_GROUPS[key] = group
    return _SIDE_GROUPS[key]

