"""Bad input: one line on stderr, non-zero exit, nothing left behind (not even the temp sibling)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from megatune.convert.cli import main


def run(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, err


def assert_one_line(rc: int, err: str, *needles: str):
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("megatune export: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


@pytest.fixture
def hf_copy(tiny, tmp_path):
    d = tmp_path / "src"
    shutil.copytree(tiny["qwen2"], d)
    return d


def to_megatron(capsys, src, out, *extra):
    return run(capsys, "--model_type", "tiny", "--model_id_or_path", str(src), "--to_megatron", "true",
               "--megatron_output_dir", str(out), *extra)


def test_heads_not_divisible_by_tp(capsys, hf_copy, tmp_path):
    rc, err = to_megatron(capsys, hf_copy, tmp_path / "o", "--tp", "3")
    assert_one_line(rc, err, "num_attention_heads=8", "tp=3", "config.json")
    assert not leftovers(tmp_path, "o")


def test_unknown_architecture(capsys, hf_copy, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    rc, err = to_megatron(capsys, hf_copy, tmp_path / "o")
    assert_one_line(rc, err, "GPT2LMHeadModel", "Qwen2ForCausalLM")
    assert not leftovers(tmp_path, "o")


def test_missing_safetensors(capsys, hf_copy, tmp_path):
    for f in hf_copy.glob("*.safetensors"):
        f.unlink()
    rc, err = to_megatron(capsys, hf_copy, tmp_path / "o")
    assert_one_line(rc, err, "no *.safetensors")
    assert not leftovers(tmp_path, "o")


def test_corrupt_safetensors(capsys, hf_copy, tmp_path):
    f = next(hf_copy.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated download
    rc, err = to_megatron(capsys, hf_copy, tmp_path / "o", "--tp", "2")
    assert_one_line(rc, err, f.name, "corrupt")
    assert not leftovers(tmp_path, "o")


def test_output_exists_refused_then_overwritten(capsys, hf_copy, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    rc, err = to_megatron(capsys, hf_copy, out)
    assert_one_line(rc, err, str(out), "--overwrite true")
    assert (out / "keep").exists() and leftovers(tmp_path, "o") == ["o"]
    rc, err = to_megatron(capsys, hf_copy, out, "--overwrite", "true")
    assert rc == 0 and not (out / "keep").exists() and (out / "megatune.json").exists()
    assert leftovers(tmp_path, "o") == ["o"]


def test_wrong_tp_checkpoint(capsys, hf_copy, tmp_path):
    meg = tmp_path / "m"
    assert to_megatron(capsys, hf_copy, meg, "--tp", "2")[0] == 0
    meta = json.loads((meg / "megatune.json").read_text())
    meta["tp"] = 4  # rank files say tp=2
    (meg / "megatune.json").write_text(json.dumps(meta))
    rc, err = run(capsys, "--ckpt_dir", str(meg), "--to_hf", "true")
    assert_one_line(rc, err, "tp=4")
    # the same with the rank count faked to match: caught by the tensor shapes
    shutil.copytree(meg / "release" / "mp_rank_00", meg / "release" / "mp_rank_02")
    shutil.copytree(meg / "release" / "mp_rank_01", meg / "release" / "mp_rank_03")
    rc, err = run(capsys, "--ckpt_dir", str(meg), "--to_hf", "true")
    assert_one_line(rc, err, "model_optim_rng.pt", "expected", "tp=4")
    assert not leftovers(meg, "tiny-hf")


def test_corrupt_rank_file(capsys, hf_copy, tmp_path):
    meg = tmp_path / "m"
    assert to_megatron(capsys, hf_copy, meg)[0] == 0
    f = meg / "release" / "mp_rank_00" / "model_optim_rng.pt"
    f.write_bytes(b"not a zip" * 10)
    rc, err = run(capsys, "--ckpt_dir", str(meg), "--to_hf", "true")
    assert_one_line(rc, err, str(f), "corrupt")
    assert not leftovers(meg, "tiny-hf")


def test_unknown_model_type_and_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    rc, err = run(capsys, "--model_type", "no-such-model", "--to_megatron", "true")
    assert_one_line(rc, err, "no-such-model", "qwen2-7b-instruct")
    rc, err = run(capsys, "--model_type", "qwen2_5-7b-instruct", "--to_megatron", "true")
    assert_one_line(rc, err, "Qwen/Qwen2.5-7B-Instruct", "--model_id_or_path")
    assert not list(tmp_path.glob("*tp1-pp1*"))


def test_flag_errors_are_one_line(capsys, tmp_path):
    assert_one_line(*run(capsys, "--to_megatron", "maybe"))
    assert_one_line(*run(capsys, "--to_hf", "true"), "--ckpt_dir")
    assert_one_line(*run(capsys, "--to_hf", "true", "--ckpt_dir", str(tmp_path / "nope")), "no such directory")
    assert_one_line(*run(capsys, "--ckpt_dir", str(tmp_path), "--to_hf", "true"), "megatune.json", "not found")


def test_real_process_exit_code_and_stderr(hf_copy, tmp_path):
    r = subprocess.run([sys.executable, "-m", "megatune.convert.cli", "--model-type", "tiny", "--model-id-or-path",
                        str(hf_copy), "--to-megatron", "true", "--tp", "16", "--megatron-output-dir",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "tp=16" in r.stderr and not leftovers(tmp_path, "o")
