"""Issue 15 (17): an impossible uneven pipeline split names the flags, not "-1 remaining layers", and exits 2."""

from __future__ import annotations

import json

import pytest
from megatune.convert.cli import main
from megatune.convert.layout import stage_layers


def test_stage_layers_says_what_does_not_add_up():
    with pytest.raises(ValueError, match=r"^first=5 and last=None stage layers add up to 5, more than the model's 4"):
        stage_layers(4, 2, first=5)
    assert stage_layers(4, 2, first=3) == [3, 1]


def test_bad_first_stage_flag_is_named_with_exit_2(tiny, tmp_path, capsys):
    layers = json.loads((tiny["qwen2"] / "config.json").read_text())["num_hidden_layers"]
    rc = main(["--model_id_or_path", str(tiny["qwen2"]), "--to_megatron", "true", "--pp", "2",
               "--decoder_first_pipeline_num_layers", str(layers + 1), "--megatron_output_dir", str(tmp_path / "m")])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and line.startswith("megatune export: error: --decoder_first_pipeline_num_layers"), line
    assert "remaining layers" not in line and f"more than the model's {layers} layers" in line
    assert not (tmp_path / "m").exists()
