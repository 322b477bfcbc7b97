"""MoE conversion with expert parallelism: byte-identical HF -> Megatron -> HF round trips over family x tp x pp x ep
(uneven PP included), rank files named as Megatron-LM names them, experts where megatron-core looks for them, and
one clear line for an ep that does not divide the experts."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from megatune.convert.api import hf_to_megatron_rank, load_megatron_rank, read_meta
from megatune.convert.cli import main
from megatune.convert.families import shape_of
from megatune.convert.megatron_io import load_rank_file, rank_file
from megatune.convert.testing import MOE_ARCHS
from test_roundtrip import assert_identical, export, load_hf

EXPERTS = {"qwen2_moe": 4, "qwen3_moe": 8, "mixtral": 4}


@st.composite
def layouts(draw):
    arch = draw(st.sampled_from(MOE_ARCHS))
    ep = draw(st.sampled_from([e for e in (1, 2, 4, 8) if EXPERTS[arch] % e == 0]))
    tp = draw(st.sampled_from([1, 2, 4]))
    pp = draw(st.sampled_from([1, 2, 3]))
    first = draw(st.sampled_from([None, 2])) if pp == 3 else None  # 4 layers: [2, 1, 1] or uneven-less pp=3 fails
    if pp == 3 and first is None:
        pp = 2
    naming = draw(st.sampled_from(["local", "te"]))
    return arch, tp, pp, ep, first, naming


@settings(max_examples=24, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layouts())
def test_round_trip_family_tp_pp_ep(tiny, tmp_path_factory, layout):
    arch, tp, pp, ep, first, naming = layout
    hf_dir = tiny[arch]
    meg = tmp_path_factory.mktemp("m") / "ckpt"
    extra = ["--decoder_first_pipeline_num_layers", str(first)] if first else []
    export(hf_dir, meg, "--tp", str(tp), "--pp", str(pp), "--ep", str(ep), "--naming", naming, *extra)
    meta = read_meta(meg)
    assert meta["ep"] == ep
    dirs = sorted(p.name for p in (meg / "release").iterdir())
    want = sorted(f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") + (f"_{e:03d}" if ep > 1 else "")
                  for t in range(tp) for p in range(pp) for e in range(ep))
    assert dirs == want
    args = load_rank_file(rank_file(meg, "release", 0, 0, pp, 0, ep))["args"]
    assert (args.expert_model_parallel_size, args.num_experts) == (ep, EXPERTS[arch])
    assert main(["--ckpt_dir", str(meg), "--to_hf", "true"]) == 0
    assert_identical(load_hf(hf_dir), load_hf(meg / "tiny-hf"))


def test_experts_sit_on_their_ep_rank(tiny, tmp_path):
    """ep rank e holds global experts e*E/ep + j as local_experts.{j}, tp-split like a dense MLP ([gate_t; up_t]
    rows, down_proj columns); the router, the shared expert and its gate are on every ep rank."""
    hf_dir = tiny["qwen2_moe"]  # 4 experts, layer 1 dense (mlp_only_layers), shared expert with a gate
    hf = load_hf(hf_dir)
    meg = tmp_path / "m"
    export(hf_dir, meg, "--tp", "2", "--ep", "2")
    for e in range(2):
        for t in range(2):
            model = load_rank_file(rank_file(meg, "release", t, 0, 1, e, 2))["model"]
            for j in range(2):
                g = 2 * e + j  # the global expert
                pre = f"model.layers.0.mlp.experts.{g}."
                gate, up = hf[pre + "gate_proj.weight"].chunk(2)[t], hf[pre + "up_proj.weight"].chunk(2)[t]
                fc1 = model[f"decoder.layers.0.mlp.experts.local_experts.{j}.linear_fc1.weight"]
                assert torch.equal(fc1, torch.cat([gate, up]))
                fc2 = model[f"decoder.layers.0.mlp.experts.local_experts.{j}.linear_fc2.weight"]
                assert torch.equal(fc2, hf[pre + "down_proj.weight"].chunk(2, dim=1)[t])
            assert not any(f"local_experts.{j}." in k for k in model for j in (2, 3))
            assert torch.equal(model["decoder.layers.0.mlp.router.weight"], hf["model.layers.0.mlp.gate.weight"])
            assert torch.equal(model["decoder.layers.0.mlp.shared_experts.gate_weight"],
                               hf["model.layers.0.mlp.shared_expert_gate.weight"])
            assert "decoder.layers.1.mlp.linear_fc1.weight" in model  # the dense layer
            assert not any(k.startswith("decoder.layers.1.mlp.router") for k in model)
    args = load_rank_file(rank_file(meg, "release", 0, 0, 1, 1, 2))["args"]
    assert args.moe_layer_freq == [1, 0, 1, 1] and args.moe_shared_expert_gate
    assert args.moe_router_pre_softmax  # norm_topk_prob false: top-k of the full softmax, not renormalised


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_in_memory_ep_reshard(tiny, tmp_path, arch):
    hf_dir = tiny[arch]
    meg = tmp_path / "m"
    export(hf_dir, meg, "--tp", "2", "--pp", "2", "--ep", "2")
    for tp, pp, ep in ((2, 2, 2), (1, 1, 1), (1, 2, 4), (2, 1, 4)):
        for t in range(tp):
            for p in range(pp):
                for e in range(ep):
                    got = load_megatron_rank(meg, tp=tp, pp=pp, ep=ep, tp_rank=t, pp_rank=p, ep_rank=e)
                    want = hf_to_megatron_rank(hf_dir, tp=tp, pp=pp, ep=ep, tp_rank=t, pp_rank=p, ep_rank=e)
                    assert sorted(got) == sorted(want)
                    assert all(torch.equal(got[k], want[k]) for k in want), (tp, pp, ep, t, p, e)


def test_moe_shape_and_megatron_args(tiny):
    cfg = json.loads((tiny["qwen2_moe"] / "config.json").read_text())
    s = shape_of(cfg)
    assert (s.experts, s.topk, s.expert_ffn, s.shared_ffn, s.shared_gate, s.norm_topk) == (4, 2, 32, 64, True, False)
    assert s.moe_layers == (True, False, True, True) and s.qkv_bias  # qkv_bias: the class default
    mix = shape_of(json.loads((tiny["mixtral"] / "config.json").read_text()))
    assert mix.norm_topk and mix.moe_layers == (True,) * 4 and mix.expert_ffn == mix.ffn == 64 and not mix.shared_ffn


def test_bad_ep_is_one_line(tiny, tmp_path, capsys):
    for arch, ep, needle in (("qwen2_moe", 3, "4 experts over ep=3"), ("qwen2", 2, "no experts")):
        rc = main(["--model_type", "t", "--model_id_or_path", str(tiny[arch]), "--to_megatron", "true",
                   "--megatron_output_dir", str(tmp_path / arch), "--ep", str(ep)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and needle in err[0] and "config.json" in err[0], err
        assert not (tmp_path / arch).exists()
