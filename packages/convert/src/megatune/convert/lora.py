"""LoRA adapters on Megatron-Core's fused linears, as pure tensor code: which modules can carry one, how their
A/B tensors are split over tensor parallelism, how they merge into the base weight, and how they read in peft's
per-module terms.

Conventions (full tensors = the TP=1 layout, as in splits.py):
    A  [r, in]    B  [out, r]    delta W = scaling * B @ A,   scaling = alpha / r (alpha / sqrt(r) with rslora)
where `out` follows the base weight's row order: the fused QKV is group-major ([q heads of g; k_g; v_g] per query
group g), fc1 is [gate; up]. The TP split of A and B derives from the base weight's split kind:
    column-parallel base (linear_qkv, linear_fc1): A replicated, B split like the base's rows (COLUMN / FC1)
    row-parallel base (linear_proj, linear_fc2):    A split like the base's columns (ROW), B replicated

Fused modules and peft. One adapter sits on the fused linear_qkv (linear_fc1), with one A shared by q, k and v
(gate and up). In peft's per-module terms that is q_proj, k_proj and v_proj each holding the same A and the rows
of B that belong to it (deinterleaved from the group-major order) -- exactly the same function. Targeting only
some of the fused projections (e.g. HF `q_proj` alone) puts the adapter on the fused module with a fixed row mask
on B: the other projections' rows are multiplied by zero in the forward pass, get zero gradients and stay zero,
and the peft export writes only the targeted projections.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from megatune.convert.errors import ConvertError
from megatune.convert.families import DENSE_LAYER, Param, Shape
from megatune.convert.splits import COLUMN, FC1, REPLICATED, ROW, Merge, Sizes, merge_pieces, shard, split_full, unshard

PEFT_PREFIX = "base_model.model."  # peft's PeftModelForCausalLM wraps the HF model as base_model.model


@dataclass(frozen=True)
class LoraModule:
    """A linear layer of each decoder layer that can carry an adapter (read from the family row's parameter)."""

    name: str  # megatron-core module path inside a layer, e.g. "self_attention.linear_qkv"
    hf: tuple[str, ...]  # HF module paths inside `model.layers.{i}`, e.g. ("self_attn.q_proj", ...)
    kind: str  # split kind of the base weight: COLUMN (incl. fused QKV), FC1 or ROW
    fmt: Merge  # how the HF modules fuse into this one (splits.QKV, GATE_UP, SINGLE)
    dims: tuple[tuple[str | int, ...], ...]  # HF shape rule of each piece's weight

    @property
    def short(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def column_parallel(self) -> bool:
        return self.kind in (COLUMN, FC1)

    @property
    def a_kind(self) -> str:
        return REPLICATED if self.column_parallel else ROW

    @property
    def b_kind(self) -> str:
        return self.kind if self.column_parallel else REPLICATED


def lora_modules(layer_params: Iterable[Param]) -> tuple[LoraModule, ...]:
    """The adaptable linears of a family's decoder layer: the weights of column/fc1/row kind present in every
    layer. Routed experts, shared experts and MoE-only layers are not (yet) adapted."""
    return tuple(LoraModule(p.local.removesuffix(".weight"), tuple(h.removesuffix(".weight") for h in p.hf),
                            p.kind, p.fmt, p.dims)
                 for p in layer_params
                 if p.local.endswith(".weight") and p.kind in (COLUMN, FC1, ROW) and not p.expert and p.layers is None)


MODULES: tuple[LoraModule, ...] = lora_modules(DENSE_LAYER)  # the names every dense Llama-like family shares
BY_NAME = {m.name: m for m in MODULES}
# swift 2.x's DEFAULT for Llama/Mistral/Qwen2/Qwen3 (LoRATM.llama): the attention's q, k and v projections
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj")


def _aliases(modules: Sequence[LoraModule]) -> dict[str, tuple[str, int | None]]:
    """Accepted spellings -> (module name, HF piece index or None for the whole module)."""
    out: dict[str, tuple[str, int | None]] = {}
    for m in modules:
        out[m.short] = out[m.name] = (m.name, None)
        for i, h in enumerate(m.hf):
            out[h.rsplit(".", 1)[-1]] = out[h] = (m.name, i if len(m.hf) > 1 else None)
    return out


def resolve_targets(names: Iterable[str], modules: Sequence[LoraModule] = MODULES) -> dict[str, tuple[bool, ...]]:
    """`--lora_target_modules` values -> {module name: which of its HF pieces carry the adapter}.

    DEFAULT (the attention's q/k/v projections, as swift 2.x), ALL (every linear layer), or module names in HF
    (q_proj ... down_proj) or Megatron (linear_qkv ... linear_fc2) spelling, mixed freely. `modules`: what the
    model's family offers (lora_modules of its row)."""
    aliases, by_name = _aliases(modules), {m.name: m for m in modules}
    names = list(names) or ["DEFAULT"]
    chosen: dict[str, list[bool]] = {}
    for raw in names:
        key = raw.strip()
        if key.upper() == "ALL":
            expanded = [m.name for m in modules]
        elif key.upper() == "DEFAULT":
            expanded = list(DEFAULT_TARGETS)
        elif key in aliases:
            expanded = [key]
        else:
            known = sorted(k for k in aliases if "." not in k)
            raise ConvertError(f"--lora_target_modules: unknown module {raw!r}"
                               f"{' for this model family' if raw in _aliases(MODULES) else ''}; use DEFAULT, ALL, "
                               f"or names from {', '.join(known)}")
        for n in expanded:
            module, piece = aliases[n]
            flags = chosen.setdefault(module, [False] * len(by_name[module].hf))
            for i in range(len(flags)) if piece is None else [piece]:
                flags[i] = True
    return {m.name: tuple(chosen[m.name]) for m in modules if m.name in chosen}  # table order


def lora_scaling(rank: int, alpha: float, rslora: bool) -> float:
    """peft's scaling: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def piece_dims(module: LoraModule, shape: Shape) -> list[tuple[int, ...]]:
    """The HF weight shape of each piece (q, k, v / gate, up / the one module), from the family row."""
    return [shape.dims(rule) for rule in module.dims]


def module_shape(module: LoraModule, shape: Shape) -> tuple[int, int]:
    """(out, in) of the full base weight."""
    dims = piece_dims(module, shape)
    return sum(d[0] for d in dims), dims[0][1]


def piece_rows(module: LoraModule, shape: Shape) -> list[int]:
    return [d[0] for d in piece_dims(module, shape)]


def join_pieces(module: LoraModule, pieces: Sequence[torch.Tensor], shape: Shape) -> torch.Tensor:
    """HF-ordered pieces (q, k, v / gate, up) -> the full tensor in the fused module's row order (splits' merge)."""
    return merge_pieces(module.fmt, pieces, Sizes(tp=1, groups=shape.groups))


def split_pieces(module: LoraModule, full: torch.Tensor, shape: Shape) -> list[torch.Tensor]:
    """Inverse of join_pieces: the fused row order -> HF pieces (contiguous copies)."""
    dims = [(rows, *full.shape[1:]) for rows in piece_rows(module, shape)]
    return split_full(module.fmt, full, dims, Sizes(tp=1, groups=shape.groups))


def row_mask(module: LoraModule, pieces: Sequence[bool], shape: Shape) -> torch.Tensor | None:
    """Full-length 0/1 mask [out, 1] over B's rows for a partly targeted fused module; None when all are."""
    if all(pieces):
        return None
    ones = [torch.full((n, 1), float(on)) for n, on in zip(piece_rows(module, shape), pieces)]
    return join_pieces(module, ones, shape)


def merge_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """weight + scaling * B @ A computed in fp32, cast back to the weight's dtype. Works on a full tensor, a TP
    part (with the matching A/B parts) or a block of rows (with B's matching rows)."""
    if b.shape[0] != weight.shape[0] or a.shape[1] != weight.shape[1] or a.shape[0] != b.shape[1]:
        raise ConvertError(f"LoRA merge: weight {tuple(weight.shape)} does not match B {tuple(b.shape)} @ A "
                           f"{tuple(a.shape)}; the adapter was made for another model or tp")
    return torch.addmm(weight.float(), b.float(), a.float(), alpha=scaling).to(weight.dtype)


def adapter_parts(module: LoraModule, a: torch.Tensor, b: torch.Tensor, tp: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Full (A, B) -> the tp ranks' (A part, B part), by the split kinds of the module's base weight."""
    return list(zip(shard(module.a_kind, a, tp), shard(module.b_kind, b, tp)))


def full_adapter(module: LoraModule, parts: Sequence[tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of adapter_parts: the tp ranks' (A part, B part) -> full (A, B)."""
    a_parts, b_parts = zip(*parts)
    return unshard(module.a_kind, list(a_parts)), unshard(module.b_kind, list(b_parts))


def layer_key(layer: int, module: LoraModule) -> str:
    """Name of a layer's adapter in unsharded adapter dicts: `decoder.layers.{global i}.{module}`."""
    return f"decoder.layers.{layer}.{module.name}"


def hf_deltas(adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], targets: dict[str, tuple[bool, ...]],
              shape: Shape) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Full adapters {layer_key: (A, B)} -> {HF weight name: (A, B rows of that HF tensor)} for the targeted pieces,
    so that HF weight += scaling * B_rows @ A (merge_weight) equals the fused merge, row for row."""
    out = {}
    for layer in range(shape.layers):
        for name, pieces in targets.items():
            m = BY_NAME[name]
            key = layer_key(layer, m)
            if key not in adapters:
                raise ConvertError(f"LoRA adapters: {key} missing; the adapter checkpoint is incomplete")
            a, b = adapters[key]
            for hf, on, rows in zip(m.hf, pieces, split_pieces(m, b, shape)):
                if on:
                    out[f"model.layers.{layer}.{hf}.weight"] = (a, rows)
    return out


def peft_state_dict(adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], targets: dict[str, tuple[bool, ...]],
                    shape: Shape) -> dict[str, torch.Tensor]:
    """peft's adapter_model.safetensors keys: base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight..."""
    out = {}
    for name, (a, rows) in hf_deltas(adapters, targets, shape).items():
        stem = PEFT_PREFIX + name.removesuffix(".weight")
        out[f"{stem}.lora_A.weight"] = a.clone()  # q/k/v share A: one copy each (safetensors refuses aliases)
        out[f"{stem}.lora_B.weight"] = rows.contiguous()
    return out


def peft_config(*, rank: int, alpha: float, dropout: float, rslora: bool, targets: dict[str, tuple[bool, ...]],
                base_model: str) -> dict:
    """adapter_config.json for peft.PeftModel.from_pretrained (LoRA, causal LM, HF module names)."""
    modules = sorted({hf.rsplit(".", 1)[-1] for name, pieces in targets.items()
                      for hf, on in zip(BY_NAME[name].hf, pieces) if on})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
            "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora, "target_modules": modules,
            "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
            "inference_mode": True, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "use_dora": False}
