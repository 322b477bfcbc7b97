"""HF -> Megatron -> HF round trips through the CLI: tensors byte-identical, for every architecture x tp x pp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from megatune.convert.api import hf_to_megatron_rank, load_megatron_rank, read_meta
from megatune.convert.arch import shape_of
from megatune.convert.cli import main
from megatune.convert.megatron_io import load_rank_file, rank_file
from megatune.convert.testing import TINY_ARCHS
from safetensors.torch import load_file


def load_hf(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)), k


def allowed(hf_dir: Path, tp: int, pp: int) -> bool:
    s = shape_of(json.loads((hf_dir / "config.json").read_text()))
    return s.heads % tp == 0 and (s.groups % tp == 0 or tp % s.groups == 0) and s.ffn % tp == 0 and s.layers % pp == 0


def export(hf_dir, out, *extra):
    assert main(["--model_type", "tiny", "--model_id_or_path", str(hf_dir), "--to_megatron", "true",
                 "--megatron_output_dir", str(out), *extra]) == 0


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_round_trip_every_tp_pp(tiny, tmp_path, arch):
    hf_dir = tiny[arch]
    ref = load_hf(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4):
            if not allowed(hf_dir, tp, pp):
                continue
            meg = tmp_path / f"tp{tp}pp{pp}"
            export(hf_dir, meg, "--tp", str(tp), "--pp", str(pp))
            assert main(["--ckpt_dir", str(meg), "--to_hf", "true"]) == 0
            back = meg / "tiny-hf"
            assert_identical(ref, load_hf(back))
            back_cfg = json.loads((back / "config.json").read_text())
            assert {k: v for k, v in back_cfg.items() if k != "torch_dtype"} == \
                {k: v for k, v in cfg.items() if k != "torch_dtype"}
            assert (back / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()


def test_megatron_layout_and_args(tiny, tmp_path):
    """Files where Megatron-LM looks; args Namespace it accepts; vocab padded; tied output on the last stage."""
    hf_dir = tiny["qwen2"]  # tied embeddings, qkv bias
    meg = tmp_path / "m"
    export(hf_dir, meg, "--tp", "2", "--pp", "2")
    assert (meg / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    meta = read_meta(meg)
    assert meta["padded_vocab_size"] % 256 == 0 and meta["padded_vocab_size"] >= meta["vocab_size"]
    assert meta["vocab_size"] % 128 != 0 and meta["tied_embeddings"] is True
    first = load_rank_file(rank_file(meg, "release", 1, 0, 2))
    last = load_rank_file(rank_file(meg, "release", 1, 1, 2))
    assert first["checkpoint_version"] == 3.0 and first["iteration"] == 0
    a = first["args"]
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.padded_vocab_size) == (2, 2, meta[
        "padded_vocab_size"])
    assert a.add_qkv_bias and not a.untie_embeddings_and_output_weights and a.num_query_groups == 2
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in first["model"]
    # megatron-core keeps the tied embedding's copy as output_layer.weight on the last stage only
    assert torch.equal(first["model"]["embedding.word_embeddings.weight"], last["model"]["output_layer.weight"])
    assert "output_layer.weight" not in first["model"]
    pad = first["model"]["embedding.word_embeddings.weight"][-(meta["padded_vocab_size"] - meta["vocab_size"]):]
    assert not pad.any()  # rank 1 holds the tail: padding rows are zero


def test_bf16_and_te_naming_and_sharded_hf(tiny, tmp_path):
    hf_dir = tiny["qwen3"]
    meg = tmp_path / "m"
    export(hf_dir, meg, "--tp", "2", "--pp", "2", "--dtype", "bf16", "--naming", "te")
    model = load_rank_file(rank_file(meg, "release", 0, 0, 2))["model"]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in model
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in model
    assert "decoder.layers.0.input_layernorm.weight" not in model
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in model
    assert all(t.dtype == torch.bfloat16 for t in model.values())
    out = tmp_path / "hf"
    assert main(["--ckpt_dir", str(meg), "--to_hf", "true", "--hf_output_dir", str(out), "--max_shard_size",
                 "60KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert_identical({k: v.to(torch.bfloat16) for k, v in load_hf(hf_dir).items()}, load_hf(out))


def test_in_memory_api_and_resharding(tiny, tmp_path):
    hf_dir = tiny["llama3"]
    meg = tmp_path / "m"
    export(hf_dir, meg, "--tp", "2", "--pp", "2")
    assert read_meta(meg)["hf_config"]["rope_scaling"]["rope_type"] == "llama3"
    args = load_rank_file(rank_file(meg, "release", 0, 0, 2))["args"]
    assert args.use_rope_scaling and args.rope_scaling_factor == 8.0 and args.rotary_base == 500000.0
    for tp, pp in ((2, 2), (4, 1), (1, 4), (8, 2)):
        for r in range(tp):
            for p in range(pp):
                got = load_megatron_rank(meg, tp=tp, pp=pp, tp_rank=r, pp_rank=p)
                want = hf_to_megatron_rank(hf_dir, tp=tp, pp=pp, tp_rank=r, pp_rank=p)
                assert sorted(got) == sorted(want)
                assert all(torch.equal(got[k], want[k]) for k in want), (tp, pp, r, p)


def test_uneven_pipeline_stages(tiny, tmp_path):
    hf_dir = tiny["mistral"]
    meg = tmp_path / "m"
    export(hf_dir, meg, "--pp", "3", "--decoder_first_pipeline_num_layers", "2")
    meta = read_meta(meg)
    assert meta["layers_per_stage"] == [2, 1, 1]
    assert load_rank_file(rank_file(meg, "release", 0, 0, 3))["args"].decoder_first_pipeline_num_layers == 2
    assert main(["--ckpt_dir", str(meg), "--to_hf", "true"]) == 0
    assert_identical(load_hf(hf_dir), load_hf(meg / "tiny-hf"))


def test_training_run_dir_with_iteration(tiny, tmp_path):
    """An iter_%07d checkpoint named by latest_checkpointed_iteration.txt (as training writes) exports too."""
    hf_dir = tiny["llama"]
    meg = tmp_path / "run"
    export(hf_dir, meg, "--tp", "2")
    (meg / "release").rename(meg / "iter_0000100")
    (meg / "latest_checkpointed_iteration.txt").write_text("100\n")
    assert main(["--ckpt_dir", str(meg), "--to-hf", "true"]) == 0
    assert_identical(load_hf(hf_dir), load_hf(meg / "tiny-hf"))
