"""Architectures as declarative tables: which HF tensor maps to which Megatron-Core GPTModel parameter, how it is
split over tensor parallelism, and how the HF config translates to Megatron-LM arguments.

A Llama-like architecture is one `Architecture(...)` row in ARCHITECTURES; the converter has no per-model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatune.convert.errors import ConvertError
from megatune.convert.layout import COLUMN, FC1, REPLICATED, ROW, VOCAB


@dataclass(frozen=True)
class Param:
    """One Megatron parameter. `hf` holds HF names (per-layer ones relative to `model.layers.{i}.`);
    `fmt` says how several HF tensors merge into one ("qkv" interleave, "gate_up" concat)."""

    local: str  # megatron-core local-spec name
    hf: tuple[str, ...]
    kind: str
    fmt: str | None = None
    te: str | None = None  # Transformer Engine spec name, when it differs
    when: str | None = None  # Shape flag that must be true for the parameter to exist

    def name(self, naming: str) -> str:
        return self.te if naming == "te" and self.te else self.local


# Per decoder layer, relative to `decoder.layers.{i}.` / `model.layers.{i}.`.
LAYER_PARAMS: tuple[Param, ...] = (
    Param("input_layernorm.weight", ("input_layernorm.weight",), REPLICATED,
          te="self_attention.linear_qkv.layer_norm_weight"),
    Param("self_attention.linear_qkv.weight",
          ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), COLUMN, fmt="qkv"),
    Param("self_attention.linear_qkv.bias",
          ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), COLUMN, fmt="qkv",
          when="qkv_bias"),
    Param("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), REPLICATED, when="qk_norm"),
    Param("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), REPLICATED, when="qk_norm"),
    Param("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), ROW),
    Param("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), REPLICATED,
          te="mlp.linear_fc1.layer_norm_weight"),
    Param("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), FC1, fmt="gate_up"),
    Param("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), ROW),
)
EMBEDDING = Param("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB)
FINAL_NORM = Param("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED)
OUTPUT = Param("output_layer.weight", ("lm_head.weight",), VOCAB)
# With tied embeddings the last PP stage keeps its own copy of the embedding as output_layer.weight (pp > 1 only).
OUTPUT_TIED = Param("output_layer.weight", ("model.embed_tokens.weight",), VOCAB)


@dataclass(frozen=True)
class Architecture:
    name: str
    hf_class: str
    qkv_bias: bool | str  # always on (True), or the HF config key that switches it on
    qk_norm: bool = False
    # HF config class defaults that a config.json may omit
    defaults: dict[str, Any] = field(default_factory=dict)


ARCHITECTURES: dict[str, Architecture] = {a.hf_class: a for a in (
    Architecture("llama", "LlamaForCausalLM", qkv_bias="attention_bias"),  # Llama 2 and 3 (rope_scaling kept)
    Architecture("mistral", "MistralForCausalLM", qkv_bias=False),
    Architecture("qwen2", "Qwen2ForCausalLM", qkv_bias=True),
    Architecture("qwen3", "Qwen3ForCausalLM", qkv_bias="attention_bias", qk_norm=True, defaults={"head_dim": 128}),
)}

# (hf key, Megatron-LM argument): read in both directions.
CONFIG_PAIRS: tuple[tuple[str, str], ...] = (
    ("num_hidden_layers", "num_layers"),
    ("hidden_size", "hidden_size"),
    ("intermediate_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_key_value_heads", "num_query_groups"),
    ("head_dim", "kv_channels"),
    ("max_position_embeddings", "max_position_embeddings"),
    ("rms_norm_eps", "norm_epsilon"),
    ("vocab_size", "vocab_size"),
)


def architecture(hf_config: dict, where: str = "config.json") -> Architecture:
    names = hf_config.get("architectures") or []
    for n in names:
        if n in ARCHITECTURES:
            return ARCHITECTURES[n]
    raise ConvertError(
        f"{where}: unsupported architecture {names or '(none listed)'}; supported: {', '.join(ARCHITECTURES)} "
        f"(add a row to megatune.convert.arch.ARCHITECTURES for another Llama-like model)"
    )


@dataclass(frozen=True)
class Shape:
    """The numbers the layout needs, resolved from an HF config (class defaults filled in)."""

    layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.groups) * self.head_dim


def _get(hf_config: dict, arch: Architecture, key: str, default: Any = None) -> Any:
    value = hf_config.get(key)
    return value if value is not None else arch.defaults.get(key, default)


def shape_of(hf_config: dict) -> Shape:
    arch = architecture(hf_config)
    heads = hf_config["num_attention_heads"]
    bias = arch.qkv_bias if isinstance(arch.qkv_bias, bool) else bool(hf_config.get(arch.qkv_bias, False))
    return Shape(
        layers=hf_config["num_hidden_layers"],
        hidden=hf_config["hidden_size"],
        heads=heads,
        groups=_get(hf_config, arch, "num_key_value_heads", heads),
        head_dim=_get(hf_config, arch, "head_dim", hf_config["hidden_size"] // heads),
        ffn=hf_config["intermediate_size"],
        vocab=hf_config["vocab_size"],
        tied=bool(_get(hf_config, arch, "tie_word_embeddings", False)),
        qkv_bias=bias,
        qk_norm=arch.qk_norm,
    )


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


def check_parallel(shape: Shape, tp: int, where: str = "config.json") -> None:
    """Raise ConvertError when this shape cannot be split over tp (the constraints megatron-core asserts)."""
    problems = []
    if shape.heads % tp:
        problems.append(f"num_attention_heads={shape.heads} is not divisible by tp={tp}")
    if shape.groups % tp and tp % shape.groups:
        problems.append(f"num_key_value_heads={shape.groups} is neither a multiple nor a divisor of tp={tp}")
    elif shape.qkv_rows % tp:
        problems.append(f"fused QKV rows {shape.qkv_rows} are not divisible by tp={tp}")
    if shape.ffn % tp:
        problems.append(f"intermediate_size={shape.ffn} is not divisible by tp={tp}")
    if problems:
        raise ConvertError(f"{where}: cannot shard over tp={tp}: {'; '.join(problems)}; choose a tp that divides them")


def _resolved(hf_config: dict) -> dict:
    """The HF config with class defaults filled in, for the keys in CONFIG_PAIRS."""
    s = shape_of(hf_config)
    return {**hf_config, "num_key_value_heads": s.groups, "head_dim": s.head_dim,
            "max_position_embeddings": hf_config.get("max_position_embeddings", 4096),
            "rms_norm_eps": float(hf_config.get("rms_norm_eps", 1e-6))}


def megatron_model_args(hf_config: dict) -> dict:
    """HF config -> Megatron-LM model arguments (names as in Megatron-LM's argparse dests)."""
    s = shape_of(hf_config)
    theta, scaling = rope_of(hf_config)
    resolved = _resolved(hf_config)
    args = {meg: resolved[hf] for hf, meg in CONFIG_PAIRS}
    args.update({
        "group_query_attention": s.groups != s.heads,
        "position_embedding_type": "rope",
        "rotary_base": theta,
        "rope_scaling": scaling,
        "normalization": "RMSNorm",
        "swiglu": True,
        "add_qkv_bias": s.qkv_bias,
        "add_bias_linear": False,
        "qk_layernorm": s.qk_norm,
        "untie_embeddings_and_output_weights": not s.tied,
    })
    return args


def hf_config_values(megatron_args: dict) -> dict:
    """The reverse direction of CONFIG_PAIRS: Megatron-LM arguments -> HF config keys."""
    return {hf: megatron_args[meg] for hf, meg in CONFIG_PAIRS if meg in megatron_args}
