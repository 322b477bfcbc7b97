"""Model families as data: one `ModelFamily` row per HF architecture.

A row declares the parameters (Megatron name, HF names with their shape rules, split kind, merge, presence
condition, expert axis), the HF <-> Megatron config pairs (read in both directions), the class defaults a
config.json may omit, the norm and activation names and the layer-spec name. The converter, the train model
builder, the metrics and the LoRA targets read these rows; adding a Llama-like family is one row.

HF shape rules name `Shape` attributes (or give literal sizes), so every HF tensor's shape comes from the row.
Per-layer names are relative to `model.layers.{i}.` / `decoder.layers.{i}.`; in expert parameters `{e}` is the
global expert index (HF) and `{j}` the expert's index on its expert-parallel rank (Megatron).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from megatune.convert.errors import ConvertError
from megatune.convert.splits import COLUMN, FC1, GATE_UP, QKV, REPLICATED, ROW, SINGLE, VOCAB, Merge, SplitKind


@dataclass(frozen=True)
class Param:
    """One Megatron parameter. `hf` holds HF names, `dims` their shape rules (Shape attribute names or sizes);
    `fmt` says how several HF tensors merge into one (splits.QKV interleave, splits.GATE_UP stack)."""

    local: str  # megatron-core local-spec name
    hf: tuple[str, ...]
    kind: SplitKind
    dims: tuple[tuple[str | int, ...], ...]
    fmt: Merge = SINGLE
    te: str | None = None  # Transformer Engine spec name, when it differs
    when: str | None = None  # Shape flag that must be true for the parameter to exist
    layers: str | None = None  # "dense" / "moe": only in decoder layers with that MLP (None: every layer)
    expert: bool = False  # one per routed expert, on the expert-parallel rank that owns the expert

    def name(self, naming: str) -> str:
        return self.te if naming == "te" and self.te else self.local


def _attention(*, te_norm: bool = True) -> tuple[Param, ...]:
    return (
        Param("input_layernorm.weight", ("input_layernorm.weight",), REPLICATED, (("hidden",),),
              te="self_attention.linear_qkv.layer_norm_weight" if te_norm else None),
        Param("self_attention.linear_qkv.weight",
              ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), COLUMN,
              (("q_rows", "hidden"), ("kv_rows", "hidden"), ("kv_rows", "hidden")), fmt=QKV),
        Param("self_attention.linear_qkv.bias",
              ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), COLUMN,
              (("q_rows",), ("kv_rows",), ("kv_rows",)), fmt=QKV, when="qkv_bias"),
        Param("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), REPLICATED, (("head_dim",),),
              when="qk_norm"),
        Param("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), REPLICATED, (("head_dim",),),
              when="qk_norm"),
        Param("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), ROW, (("hidden", "q_rows"),)),
    )


def _dense_mlp(layers: str | None = None) -> tuple[Param, ...]:
    return (
        Param("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), REPLICATED, (("hidden",),),
              te="mlp.linear_fc1.layer_norm_weight", layers=layers),
        Param("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), FC1,
              (("ffn", "hidden"), ("ffn", "hidden")), fmt=GATE_UP, layers=layers),
        Param("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), ROW, (("hidden", "ffn"),), layers=layers),
    )


def _moe_mlp(moe: str, gate: str, up: str, down: str, shared: bool) -> tuple[Param, ...]:
    """A megatron-core MoE layer (router, SequentialMLP experts, optional gated shared expert). `moe` is the HF
    block's prefix, gate/up/down the HF expert projection names."""
    experts = "mlp.experts.local_experts.{j}"
    out = (
        Param("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), REPLICATED, (("hidden",),),
              layers="moe"),  # the MoE spec keeps a separate norm (TE too: no fused norm+fc1)
        Param("mlp.router.weight", (f"{moe}.gate.weight",), REPLICATED, (("experts", "hidden"),), layers="moe"),
        Param(f"{experts}.linear_fc1.weight",
              (f"{moe}.experts.{{e}}.{gate}.weight", f"{moe}.experts.{{e}}.{up}.weight"), FC1,
              (("expert_ffn", "hidden"), ("expert_ffn", "hidden")), fmt=GATE_UP, layers="moe", expert=True),
        Param(f"{experts}.linear_fc2.weight", (f"{moe}.experts.{{e}}.{down}.weight",), ROW, (("hidden", "expert_ffn"),),
              layers="moe", expert=True),
    )
    if shared:
        out += (
            Param("mlp.shared_experts.gate_weight", (f"{moe}.shared_expert_gate.weight",), REPLICATED, ((1, "hidden"),),
                  layers="moe", when="shared_gate"),
            Param("mlp.shared_experts.linear_fc1.weight",
                  (f"{moe}.shared_expert.gate_proj.weight", f"{moe}.shared_expert.up_proj.weight"), FC1,
                  (("shared_ffn", "hidden"), ("shared_ffn", "hidden")), fmt=GATE_UP, layers="moe"),
            Param("mlp.shared_experts.linear_fc2.weight", (f"{moe}.shared_expert.down_proj.weight",), ROW,
                  (("hidden", "shared_ffn"),), layers="moe"),
        )
    return out


