"""Issue 15 item 5, the `megatune sft` side: a checkpoint save that hits a full disk.

The disk is "full" only for the files of iteration 4's staging dir (`.iter_0000004.tmp`), on one rank: a
`sitecustomize` on PYTHONPATH (inherited by torchrun's ranks) makes os.write (the legacy format's SequentialWriter)
and files opened for writing there (torch DCP's writer) fail with ENOSPC. Expected, for the legacy and the torch_dist
format and with two processes where only rank 0's write fails: exit code 1, ONE `megatune sft: error:` line naming
the file and "no space left", no traceback, no staging dir left, every rank stopped (a hang fails the test's
timeout), and the checkpoint of iteration 2 still the latest, which resumes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from group_helpers import sft_argv

STAGING = ".iter_0000004.tmp"  # where the disk is full: the staging dir of iteration 4 (or a part of it)
INJECT = '''
import errno, io, os, builtins

_where, _, _rank = os.environ.get("MEGATUNE_TEST_ENOSPC", "").partition("@")


def _full(path) -> bool:
    return bool(_where) and _where in str(path) and (not _rank or os.environ.get("RANK", "0") == _rank)


def _enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


_real_write = os.write


def _write(fd, data):
    if _where:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if _full(path) and len(data):
            raise _enospc()
    return _real_write(fd, data)


class _FullFile:
    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise _enospc()

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


_real_open = io.open


def _open(file, mode="r", *args, **kwargs):
    f = _real_open(file, mode, *args, **kwargs)
    return _FullFile(f) if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax") and _full(file) else f


os.write, io.open, builtins.open = _write, _open, _open
'''


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from megatune.convert.testing import make_tiny_model

    return make_tiny_model("qwen2", tmp_path_factory.mktemp("tiny") / "tiny-qwen2", seed=0)


def _sft(tmp_path: Path, argv: list[str], full: str = "", nproc: int = 1) -> subprocess.CompletedProcess:
    inject = tmp_path / "inject"
    inject.mkdir(exist_ok=True)
    (inject / "sitecustomize.py").write_text(INJECT)
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "NNODES", "RANK", "WORLD_SIZE",
                                                                "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MEGATUNE_TEST_ENOSPC=full,
               PYTHONPATH=os.pathsep.join(p for p in (str(inject), env.get("PYTHONPATH")) if p))
    if nproc > 1:
        env["NPROC_PER_NODE"] = str(nproc)
    # a rank left waiting at a barrier forever (the defect) fails the test here instead of hanging it
    return subprocess.run([sys.executable, "-m", "megatune.train.cli", *argv], capture_output=True, text=True,
                          timeout=240, env=env)


def _noisy(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]


def _check_failed_save(done: subprocess.CompletedProcess, out: Path) -> Path:
    """The one-line failure of the save of iteration 4; returns the run dir (iteration 2 is its latest)."""
    lines = _noisy(done.stderr)
    assert done.returncode == 1 and len(lines) == 1, (done.returncode, done.stderr[-4000:])
    (line,) = lines
    (run_dir,) = (out / "tiny-qwen2").iterdir()
    assert line.startswith("megatune sft: error: ") and "no space left" in line.lower(), line
    assert f"{run_dir}/iter_0000004" in line and STAGING not in line, line  # named where it was going
    assert "Traceback" not in done.stderr and "unexpected pos" not in done.stderr
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert sorted(p.name for p in run_dir.iterdir() if "iter_" in p.name) == ["iter_0000002"], \
        sorted(p.name for p in run_dir.iterdir())
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name], "temporary files left behind"
    return run_dir


def _check_resumes(tmp_path: Path, model: Path, out: Path, run_dir: Path, **flags) -> None:
    again = _sft(tmp_path, sft_argv(model, out, max_steps=4, save_steps=2, max_length=32,
                                    resume_from_checkpoint=run_dir, **flags))
    assert again.returncode == 0, again.stderr[-4000:]
    (resumed,) = [d for d in (out / "tiny-qwen2").iterdir() if d != run_dir]
    steps = [json.loads(r)["global_step"] for r in (resumed / "logging.jsonl").read_text().splitlines()
             if "loss" in json.loads(r)]
    assert steps == [3, 4] and (resumed / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


def test_distributed_optimizer_shard_is_written_atomically(tmp_path, monkeypatch):
    """megatron-core's save_parameter_state torch.saves to the path itself: routed through torch_save_atomic."""
    import errno

    import torch
    from megatune.convert.errors import ConvertError
    from megatune.train.checkpoint import _atomic_torch_save

    shard, real_save, real_write = tmp_path / "distrib_optim.pt", torch.save, os.write
    with _atomic_torch_save(shard):
        torch.save({"w": torch.ones(4)}, str(shard))
        torch.save({"w": torch.ones(4)}, tmp_path / "other.pt")  # any other file: torch.save itself
    assert sorted(p.name for p in tmp_path.iterdir()) == ["distrib_optim.pt", "other.pt"]

    def full(fd, data):
        if len(data) > 1000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(ConvertError, match="no space left on device") as e, _atomic_torch_save(shard):
        torch.save({"w": torch.zeros(100_000)}, str(shard))
    monkeypatch.undo()
    assert str(shard) in str(e.value) and "\n" not in str(e.value) and torch.save is real_save
    assert torch.equal(torch.load(shard)["w"], torch.ones(4))  # the old file, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["distrib_optim.pt", "other.pt"]


@pytest.mark.slow
@pytest.mark.parametrize(("ckpt_format", "full"), [
    ("torch", f"{STAGING}/mp_rank_00/"),  # the rank file (the big write)
    ("torch_dist", f"{STAGING}/__"),  # torch DCP's .distcp files, written by megatron-core's writer
])
def test_full_disk_on_the_second_save_is_one_line_and_keeps_the_first(model, tmp_path, ckpt_format, full):
    out = tmp_path / "out"
    flags = {"ckpt_format": ckpt_format}
    done = _sft(tmp_path, sft_argv(model, out, max_steps=4, save_steps=2, max_length=32, **flags), full=full)
    run_dir = _check_failed_save(done, out)
    if ckpt_format == "torch":  # the file and how much it needs
        assert f"{run_dir}/iter_0000004/mp_rank_00/model_optim_rng.pt: no space left" in done.stderr
        assert " needed)" in done.stderr
    _check_resumes(tmp_path, model, out, run_dir, **flags)


@pytest.mark.slow
def test_full_disk_when_the_save_starts_is_one_line(model, tmp_path):
    """Even the staging dir's first small file (its owner record) fails: the same one line, nothing left."""
    done = _sft(tmp_path, sft_argv(model, tmp_path / "out", max_steps=4, save_steps=2, max_length=32), full=STAGING)
    _check_failed_save(done, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_full_disk_on_one_rank_stops_every_rank(model, tmp_path, rank):
    """tp=2: each rank writes its own rank file; only `rank`'s fails. Nobody waits at a barrier; rank 0 says it."""
    out = tmp_path / "out"
    done = _sft(tmp_path, sft_argv(model, out, max_steps=4, save_steps=2, max_length=32, tp=2),
                full=f"{STAGING}/mp_rank_0{rank}/@{rank}", nproc=2)
    _check_failed_save(done, out)
    assert f"iter_0000004/mp_rank_0{rank}/model_optim_rng.pt: no space left" in done.stderr
    assert ("rank 1 could not save: " in done.stderr) == (rank == 1)
