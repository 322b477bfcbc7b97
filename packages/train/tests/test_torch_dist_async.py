"""--async_save true: training goes on while a torch_dist checkpoint is written, and kill -9 during the write keeps
the previous checkpoint, which resumes bit-exactly.

`megatune sft` runs as its own process (one rank, CPU). A test hook makes the forked writer of iteration 4 sleep,
so iterations 5 and 6 train while that checkpoint is being written; the save of iteration 6 then waits for it, and
the test kills the whole run with SIGKILL there. The tracker must still name iteration 2 and a run resumed from it
must reproduce the killed run's losses of iterations 3..5 exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from group_helpers import sft_argv
from megatune.train.async_save import WRITE_SLEEP_ENV

TIMEOUT = 600


def _sft(argv: list[str], log: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "megatune.train.cli", *argv], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env},
                            start_new_session=True)  # its own process group: the writer processes die with it


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "logging.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[int(record["global_step/max_steps"].split("/")[0])] = record["loss"]
    return out


def _wait_for(predicate, what: str, proc: subprocess.Popen, log: Path) -> None:
    end = time.time() + TIMEOUT
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"sft exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.time() > end:
            raise AssertionError(f"no {what} within {TIMEOUT}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.mark.slow
def test_kill_during_async_write_keeps_the_previous_checkpoint(tmp_path):
    from megatune.convert import ckpt_layout
    from megatune.convert.testing import make_tiny_model

    model = make_tiny_model("qwen2", tmp_path / "qwen2", seed=0)
    out = tmp_path / "out"
    flags = dict(tp=1, pp=1, max_steps=8, save_steps=2, ckpt_format="torch_dist", async_save="true")
    log = tmp_path / "killed.log"
    proc = _sft(sft_argv(model, out, **flags), log, **{WRITE_SLEEP_ENV: "120@4"})
    try:
        _wait_for(lambda: "saving checkpoint at iteration 6" in log.read_text(), "the save of iteration 6", proc, log)
        time.sleep(1.0)  # the save of 6 is now waiting for the write of 4
        text = log.read_text()
        assert "async writer of iteration 4 sleeping" in text
        assert text.index("async writer of iteration 4 sleeping") < text.index("saving checkpoint at iteration 6")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its checkpoint writers, mid-write
        proc.wait()
    run_dir = next(out.glob("qwen2/v*"))
    killed = _losses(run_dir)
    assert sorted(killed) == [1, 2, 3, 4, 5, 6], "iterations 5 and 6 trained while iteration 4 was being written"
    assert ckpt_layout.read_latest(run_dir) == 2
    assert (run_dir / "iter_0000002" / "metadata.json").is_file() and not (run_dir / "iter_0000004").exists()

    log2 = tmp_path / "resumed.log"
    resumed = _sft(sft_argv(model, out, **{**flags, "async_save": "false", "max_steps": 5},
                            resume_from_checkpoint=str(run_dir)), log2)
    assert resumed.wait(timeout=TIMEOUT) == 0, log2.read_text()[-3000:]
    new_run = max(out.glob("qwen2/v*"), key=lambda p: p.stat().st_mtime)
    again = _losses(new_run)
    assert sorted(again) == [3, 4, 5] and all(again[i] == killed[i] for i in again), (again, killed)
