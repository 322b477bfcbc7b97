"""`megatune export` under hostile but realistic input (issue 15): one line, the right exit code, the input
untouched, and no output or temporary left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from megatune.convert.cli import main
from megatune.convert.testing import default_sigint
from safetensors.torch import load_file, save_file


def run(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def one_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatune export: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def hf(tiny, tmp_path) -> Path:
    d = tmp_path / "hf"
    shutil.copytree(tiny["qwen2"], d)
    return d


@pytest.fixture
def meg(hf, tmp_path, capsys) -> Path:
    d = tmp_path / "meg"
    assert run(capsys, "--model_id_or_path", str(hf), "--to_megatron", "true", "--tp", "2",
               "--megatron_output_dir", str(d))[0] == 0
    return d


def to_megatron(capsys, src: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run(capsys, "--model_id_or_path", str(src), "--to_megatron", "true", "--megatron_output_dir", str(out),
               *extra)


# item 3: --overwrite true into the input (or an ancestor of it) deleted the input
def test_overwrite_into_input_refused(capsys, hf, meg, tmp_path):
    before_hf, before_meg = snapshot(hf), snapshot(meg)
    for out in (hf, tmp_path):
        rc, err = to_megatron(capsys, hf, out, "--overwrite", "true")
        assert rc == 1 and snapshot(hf) == before_hf
        one_line(err, str(out), "input", "choose another")
    rc, err = run(capsys, "--ckpt_dir", str(meg), "--to_hf", "true", "--hf_output_dir", str(meg), "--overwrite", "true")
    assert rc == 1 and snapshot(meg) == before_meg
    one_line(err, str(meg), "input")


# item 5: a full disk gave "error: : No space left on device" and then a C++ abort (exit 134)
ENOSPC_AFTER = """
import errno, os, sys
real, budget = os.write, [int(sys.argv[1])]
def write(fd, data):
    if fd > 2 and len(data) >= budget[0]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    budget[0] -= len(data) if fd > 2 else 0
    return real(fd, data)
os.write = write
from megatune.convert.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("direction", ["to_megatron", "to_hf"])
def test_disk_full_while_writing(hf, meg, tmp_path, direction):
    out = tmp_path / "out"
    flags = {"to_megatron": ["--model_id_or_path", str(hf), "--to_megatron", "true", "--tp", "2",
                             "--megatron_output_dir", str(out)],
             "to_hf": ["--ckpt_dir", str(meg), "--to_hf", "true", "--hf_output_dir", str(out)]}[direction]
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(ENOSPC_AFTER), "300000", *flags],
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stderr[-2000:]
    line = one_line(r.stderr, "no space left on device", "needed")
    assert str(out) in line and (".safetensors" in line or "model_optim_rng.pt" in line), line
    assert leftovers(tmp_path, "out") == []


def tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_refused_before_writing(hf, tmp_path):
    small = tmp_path / "small"
    if not tmpfs(small, "400k"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        r = subprocess.run([sys.executable, "-m", "megatune.convert.cli", "--model_id_or_path", str(hf),
                            "--to_megatron", "true", "--tp", "2", "--megatron_output_dir", str(small / "out")],
                           capture_output=True, text=True)  # a process of its own: the old code aborted (134)
        assert r.returncode == 1 and os.listdir(small) == [], r.stderr[-2000:]
        one_line(r.stderr, str(small / "out"), "free", "needed")
    finally:
        subprocess.run(["umount", str(small)], check=True)


# item 6: NaN/Inf weights passed through export silently
def test_nonfinite_weights_refused_unless_allowed(capsys, hf, tmp_path):
    f = hf / "model.safetensors"
    w = load_file(f)
    w["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(w, f, metadata={"format": "pt"})
    rc, err = to_megatron(capsys, hf, tmp_path / "o")
    assert rc == 1 and leftovers(tmp_path, "o") == []
    one_line(err, "model.layers.1.mlp.up_proj.weight", "NaN", "--allow_nonfinite true")
    assert to_megatron(capsys, hf, tmp_path / "o", "--allow_nonfinite", "true")[0] == 0
    rc, err = run(capsys, "--ckpt_dir", str(tmp_path / "o"), "--to_hf", "true")
    assert rc == 1 and leftovers(tmp_path / "o", "hf-hf") == []
    one_line(err, "model.layers.1.mlp.up_proj.weight", "NaN", "--allow_nonfinite true")
    assert run(capsys, "--ckpt_dir", str(tmp_path / "o"), "--to_hf", "true", "--allow_nonfinite", "true")[0] == 0


def test_dtype_overflow_named(capsys, hf, tmp_path):
    f = hf / "model.safetensors"
    w = load_file(f)
    w["model.norm.weight"][0] = 1e6  # finite in fp32, inf in fp16
    save_file(w, f, metadata={"format": "pt"})
    rc, err = to_megatron(capsys, hf, tmp_path / "o", "--dtype", "fp16")
    assert rc == 1
    one_line(err, "model.norm.weight", "overflows float16")


# item 8: a safetensors header with a tampered shape gave an AssertionError traceback
def test_tampered_safetensors_shape(capsys, hf, tmp_path):
    f = hf / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = "model.layers.0.mlp.down_proj.weight"
    header[name]["shape"] = header[name]["shape"][::-1]  # same byte count, transposed
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    new = new.ljust(n)
    f.write_bytes(raw[:8] + new + raw[8 + n:])
    rc, err = to_megatron(capsys, hf, tmp_path / "o", "--tp", "2")
    assert rc == 1 and leftovers(tmp_path, "o") == []
    one_line(err, name, "model.safetensors")


# item 10: a config.json that disagrees with the weights was accepted (and --to_hf later blamed the tp size)
def test_config_disagreeing_with_weights(capsys, hf, tmp_path):
    cfg = json.loads((hf / "config.json").read_text())
    cfg["intermediate_size"] = 192
    (hf / "config.json").write_text(json.dumps(cfg))
    rc, err = to_megatron(capsys, hf, tmp_path / "o")
    assert rc == 1 and leftovers(tmp_path, "o") == []
    one_line(err, "mlp.gate_proj.weight", "intermediate_size", "config.json")


# item 16: swapped rank files converted silently into a wrong model
def test_swapped_rank_files_refused(capsys, meg):
    r0, r1 = meg / "release" / "mp_rank_00", meg / "release" / "mp_rank_01"
    r0.rename(meg / "release" / "x")
    r1.rename(r0)
    (meg / "release" / "x").rename(r1)
    rc, err = run(capsys, "--ckpt_dir", str(meg), "--to_hf", "true")
    assert rc == 1 and leftovers(meg, "hf-hf") == []
    one_line(err, "mp_rank_00", "tp rank 1", "expected tp rank 0")


# item 17: unknown flag exit 1 without a suggestion; "output directory exists" of a file; a parent that is a file
def test_unknown_flag_is_a_usage_error(capsys):
    rc, err = run(capsys, "--to_megatron", "true", "--megatron_ouput_dir", "x")
    assert rc == 2
    one_line(err, "--megatron_ouput_dir", "did you mean --megatron_output_dir?")
    rc, err = run(capsys, "--to_hf", "true", "--ckpt_dri", "x")
    assert rc == 2
    one_line(err, "did you mean --ckpt_dir?")
    assert run(capsys, "--to_megatron", "true", "--to_hf", "true")[0] == 2


def test_output_path_is_a_file(capsys, hf, tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep")
    rc, err = to_megatron(capsys, hf, f)
    assert rc == 1 and f.read_text() == "keep"
    line = one_line(err, str(f), "is a file")
    assert "directory exists" not in line
    rc, err = to_megatron(capsys, hf, f / "sub" / "out")
    assert rc == 1 and f.read_text() == "keep"
    one_line(err, str(f), "is a file, not a directory")


# exit codes: Ctrl-C 130, SIGTERM 143, the temporary output removed
SLOW_EXPORT = """
import sys, time
from megatune.convert import torchfile
write = torchfile.StreamingTorchFile.write
def slow(self, key, tensor):
    print("writing", file=sys.stderr, flush=True)
    time.sleep(0.5)
    return write(self, key, tensor)
torchfile.StreamingTorchFile.write = slow
from megatune.convert.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_export_exit_code_and_cleanup(hf, tmp_path, sig, code):
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SLOW_EXPORT), "--model_id_or_path", str(hf),
                          "--to_megatron", "true", "--megatron_output_dir", str(out)],
                         stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    assert p.stderr.readline().strip() == "writing"
    p.send_signal(sig)
    err = p.stderr.read()
    assert p.wait(60) == code, err
    one_line(err, "no output written")
    assert leftovers(tmp_path, "o") == []


def test_rank_files_record_their_rank(meg):
    from megatune.convert.ckpt_layout import RANK_KEY, load_rank_file

    got = [load_rank_file(meg / "release" / f"mp_rank_0{t}" / "model_optim_rng.pt", meta=True)[RANK_KEY]
           for t in range(2)]
    assert [(r["tp"], r["tp_rank"], r["pp"], r["pp_rank"]) for r in got] == [(2, 0, 1, 0), (2, 1, 1, 0)]
