"""The checkpoint layout (megatune.convert.ckpt_layout): names, atomic writes, swaps, stale leftovers, safe loading.

Failures are injected the way they happen: a write past RLIMIT_FSIZE fails in the kernel (EFBIG) for every way of
writing a file, and a "kill" is os._exit at the exact step, in a child process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from megatune.convert import ckpt_layout
from megatune.convert.errors import ConvertError


def child(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def meta(**over) -> dict:
    m = {"format_version": 1, "model_type": "tiny", "architecture": "Qwen2ForCausalLM", "hf_config": {"a": 1},
         "dtype": "float32", "tp": 2, "pp": 1, "layers_per_stage": [4], "vocab_size": 10, "padded_vocab_size": 256,
         "make_vocab_size_divisible_by": 128, "naming": "local", "tied_embeddings": True}
    return {**m, **over}


def test_rank_names_follow_megatron_lm():
    f = ckpt_layout.rank_file
    assert f("d", None, 1, 0, 1) == Path("d/release/mp_rank_01/model_optim_rng.pt")
    assert f("d", 7, 1, 2, 4) == Path("d/iter_0000007/mp_rank_01_002/model_optim_rng.pt")
    assert f("d", 7, 1, 0, 1, ep_rank=3, ep=4) == Path("d/iter_0000007/mp_rank_01_003/model_optim_rng.pt")
    assert f("d", 7, 1, 2, 4, ep_rank=3, ep=4) == Path("d/iter_0000007/mp_rank_01_002_003/model_optim_rng.pt")
    assert ckpt_layout.distrib_optim_file("d", 7, 0, 1, 2) == Path("d/iter_0000007/mp_rank_00_001/distrib_optim.pt")


# issue 15 item 2: rewriting megatune.json / copying tokenizer files over a checkpoint dir must not damage them
REWRITE = """
import resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing us
from megatune.convert import api
from megatune.convert.hf_io import copy_aux_files
d, src = Path(sys.argv[1]), Path(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
for step in (lambda: api.write_meta(d, {**api.read_meta(d), "hf_config": {"x": "y" * 10000}}),
             lambda: copy_aux_files(src, d, ["tokenizer.json"])):
    try:
        step()
        print("no error")
    except Exception as e:
        print(type(e).__name__, str(e).splitlines()[0])
"""


def test_failed_rewrite_keeps_metadata_and_tokenizer(tmp_path):
    d, src = tmp_path / "ckpt", tmp_path / "src"
    d.mkdir()
    src.mkdir()
    (d / "megatune.json").write_text(json.dumps(meta()))
    (d / "tokenizer.json").write_text("old tokenizer")
    (src / "tokenizer.json").write_text("t" * 20000)  # larger than the file-size limit: its write fails
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    r = child(REWRITE, str(d), str(src))
    assert r.returncode == 0, r.stderr
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # intact, and no temporary left
    assert r.stdout.count("ConvertError") == 2 and "megatune.json" in r.stdout and "tokenizer.json" in r.stdout, \
        r.stdout
    assert ckpt_layout.read_meta(d)["tp"] == 2


def test_atomic_writes_replace_whole_files(tmp_path):
    p = tmp_path / "f.json"
    ckpt_layout.write_json_atomic(p, {"a": 1})
    ckpt_layout.write_json_atomic(p, {"b": 2})
    assert json.loads(p.read_text()) == {"b": 2} and [x.name for x in tmp_path.iterdir()] == ["f.json"]
    ckpt_layout.write_latest(tmp_path, 12)
    assert ckpt_layout.read_latest(tmp_path) == 12


# issue 15 item 8 ("tp": "two" in megatune.json gave a TypeError traceback)
@pytest.mark.parametrize("key,value", [("tp", "two"), ("pp", 1.5), ("tied_embeddings", "yes"),
                                       ("layers_per_stage", [4, "x"]), ("hf_config", []), ("tp", True)])
def test_meta_types_checked(tmp_path, key, value):
    (tmp_path / "megatune.json").write_text(json.dumps(meta(**{key: value})))
    with pytest.raises(ConvertError) as e:
        ckpt_layout.read_meta(tmp_path)
    assert "megatune.json" in str(e.value) and repr(key) in str(e.value) and "\n" not in str(e.value)


# issue 15 item 11: a kill between the two renames of the old swap left the output path missing
SWAP = """
import os, sys
from pathlib import Path
from megatune.convert import convert, fileio
out, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "fallback":
    fileio.exchange = lambda a, b: False  # a filesystem without renameat2 RENAME_EXCHANGE
def dies_after_moving_out(rename):
    def f(src, dst, *a, **k):
        rename(src, dst, *a, **k)
        if Path(src) == out:
            os._exit(137)  # killed right after the old output was moved aside
    return f
os.rename, os.replace = dies_after_moving_out(os.rename), dies_after_moving_out(os.replace)
with convert.atomic_dir(out, True) as tmp:
    (tmp / "new").write_text("complete")
"""


def test_killed_overwrite_never_leaves_output_missing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("complete")
    r = child(SWAP, str(out), "exchange")
    assert out.is_dir(), f"output path missing after a kill during the swap: {sorted(os.listdir(tmp_path))}"
    assert r.returncode == 0 and sorted(os.listdir(out)) == ["new"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_killed_fallback_swap_is_recovered_next_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("complete")
    r = child(SWAP, str(out), "fallback")
    assert r.returncode == 137 and not out.exists()  # the window the exchange closes
    with pytest.raises(ConvertError, match="output directory exists"):  # the next run puts the old copy back
        with ckpt_layout.atomic_dir(out, False):
            pass
    assert sorted(os.listdir(out)) == ["old"] and sorted(os.listdir(tmp_path)) == ["out"]


# issue 15 item 12: leftovers of killed runs are cleaned when provably stale, and only then
def test_stale_leftovers_cleaned_live_ones_kept(tmp_path):
    host, dead = socket.gethostname(), dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {f".o.tmp-{host}-{dead}": True, f".o.old-{host}-{dead}": True, f".o.tmp-{dead}": True,
                 f".o.tmp-{host}-{live.pid}": False, f".o.tmp-otherhost-{dead}": False, f".p.tmp-{host}-{dead}": False}
        for n in names:
            (tmp_path / n).mkdir()
            (tmp_path / n / "big").write_text("x")
        (tmp_path / "o").mkdir()
        with ckpt_layout.atomic_dir(tmp_path / "o", True) as tmp:
            (tmp / "f").write_text("y")
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {"o"} | {n for n, stale in names.items() if not stale}, left
    finally:
        live.kill()
        live.wait()


def test_crashed_training_save_staging_cleaned(tmp_path):
    host, dead = socket.gethostname(), dead_pid()
    for name, owner in ((".iter_0000002.tmp", f"{host} {dead}"), (".iter_0000004.tmp", f"{host} {os.getppid()}"),
                        (".iter_0000006.tmp", None), (".megatune.json.tmp-" + f"{host}-{dead}", None)):
        (tmp_path / name).mkdir()
        if owner:
            (tmp_path / name / ckpt_layout.OWNER).write_text(owner)
    tmp = ckpt_layout.begin_iteration_temp(tmp_path, 8)
    assert {p.name for p in tmp_path.iterdir()} == {".iter_0000004.tmp", ".iter_0000006.tmp", ".iter_0000008.tmp"}
    (tmp / "mp_rank_00").mkdir()
    assert ckpt_layout.publish_iteration(tmp_path, 8) == tmp_path / "iter_0000008"
    assert sorted(os.listdir(tmp_path / "iter_0000008")) == ["mp_rank_00"]


# issue 15 item 18: megatron-core's load_parameter_state reads distrib_optim.pt with a bare torch.load
class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


class _FakeDistributedOptimizer:
    """The two members megatron-core's DistributedOptimizer.load_parameter_state uses."""

    class data_parallel_group:  # noqa: N801
        @staticmethod
        def rank() -> int:
            return 0

    def __init__(self):
        self.loaded = None

    def load_parameter_state_from_dp_zero(self, state, **_):
        self.loaded = state


def test_distributed_optimizer_state_loads_allow_listed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch < 2.6's default for a bare torch.load
    good, evil = tmp_path / "distrib_optim.pt", tmp_path / "evil" / "distrib_optim.pt"
    evil.parent.mkdir()
    state = {"buckets_coalesced": True, (torch.float32, torch.float32): [{"param": torch.ones(3)}]}
    torch.save(state, good)
    torch.save({"x": _Evil()}, evil)
    opt = _FakeDistributedOptimizer()
    ckpt_layout.load_distributed_optimizer_state(opt, good)
    assert torch.equal(opt.loaded[(torch.float32, torch.float32)][0]["param"], torch.ones(3))
    with pytest.raises(ConvertError, match="cannot load"):
        ckpt_layout.load_distributed_optimizer_state(opt, evil)
    assert not (tmp_path / "PWNED").exists()



# issue 15 item 5 (the file-level part under every save): a full disk was torch's "unexpected pos" RuntimeError
def test_torch_save_disk_full_is_one_line_and_keeps_old(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "model_optim_rng.pt"
    ckpt_layout.torch_save_atomic({"w": torch.ones(4)}, path)
    real = os.write

    def full(fd, data):
        if len(data) > 1000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(ConvertError) as e:
        ckpt_layout.torch_save_atomic({"w": torch.zeros(100_000)}, path)
    monkeypatch.undo()
    assert str(path) in str(e.value) and "no space left on device" in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == [path.name] and torch.equal(ckpt_layout.safe_load(path)["w"], torch.ones(4))
