"""Mixture-of-Experts training: what an HF MoE config means for megatron-core, and the checks on expert parallelism.

Families (HF class -> behaviour megatune reproduces):
- `Qwen2MoeForCausalLM`: a shared expert with a sigmoid gate, dense layers via `decoder_sparse_step` /
  `mlp_only_layers`, top-k probabilities renormalised only when `norm_topk_prob`;
- `Qwen3MoeForCausalLM`: no shared expert, `norm_topk_prob` (true in the released checkpoints);
- `MixtralForCausalLM`: every layer sparse, top-k probabilities always renormalised (softmax over the top-k).

Routing is dropless (every token reaches its top-k experts; no capacity factor). The load-balancing loss is HF's
`load_balancing_loss_func` per micro-batch, over all MoE layers at once (moe_router.py explains how that is made
exact across pipeline stages and sequence-parallel shards); `router_aux_loss_coef` is its default coefficient.

Expert parallelism follows megatron-core: experts are split over `ep` ranks carved out of data parallelism
(expert tensor parallelism = tp, Megatron-LM's default), so the world size must be a multiple of tp x pp x ep.
The layer spec is moe_spec.py; the expert GEMMs are moe_experts.py.
"""

from __future__ import annotations

import dataclasses

from megatune.train.errors import TrainError

MOE_CLASSES = ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM")
DISPATCHERS = ("alltoall", "allgather")


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """The MoE facts of one HF config (HF names in comments)."""

    num_experts: int  # num_experts / num_local_experts
    topk: int  # num_experts_per_tok
    expert_ffn: int  # moe_intermediate_size (Qwen) / intermediate_size (Mixtral)
    dense_ffn: int  # intermediate_size of the dense layers
    shared_ffn: int | None  # shared_expert_intermediate_size (Qwen2-MoE)
    shared_gate: bool  # Qwen2-MoE's sigmoid gate on the shared expert
    norm_topk: bool  # renormalise the top-k probabilities (norm_topk_prob; always for Mixtral)
    layer_pattern: tuple[int, ...]  # 1 = MoE layer, 0 = dense MLP, per decoder layer
    aux_coeff: float  # router_aux_loss_coef

    @property
    def num_moe_layers(self) -> int:
        return sum(self.layer_pattern)


def is_moe(hf_config: dict) -> bool:
    return any(a in MOE_CLASSES for a in hf_config.get("architectures") or ())


def moe_shape(hf_config: dict, where: str = "config.json") -> MoEShape | None:
    """The MoEShape of an HF config dict, or None for a dense model."""
    arch = next((a for a in hf_config.get("architectures") or () if a in MOE_CLASSES), None)
    if arch is None:
        return None
    layers = int(hf_config["num_hidden_layers"])
    if arch == "MixtralForCausalLM":
        if float(hf_config.get("router_jitter_noise") or 0.0) > 0:
            raise TrainError(f"{where}: router_jitter_noise={hf_config['router_jitter_noise']} is not supported "
                             f"(HF jitters the experts' input too); set it to 0.0 in config.json")
        experts = int(hf_config.get("num_local_experts", 8))
        ffn = int(hf_config["intermediate_size"])
        return MoEShape(num_experts=experts, topk=int(hf_config.get("num_experts_per_tok", 2)), expert_ffn=ffn,
                        dense_ffn=ffn, shared_ffn=None, shared_gate=False, norm_topk=True,
                        layer_pattern=(1,) * layers, aux_coeff=float(hf_config.get("router_aux_loss_coef", 0.001)))
    experts = int(hf_config.get("num_experts", 60 if arch == "Qwen2MoeForCausalLM" else 128))
    step = int(hf_config.get("decoder_sparse_step", 1) or 1)
    dense_only = set(hf_config.get("mlp_only_layers") or ())
    pattern = tuple(int(i not in dense_only and experts > 0 and (i + 1) % step == 0) for i in range(layers))
    shared = hf_config.get("shared_expert_intermediate_size") if arch == "Qwen2MoeForCausalLM" else None
    return MoEShape(
        num_experts=experts, topk=int(hf_config.get("num_experts_per_tok", 8)),
        expert_ffn=int(hf_config["moe_intermediate_size"]), dense_ffn=int(hf_config["intermediate_size"]),
        shared_ffn=int(shared) if shared else None, shared_gate=bool(shared),
        norm_topk=bool(hf_config.get("norm_topk_prob", False)), layer_pattern=pattern,
        aux_coeff=float(hf_config.get("router_aux_loss_coef", 0.001)))


@dataclasses.dataclass(frozen=True)
class MoESettings:
    """Run-time MoE choices (flags), each defaulting to the checkpoint's HF config where it has one."""

    ep: int = 1
    topk: int | None = None  # --moe_router_topk; None: num_experts_per_tok
    aux_coeff: float | None = None  # --moe_aux_loss_coeff; None: router_aux_loss_coef
    z_coeff: float | None = None  # --moe_z_loss_coeff; None: no z-loss
    grouped_gemm: bool = True  # --moe_grouped_gemm: moe_experts.GroupedExperts, else megatron's SequentialMLP
    dispatcher: str = "alltoall"  # --moe_token_dispatcher_type


