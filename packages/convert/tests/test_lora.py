"""LoRA tensor code (megatune.convert.lora): target names, TP split of A/B, fp32 merges, peft's per-module terms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from megatune.convert import lora
from megatune.convert.arch import shape_of
from megatune.convert.errors import ConvertError
from megatune.convert.layout import deinterleave_qkv, shard, unshard
from megatune.convert.testing.tiny import tiny_config

SHAPE = shape_of(tiny_config("qwen2", 1000))  # 8 heads, 2 groups, head_dim 8, ffn 128
QKV, PROJ, FC1, FC2 = (lora.BY_NAME[n] for n in ("self_attention.linear_qkv", "self_attention.linear_proj",
                                                   "mlp.linear_fc1", "mlp.linear_fc2"))


def test_modules_come_from_the_architecture_table():
    assert [m.short for m in lora.MODULES] == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    assert QKV.hf == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert (QKV.a_kind, QKV.b_kind, PROJ.a_kind, PROJ.b_kind) == ("replicated", "column", "row", "replicated")
    assert (FC1.b_kind, FC2.a_kind) == ("fc1", "row")


@pytest.mark.parametrize("names,expect", [
    ([], {QKV.name: (True, True, True)}),
    (["DEFAULT"], {QKV.name: (True, True, True)}),
    (["all"], {QKV.name: (True,) * 3, PROJ.name: (True,), FC1.name: (True, True), FC2.name: (True,)}),
    (["q_proj"], {QKV.name: (True, False, False)}),
    (["v_proj", "linear_fc2", "up_proj"], {QKV.name: (False, False, True), FC1.name: (False, True),
                                            FC2.name: (True,)}),
    (["o_proj", "linear_proj"], {PROJ.name: (True,)}),
    (["q_proj", "k_proj", "v_proj"], {QKV.name: (True, True, True)}),
])
def test_resolve_targets(names, expect):
    assert lora.resolve_targets(names) == expect


def test_unknown_target_is_one_clear_line():
    with pytest.raises(ConvertError, match=r"unknown module 'qproj'.*q_proj"):
        lora.resolve_targets(["qproj"])


def test_scaling():
    assert lora.lora_scaling(8, 32, False) == 4.0
    assert lora.lora_scaling(16, 32, True) == 8.0


def test_row_mask_selects_the_targeted_rows_in_fused_order():
    mask = lora.row_mask(QKV, (True, False, True), SHAPE)
    q, k, v = deinterleave_qkv(mask, SHAPE.heads, SHAPE.groups, SHAPE.head_dim)
    assert bool((q == 1).all() and (k == 0).all() and (v == 1).all())
    assert lora.row_mask(QKV, (True, True, True), SHAPE) is None
    gate, up = lora.row_mask(FC1, (False, True), SHAPE).chunk(2)
    assert bool((gate == 0).all() and (up == 1).all())


def _random_adapter(m, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out, inp = lora.module_shape(m, SHAPE)
    return torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)


@pytest.mark.parametrize("m", [QKV, PROJ, FC1, FC2], ids=lambda m: m.short)
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_per_rank_merge_equals_full_merge(m, tp):
    """Merging each TP part (with its A/B parts) and unsharding == merging the full tensor."""
    a, b = _random_adapter(m)
    w = torch.randn(*lora.module_shape(m, SHAPE))
    full = lora.merge_weight(w, a, b, 0.5)
    parts = [lora.merge_weight(wp, ap, bp, 0.5) for wp, (ap, bp) in zip(shard(m.kind, w, tp),
                                                                          lora.adapter_parts(m, a, b, tp))]
    assert torch.allclose(unshard(m.kind, parts), full, atol=1e-6)
    back = lora.full_adapter(m, lora.adapter_parts(m, a, b, tp))
    assert torch.equal(back[0], a) and torch.equal(back[1], b)


def test_merge_is_fp32_then_cast():
    w = torch.randn(16, 8).bfloat16()
    a, b = torch.randn(4, 8) * 1e-3, torch.randn(16, 4) * 1e-3
    merged = lora.merge_weight(w, a.bfloat16(), b.bfloat16(), 2.0)
    ref = (w.float() + 2.0 * (b.bfloat16().float() @ a.bfloat16().float())).bfloat16()
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, ref)
    with pytest.raises(ConvertError, match="does not match"):
        lora.merge_weight(w, a, b[:8], 1.0)


@settings(max_examples=20, deadline=None)
@given(pieces=st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any), seed=st.integers(0, 1000))
def test_hf_deltas_equal_fused_merge(pieces, seed):
    """Per-HF-module merges (peft's view) equal the fused merge deinterleaved, for any targeted q/k/v subset."""
    a, b = _random_adapter(QKV, seed=seed)
    mask = lora.row_mask(QKV, pieces, SHAPE)
    b_eff = b if mask is None else b * mask
    w = torch.randn(*lora.module_shape(QKV, SHAPE), generator=torch.Generator().manual_seed(seed + 1))
    fused = lora.split_pieces(QKV, lora.merge_weight(w, a, b_eff, 4.0), SHAPE)
    shape1 = shape_of(tiny_config("qwen2", 1000, num_hidden_layers=1))
    deltas = lora.hf_deltas({lora.layer_key(0, QKV): (a, b_eff)}, {QKV.name: pieces}, shape1)
    for hf, on, w_piece, fused_piece in zip(QKV.hf, pieces, lora.split_pieces(QKV, w, SHAPE), fused):
        name = f"model.layers.0.{hf}.weight"
        assert (name in deltas) == on
        got = lora.merge_weight(w_piece, *deltas[name], 4.0) if on else w_piece
        assert torch.allclose(got, fused_piece, atol=1e-5), hf


def test_peft_keys_and_config():
    shape1 = shape_of(tiny_config("qwen2", 1000, num_hidden_layers=1))
    targets = lora.resolve_targets(["q_proj", "gate_proj", "up_proj", "o_proj"])
    adapters = {lora.layer_key(0, m): _random_adapter(m) for m in (QKV, PROJ, FC1)}
    sd = lora.peft_state_dict(adapters, targets, shape1)
    assert sorted(sd) == sorted(f"base_model.model.model.layers.0.{m}.lora_{ab}.weight" for ab in "AB"
                                for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"))
    a, b = adapters[lora.layer_key(0, FC1)]
    assert torch.equal(sd["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"], a)
    assert torch.equal(sd["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"], b[SHAPE.ffn:])
    cfg = lora.peft_config(rank=4, alpha=8, dropout=0.0, rslora=False, targets=targets, base_model="/m")
    assert cfg["target_modules"] == ["gate_proj", "o_proj", "q_proj", "up_proj"] and cfg["r"] == 4
    with pytest.raises(ConvertError, match="missing"):
        lora.hf_deltas({}, targets, shape1)
