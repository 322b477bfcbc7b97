"""HF config <-> Megatron-LM arguments, read from the family rows (families.py), and the parallel-size checks.

The rows themselves (parameters, config pairs, norm/activation, layer spec) live in `megatune.convert.families`;
this module translates them. Names kept for callers: LAYER_PARAMS (the dense decoder layer), CONFIG_PAIRS,
ARCHITECTURES / architecture() (the rows by HF class), Shape / shape_of.
"""

from __future__ import annotations

from megatune.convert.errors import ConvertError
from megatune.convert.families import (
    COMMON_PAIRS,
    DENSE_LAYER,
    EMBEDDING,
    FAMILIES,
    FINAL_NORM,
    OUTPUT,
    OUTPUT_TIED,
    ModelFamily,
    Param,
    Shape,
    config_value,
    family_of,
    shape_of,
)

__all__ = ["LAYER_PARAMS", "CONFIG_PAIRS", "ARCHITECTURES", "EMBEDDING", "FINAL_NORM", "OUTPUT", "OUTPUT_TIED",
           "ModelFamily", "Param", "Shape", "architecture", "shape_of", "rope_of", "check_parallel",
           "megatron_model_args", "hf_config_values"]

LAYER_PARAMS: tuple[Param, ...] = DENSE_LAYER
CONFIG_PAIRS = COMMON_PAIRS
ARCHITECTURES: dict[str, ModelFamily] = FAMILIES
architecture = family_of


def rope_of(hf_config: dict) -> tuple[float, dict | None]:
    """(rope theta, HF rope-scaling dict or None); transformers 5 nests both in `rope_parameters`."""
    params = hf_config.get("rope_parameters") or {}
    theta = hf_config.get("rope_theta") or params.get("rope_theta") or 10000.0
    scaling = hf_config.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(theta), scaling


def check_parallel(shape: Shape, tp: int, where: str = "config.json", ep: int = 1) -> None:
    """Raise ConvertError when this shape cannot be split over tp (and ep): the constraints megatron-core asserts."""
    problems = []
    if shape.heads % tp:
        problems.append(f"num_attention_heads={shape.heads} is not divisible by tp={tp}")
    if shape.groups % tp and tp % shape.groups:
        problems.append(f"num_key_value_heads={shape.groups} is neither a multiple nor a divisor of tp={tp}")
    elif shape.qkv_rows % tp:
        problems.append(f"fused QKV rows {shape.qkv_rows} are not divisible by tp={tp}")
    if shape.ffn % tp:
        problems.append(f"intermediate_size={shape.ffn} is not divisible by tp={tp}")
    if shape.expert_ffn % tp:  # expert tensor parallelism = tp (megatron-core's default)
        problems.append(f"expert intermediate size {shape.expert_ffn} is not divisible by tp={tp}")
    if shape.shared_ffn % tp:
        problems.append(f"shared_expert_intermediate_size={shape.shared_ffn} is not divisible by tp={tp}")
    if problems:
        raise ConvertError(f"{where}: cannot shard over tp={tp}: {'; '.join(problems)}; choose a tp that divides them")
    if ep < 1 or (ep > 1 and (not shape.experts or shape.experts % ep)):
        have = f"{shape.experts} experts" if shape.experts else "no experts (a dense model)"
        raise ConvertError(f"{where}: cannot split {have} over ep={ep}; choose an ep that divides the expert count"
                           f"{'' if shape.experts else ' (ep=1 for a dense model)'}")


def megatron_model_args(hf_config: dict) -> dict:
    """HF config -> Megatron-LM model arguments (names as in Megatron-LM's argparse dests), from the family row."""
    fam, s = family_of(hf_config), shape_of(hf_config)
    theta, scaling = rope_of(hf_config)
    derived = {"num_key_value_heads": s.groups, "head_dim": s.head_dim, "intermediate_size": s.ffn}
    args = {meg: derived[hf] if hf in derived else config_value(hf_config, fam, hf) for hf, meg in fam.config_pairs}
    args["norm_epsilon"] = float(args["norm_epsilon"])
    args.update({
        "group_query_attention": s.groups != s.heads,
        "position_embedding_type": "rope",
        "rotary_base": theta,
        "rope_scaling": scaling,
        "normalization": fam.normalization,
        "swiglu": fam.activation == "swiglu",
        "add_qkv_bias": s.qkv_bias,
        "add_bias_linear": False,
        "qk_layernorm": s.qk_norm,
        "untie_embeddings_and_output_weights": not s.tied,
    })
    if s.experts:
        args.update({
            "moe_ffn_hidden_size": s.expert_ffn,
            "moe_shared_expert_intermediate_size": s.shared_ffn or None,
            "moe_shared_expert_gate": s.shared_gate,
            "moe_layer_freq": [int(m) for m in s.moe_layers],
            "moe_router_pre_softmax": not s.norm_topk,  # softmax over all experts, top-k kept unnormalised
            "moe_grouped_gemm": False,  # sequential local experts: the parameter names converted here
        })
    return args


def hf_config_values(megatron_args: dict, hf_config: dict | None = None) -> dict:
    """The reverse direction of the config pairs: Megatron-LM arguments -> HF config keys (the family's pairs when
    an HF config names the family, else the pairs every family shares)."""
    pairs = family_of(hf_config).config_pairs if hf_config else COMMON_PAIRS
    return {hf: megatron_args[meg] for hf, meg in pairs if meg in megatron_args}