def check_expert_parallel(shape: MoEShape | None, *, ep: int, tp: int, pp: int, world_size: int,
                          topk: int | None = None, where: str = "config.json") -> None:
    """Every refusal about expert parallelism and routing, as one-line TrainErrors, before any process group."""
    if ep < 1:
        raise TrainError(f"--expert_model_parallel_size {ep}: must be >= 1")
    if shape is None:
        if ep > 1:
            raise TrainError(f"--expert_model_parallel_size {ep}: {where} describes a dense model (no experts); "
                             f"drop --ep or pass an MoE checkpoint")
        return
    if shape.num_experts % ep:
        raise TrainError(f"--expert_model_parallel_size {ep} does not divide the {shape.num_experts} experts of "
                         f"{where}; choose an ep that divides {shape.num_experts}")
    if world_size % (tp * pp * ep):
        raise TrainError(f"world size {world_size} is not divisible by tp x pp x ep = {tp}x{pp}x{ep}; launch a "
                         f"multiple of {tp * pp * ep} processes or change --tp/--pp/--ep")
    k = shape.topk if topk is None else topk
    if not 1 <= k <= shape.num_experts:
        raise TrainError(f"--moe_router_topk {k}: must be between 1 and the {shape.num_experts} experts of {where}")


def transformer_fields(shape: MoEShape, settings: MoESettings, *, tp: int) -> dict:
    """TransformerConfig fields for megatron-core's MoELayer. megatron-core's own load-balancing losses are off:
    moe_router.HFRouter adds HF's (and the z-loss) itself."""
    if settings.dispatcher not in DISPATCHERS:
        raise TrainError(f"--moe_token_dispatcher_type {settings.dispatcher!r}: use one of {', '.join(DISPATCHERS)} "
                         f"('flex' needs DeepEP, which megatune does not ship)")
    return dict(
        num_moe_experts=shape.num_experts, moe_router_topk=settings.topk or shape.topk,
        moe_ffn_hidden_size=shape.expert_ffn,
        moe_shared_expert_intermediate_size=shape.shared_ffn, moe_shared_expert_gate=shape.shared_gate,
        moe_layer_freq=list(shape.layer_pattern), moe_router_pre_softmax=not shape.norm_topk,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None,
        moe_token_dispatcher_type=settings.dispatcher, moe_grouped_gemm=False, moe_permute_fusion=False,
        moe_router_fusion=False, expert_model_parallel_size=settings.ep, expert_tensor_parallel_size=tp,
    )


def megatron_args(shape: MoEShape, settings: MoESettings) -> dict:
    """Megatron-LM's MoE arguments (`--num-experts ...` as argparse names) for a checkpoint's `args` and
    megatron_args.sh."""
    out = {"num_experts": shape.num_experts, "moe_router_topk": settings.topk or shape.topk,
           "moe_ffn_hidden_size": shape.expert_ffn,
           "moe_layer_freq": "[" + ",".join(map(str, shape.layer_pattern)) + "]",
           "moe_router_pre_softmax": not shape.norm_topk, "moe_token_dispatcher_type": settings.dispatcher,
           "moe_grouped_gemm": False, "expert_model_parallel_size": settings.ep,
           "moe_aux_loss_coeff": shape.aux_coeff if settings.aux_coeff is None else settings.aux_coeff,
           "moe_router_load_balancing_type": "aux_loss"}
    if shape.shared_ffn:
        out.update(moe_shared_expert_intermediate_size=shape.shared_ffn, moe_shared_expert_gate=shape.shared_gate)
    if settings.z_coeff:
        out["moe_z_loss_coeff"] = settings.z_coeff
    return out


def active_params_per_token(hf_config: dict) -> int | None:
    """Parameters one token passes through (attention + dense MLPs + top-k experts + shared expert + router),
    without embeddings; None for a dense model. MFU of an MoE model is counted on these."""
    shape = moe_shape(hf_config)
    if shape is None:
        return None
    h = int(hf_config["hidden_size"])
    heads = int(hf_config["num_attention_heads"])
    kv = int(hf_config.get("num_key_value_heads") or heads)
    d = int(hf_config.get("head_dim") or h // heads)
    attn = h * d * (heads + 2 * kv) + heads * d * h
    expert = 3 * h * shape.expert_ffn
    moe_layer = shape.topk * expert + h * shape.num_experts + (3 * h * shape.shared_ffn + h if shape.shared_ffn else 0)
    dense_layer = 3 * h * shape.dense_ffn
    return sum(attn + (moe_layer if m else dense_layer) for m in shape.layer_pattern)