DENSE_LAYER = _attention() + _dense_mlp()
EMBEDDING = Param("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB, (("vocab", "hidden"),))
FINAL_NORM = Param("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED, (("hidden",),))
OUTPUT = Param("output_layer.weight", ("lm_head.weight",), VOCAB, (("vocab", "hidden"),))
# With tied embeddings the last PP stage keeps its own copy of the embedding as output_layer.weight (pp > 1 only).
OUTPUT_TIED = Param("output_layer.weight", ("model.embed_tokens.weight",), VOCAB, (("vocab", "hidden"),))

# (hf key, Megatron-LM argument) of every family; read in both directions.
COMMON_PAIRS: tuple[tuple[str, str], ...] = (
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
QWEN_MOE_PAIRS = (("num_experts", "num_experts"), ("num_experts_per_tok", "moe_router_topk"),
                  ("moe_intermediate_size", "moe_ffn_hidden_size"), ("router_aux_loss_coef", "moe_aux_loss_coeff"))
# Keys a config.json may omit: class defaults of every family (the row's `defaults` add its own).
COMMON_DEFAULTS = {"max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def every_layer(hf_config: dict, layers: int) -> tuple[bool, ...]:
    return (True,) * layers


def qwen_sparse_layers(hf_config: dict, layers: int) -> tuple[bool, ...]:
    """transformers' Qwen2/3-MoE decoder layer: sparse unless listed in mlp_only_layers or off decoder_sparse_step."""
    step = int(hf_config.get("decoder_sparse_step") or 1)
    dense = set(hf_config.get("mlp_only_layers") or ())
    experts = int(hf_config.get("num_experts") or 0)
    return tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(layers))


@dataclass(frozen=True)
class ModelFamily:
    name: str
    hf_class: str
    model_type: str  # HF config `model_type`
    layer_params: tuple[Param, ...]
    qkv_bias: bool | str  # always on (True), or the HF config key that switches it on
    qk_norm: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)  # HF config class defaults a config.json may omit
    config_pairs: tuple[tuple[str, str], ...] = COMMON_PAIRS
    normalization: str = "RMSNorm"
    activation: str = "swiglu"  # gated SiLU MLP (fc1 = [gate; up])
    layer_spec: str = "gpt"  # "gpt" (dense decoder layers) or "gpt_moe" (megatron-core MoE layers, SequentialMLP)
    sparse_layers: Callable[[dict, int], tuple[bool, ...]] | None = None  # which layers are MoE (None: dense model)
    norm_topk: bool | str = False  # top-k probabilities renormalised: always (True) or the HF config key
    shared_gate: bool = False  # the shared expert's output goes through a sigmoid gate

    @property
    def params(self) -> tuple[Param, ...]:
        return (EMBEDDING, *self.layer_params, FINAL_NORM, OUTPUT, OUTPUT_TIED)


_QWEN2_MOE_LAYER = _attention() + _dense_mlp("dense") + _moe_mlp("mlp", "gate_proj", "up_proj", "down_proj", True)
FAMILIES: dict[str, ModelFamily] = {f.hf_class: f for f in (
    ModelFamily("llama", "LlamaForCausalLM", "llama", DENSE_LAYER, qkv_bias="attention_bias"),  # Llama 2 and 3
    ModelFamily("mistral", "MistralForCausalLM", "mistral", DENSE_LAYER, qkv_bias=False),
    ModelFamily("qwen2", "Qwen2ForCausalLM", "qwen2", DENSE_LAYER, qkv_bias=True),
    ModelFamily("qwen3", "Qwen3ForCausalLM", "qwen3", DENSE_LAYER, qkv_bias="attention_bias", qk_norm=True,
                defaults={"head_dim": 128}),
    ModelFamily("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe", _QWEN2_MOE_LAYER, qkv_bias="qkv_bias",
                defaults={"qkv_bias": True, "router_aux_loss_coef": 0.001},
                config_pairs=COMMON_PAIRS + QWEN_MOE_PAIRS + (
                    ("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size"),),
                layer_spec="gpt_moe", sparse_layers=qwen_sparse_layers, norm_topk="norm_topk_prob", shared_gate=True),
    ModelFamily("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe",
                _attention() + _dense_mlp("dense") + _moe_mlp("mlp", "gate_proj", "up_proj", "down_proj", False),
                qkv_bias="attention_bias", qk_norm=True, defaults={"router_aux_loss_coef": 0.001},
                config_pairs=COMMON_PAIRS + QWEN_MOE_PAIRS, layer_spec="gpt_moe", sparse_layers=qwen_sparse_layers,
                norm_topk="norm_topk_prob"),
    ModelFamily("mixtral", "MixtralForCausalLM", "mixtral",
                _attention() + _moe_mlp("block_sparse_moe", "w1", "w3", "w2", False), qkv_bias=False,
                defaults={"rms_norm_eps": 1e-5, "router_aux_loss_coef": 0.001},
                config_pairs=COMMON_PAIRS + (
                    ("num_local_experts", "num_experts"), ("num_experts_per_tok", "moe_router_topk"),
                    ("intermediate_size", "moe_ffn_hidden_size"), ("router_aux_loss_coef", "moe_aux_loss_coeff")),
                layer_spec="gpt_moe", sparse_layers=every_layer, norm_topk=True),
)}
BY_NAME: dict[str, ModelFamily] = {f.name: f for f in FAMILIES.values()}


def family_of(hf_config: dict, where: str = "config.json") -> ModelFamily:
    names = hf_config.get("architectures") or []
    for n in names:
        if n in FAMILIES:
            return FAMILIES[n]
    raise ConvertError(
        f"{where}: unsupported architecture {names or '(none listed)'}; supported: {', '.join(FAMILIES)} "
        f"(add a ModelFamily row to megatune.convert.families.FAMILIES for another Llama-like model)"
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
    family: str = "llama"  # ModelFamily.name: which parameters exist
    experts: int = 0  # routed experts (0: dense model)
    topk: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0  # shared expert's intermediate size (0: none)
    shared_gate: bool = False
    norm_topk: bool = False
    moe_layers: tuple[bool, ...] = ()  # per layer: True = MoE MLP (empty: every layer dense)

    @property
    def q_rows(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_rows(self) -> int:
        return self.groups * self.head_dim

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.groups) * self.head_dim

    @property
    def row(self) -> ModelFamily:
        return BY_NAME[self.family]

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer]

    def dims(self, rule: tuple[str | int, ...]) -> tuple[int, ...]:
        """An HF shape rule of the family row -> the shape."""
        return tuple(d if isinstance(d, int) else getattr(self, d) for d in rule)


def config_value(hf_config: dict, family: ModelFamily, key: str, where: str = "config.json",
                 default: Any = ConvertError) -> Any:
    """hf_config[key], else the family's (or every family's) class default, else `default`; a missing required
    key is one ConvertError line naming the file and the key."""
    value = hf_config.get(key)
    if value is None:
        value = family.defaults.get(key, COMMON_DEFAULTS.get(key, default))
    if value is ConvertError:
        raise ConvertError(f"{where}: required key {key!r} is missing; a {family.hf_class} config.json needs it "
                           f"(re-download the model or add the key)")
    return value


def _flag(hf_config: dict, family: ModelFamily, flag: bool | str) -> bool:
    return flag if isinstance(flag, bool) else bool(config_value(hf_config, family, flag, default=False))


def shape_of(hf_config: dict, where: str = "config.json") -> Shape:
    fam = family_of(hf_config, where)

    def get(key, default=ConvertError):
        return config_value(hf_config, fam, key, where, default)

    heads, hidden, layers = get("num_attention_heads"), get("hidden_size"), get("num_hidden_layers")
    moe = {}
    if fam.sparse_layers is not None:
        meg = {m: hf for hf, m in fam.config_pairs}
        shared = meg.get("moe_shared_expert_intermediate_size")
        moe = dict(experts=int(get(meg["num_experts"])), topk=int(get(meg["moe_router_topk"])),
                   expert_ffn=int(get(meg["moe_ffn_hidden_size"])), shared_ffn=int(get(shared, 0) if shared else 0),
                   shared_gate=fam.shared_gate and bool(shared), norm_topk=_flag(hf_config, fam, fam.norm_topk),
                   moe_layers=fam.sparse_layers(hf_config, layers))
    has_dense = fam.sparse_layers is None or not all(moe["moe_layers"])
    return Shape(
        layers=layers, hidden=hidden, heads=heads, groups=get("num_key_value_heads", heads),
        head_dim=get("head_dim", hidden // heads),
        ffn=get("intermediate_size") if has_dense else get("intermediate_size", 0),
        vocab=get("vocab_size"), tied=bool(get("tie_word_embeddings")), qkv_bias=_flag(hf_config, fam, fam.qkv_bias),
        qk_norm=fam.qk_norm, family=fam.name, **moe,
    )
