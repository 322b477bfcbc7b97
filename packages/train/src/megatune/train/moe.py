"""Mixture-of-Experts training: the run-time MoE choices, their checks, and what they mean for megatron-core.

The model facts (experts, top-k, expert / shared-expert sizes, which layers are sparse, top-k renormalisation,
shared-expert gate, router_aux_loss_coef) come from the model's family row in megatune.convert.families; this
module adds the choices a run makes (`MoESettings`, from the `--expert_model_parallel_size/--moe_*` flags, each
unset flag defaulting to the checkpoint's HF config) and refuses what cannot run.

Families (HF class -> behaviour megatune reproduces):
- `Qwen2MoeForCausalLM`: a shared expert with a sigmoid gate, dense layers via `decoder_sparse_step` /
  `mlp_only_layers`, top-k probabilities renormalised only when `norm_topk_prob`;
- `Qwen3MoeForCausalLM`: no shared expert, `norm_topk_prob` (true in the released checkpoints);
- `MixtralForCausalLM`: every layer sparse, top-k probabilities always renormalised (softmax over the top-k).

Routing is dropless (every token reaches its top-k experts; no capacity factor). The load-balancing loss is HF's
`load_balancing_loss_func` per micro-batch over all MoE layers at once (moe_router.py explains how it is made exact
across pipeline stages and sequence-parallel shards). Expert parallelism follows megatron-core: experts are split
over `ep` ranks carved out of data parallelism, with expert tensor parallelism = tp (Megatron-LM's default), so the
world size must be a multiple of tp x pp x ep. The layer spec is moe_spec.py; the expert GEMMs moe_experts.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatune.train.errors import TrainError

DISPATCHERS = ("alltoall", "allgather")


@dataclasses.dataclass(frozen=True)
class MoESettings:
    """A run's MoE choices; None = the checkpoint's HF config (`resolve`)."""

    ep: int = 1  # --expert_model_parallel_size / --ep
    topk: int | None = None  # --moe_router_topk; None: num_experts_per_tok
    aux_coeff: float | None = None  # --moe_aux_loss_coeff; None: router_aux_loss_coef
    z_coeff: float | None = None  # --moe_z_loss_coeff; None: no z-loss
    grouped_gemm: bool = True  # --moe_grouped_gemm: moe_experts.GroupedExperts, else megatron-core's SequentialMLP
    dispatcher: str = "alltoall"  # --moe_token_dispatcher_type
    # moe_dispatch.LocalTokenDispatcher where no tokens travel (ep = expert tp = 1, whichever dispatcher is named):
    # the same numbers without a host sync a layer; 1x H200, Qwen3-30B-A3B shape, 8 micro-batches: 42.2k -> 53.3k
    # tokens/s (BENCHMARKS.md, "MoE"). False keeps megatron-core's dispatcher there (for comparisons).
    local_dispatch: bool = True

    @classmethod
    def from_args(cls, args: Any) -> MoESettings:
        """From Megatron-LM-named arguments (argmap's MegatronArguments, a checkpoint's args); missing = default."""
        get = getattr if not isinstance(args, dict) else (lambda a, k, d: a.get(k, d))
        return cls(ep=int(get(args, "expert_model_parallel_size", 1) or 1), topk=get(args, "moe_router_topk", None),
                   aux_coeff=get(args, "moe_aux_loss_coeff", None), z_coeff=get(args, "moe_z_loss_coeff", None),
                   grouped_gemm=bool(get(args, "moe_grouped_gemm", True)),
                   dispatcher=get(args, "moe_token_dispatcher_type", None) or "alltoall")

    def resolve(self, hf_config: dict) -> MoESettings:
        """Unset top-k / aux coefficient filled from the HF config (the family row's pairs)."""
        from megatune.convert.arch import megatron_model_args

        a = megatron_model_args(hf_config)
        return dataclasses.replace(self, topk=self.topk or int(a["moe_router_topk"]),
                                   aux_coeff=float(a["moe_aux_loss_coeff"]) if self.aux_coeff is None
                                   else float(self.aux_coeff))


def moe_shape(hf_config: dict, where: str = "config.json"):
    """convert's Shape of an MoE HF config (experts, topk, expert_ffn, shared_ffn, norm_topk, moe_layers ...), or
    None for a dense model. Refuses what megatune cannot reproduce."""
    from megatune.convert.errors import ConvertError
    from megatune.convert.families import shape_of

    try:
        shape = shape_of(hf_config, where)
    except ConvertError as e:
        raise TrainError(str(e)) from None
    if not shape.experts:
        return None
    if float(hf_config.get("router_jitter_noise") or 0.0) > 0:
        raise TrainError(f"{where}: router_jitter_noise={hf_config['router_jitter_noise']} is not supported (HF "
                         f"jitters the experts' input as well as the router's); set it to 0.0 in config.json")
    return shape


def check_expert_parallel(shape, settings: MoESettings, *, tp: int, pp: int, world_size: int,
                          where: str = "config.json") -> None:
    """Every refusal about expert parallelism and routing, as one-line TrainErrors, before any process group."""
    ep = settings.ep
    if ep < 1:
        raise TrainError(f"--expert_model_parallel_size {ep}: must be >= 1")
    if shape is None:
        if ep > 1:
            raise TrainError(f"--expert_model_parallel_size {ep}: {where} describes a dense model (no experts); "
                             f"drop --expert_model_parallel_size or pass an MoE checkpoint")
        return
    if shape.experts % ep:
        raise TrainError(f"--expert_model_parallel_size {ep} does not divide the {shape.experts} experts of {where}; "
                         f"choose an ep that divides {shape.experts}")
    if world_size % (tp * pp * ep):
        raise TrainError(f"world size {world_size} is not divisible by tp x pp x ep = {tp}x{pp}x{ep}; launch a "
                         f"multiple of {tp * pp * ep} processes or change --tp/--pp/--expert_model_parallel_size")
    k = settings.topk or shape.topk
    if not 1 <= k <= shape.experts:
        raise TrainError(f"--moe_router_topk {k}: must be between 1 and the {shape.experts} experts of {where}")
    if settings.dispatcher not in DISPATCHERS:
        raise TrainError(f"--moe_token_dispatcher_type {settings.dispatcher!r}: use one of {', '.join(DISPATCHERS)} "
                         f"('flex' needs DeepEP, which megatune does not ship)")
    if settings.dispatcher == "allgather" and ep > 1:
        # megatron-core's allgather dispatcher gathers equal token counts from every ep rank, but data-parallel
        # ranks draw batches of their own (padded) length
        raise TrainError(f"--moe_token_dispatcher_type allgather needs the same sequence length on every expert-"
                         f"parallel rank, which megatune's batches do not guarantee; use alltoall with "
                         f"--expert_model_parallel_size {ep}")


def transformer_fields(shape, settings: MoESettings, *, tp: int) -> dict:
    """TransformerConfig fields for megatron-core's MoELayer. megatron-core's own load-balancing losses are off:
    moe_router.HFRouter adds HF's (and the z-loss) itself."""
    return dict(
        num_moe_experts=shape.experts, moe_router_topk=settings.topk or shape.topk,
        moe_ffn_hidden_size=shape.expert_ffn, moe_shared_expert_intermediate_size=shape.shared_ffn or None,
        moe_shared_expert_gate=shape.shared_gate, moe_layer_freq=[int(m) for m in shape.moe_layers],
        moe_router_pre_softmax=not shape.norm_topk, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=None, moe_token_dispatcher_type=settings.dispatcher, moe_grouped_gemm=False,
        moe_permute_fusion=False, moe_router_fusion=False, expert_model_parallel_size=settings.ep,
        expert_tensor_parallel_size=tp,
    )
