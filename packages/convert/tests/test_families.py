"""Family rows and split kinds: the rows name exactly the tensors real checkpoints hold, with their shapes; the split
rules match hand-written layouts; a config.json without a required key is one clear line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from megatune.convert.arch import megatron_model_args
from megatune.convert.cli import main
from megatune.convert.errors import ConvertError
from megatune.convert.families import FAMILIES, shape_of
from megatune.convert.layout import COLUMN, FC1, REPLICATED, ROW, VOCAB, shard, unshard
from megatune.convert.plan import hf_shape, is_tied_copy, stage_entries
from megatune.convert.testing import TINY_ARCHS
from safetensors import safe_open


def stored_shapes(hf_dir) -> dict[str, tuple[int, ...]]:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    return out


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_row_names_every_stored_tensor_with_its_shape(tiny, arch):
    """The row (names, presence conditions, shape rules) against what transformers itself saved."""
    hf_dir = tiny[arch]
    shape = shape_of(json.loads((hf_dir / "config.json").read_text()))
    entries = [e for p in range(2) for e in stage_entries(shape, [shape.layers // 2, shape.layers - shape.layers // 2],
                                                          p) if not is_tied_copy(e)]
    from_row = {n: s for e in entries for n, s in zip(e.hf_names, e.hf_shapes)}
    assert from_row == stored_shapes(hf_dir)
    assert all(hf_shape(n, shape) == s for n, s in from_row.items())


def test_every_family_has_a_tiny_model():
    from megatune.convert.testing.tiny import _ARCHS

    assert {cfg["architectures"][0] for cfg in _ARCHS.values()} == set(FAMILIES)


def test_norm_and_activation_come_from_the_row(monkeypatch):
    from megatune.convert import families
    from megatune.convert.testing.tiny import tiny_config

    cfg = tiny_config("llama", 100)
    a = megatron_model_args(cfg)
    assert (a["normalization"], a["swiglu"]) == ("RMSNorm", True)
    row = families.FAMILIES["LlamaForCausalLM"]
    monkeypatch.setitem(families.FAMILIES, "LlamaForCausalLM",
                        families.ModelFamily(**{**row.__dict__, "normalization": "LayerNorm", "activation": "gelu"}))
    a = megatron_model_args(cfg)
    assert (a["normalization"], a["swiglu"]) == ("LayerNorm", False)


def test_split_kinds_match_hand_written_layouts():
    rows = torch.arange(8.0)[:, None].expand(8, 3).contiguous()  # row i holds i
    gate_up = shard(FC1, rows, 2)  # gate = rows 0-3, up = rows 4-7: rank t holds [gate_t; up_t]
    assert [p[:, 0].tolist() for p in gate_up] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert [p[:, 0].tolist() for p in shard(COLUMN, rows, 4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    vocab = shard(VOCAB, rows[:5], 2, padded_vocab=8)
    assert [p[:, 0].tolist() for p in vocab] == [[0, 1, 2, 3], [4, 0, 0, 0]] and not vocab[1][1:].any()
    cols = torch.arange(6.0)[None].expand(2, 6).contiguous()
    assert [p[0].tolist() for p in shard(ROW, cols, 3)] == [[0, 1], [2, 3], [4, 5]]
    norm = torch.arange(4.0)
    assert [p.tolist() for p in shard(REPLICATED, norm, 4)] == [norm.tolist()] * 4
    assert torch.equal(unshard(VOCAB, vocab, vocab_size=5), rows[:5])
    assert torch.equal(unshard(FC1, gate_up), rows)


@pytest.mark.parametrize("key", ["num_attention_heads", "hidden_size", "vocab_size", "num_hidden_layers"])
def test_missing_required_config_key_is_one_line(tiny, tmp_path, capsys, key):
    src = tmp_path / "src"
    shutil.copytree(tiny["qwen2"], src)
    cfg = json.loads((src / "config.json").read_text())
    del cfg[key]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=rf"config\.json: required key '{key}' is missing"):
        shape_of(cfg)
    rc = main(["--model_type", "t", "--model_id_or_path", str(src), "--to_megatron", "true",
               "--megatron_output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and str(src / "config.json") in err[0] and repr(key) in err[0], err
