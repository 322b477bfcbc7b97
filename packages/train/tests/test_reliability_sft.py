"""Issue 15 (`megatune sft`, one process): refused input is one line with exit 2 and no run dir; a run whose loss
turns non-finite stops with exit 1 naming the iteration and saves no checkpoint of it; a start that fails after the
run dir was made leaves no empty run dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from group_helpers import sft_argv


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from megatune.convert.testing import make_tiny_model

    return make_tiny_model("qwen2", tmp_path_factory.mktemp("tiny") / "tiny-qwen2", seed=0)


def _sft(*argv) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "NNODES", "RANK", "WORLD_SIZE",
                                                                "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "megatune.train.cli", *map(str, argv)], capture_output=True,
                          text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]


@pytest.mark.parametrize(("flags", "words"), [
    (["--learning_rate", "nan"], "--learning_rate: expected a finite number, got 'nan'"),
    (["--learning_rate", "inf"], "--learning_rate: expected a finite number, got 'inf'"),
    (["--learning_rate", "-1e-3"], "--learning_rate: must be > 0, got -0.001"),
    (["--max_grad_norm", "nan"], "--max_grad_norm: expected a finite number"),
])
def test_refused_numbers_are_one_line_and_no_run_dir(model, tmp_path, flags, words):
    done = _sft(*sft_argv(model, tmp_path / "out"), *flags)
    errors = _errors(done.stderr)
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    assert errors[0].startswith(f"megatune sft: error: {words}") and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_non_finite_loss_stops_before_saving_it(model, tmp_path):
    # lr 1e30 without warmup: iteration 1 is finite, its update makes iteration 2's loss non-finite
    done = _sft(*sft_argv(model, tmp_path / "out", learning_rate=1e30, warmup_ratio=0, max_steps=6, save_steps=1,
                          max_grad_norm=0))
    (line,) = _errors(done.stderr)
    assert done.returncode == 1 and line.startswith("megatune sft: error: iteration 2: loss "), done.stderr[-3000:]
    assert "stopped without saving" in line
    (run_dir,) = (tmp_path / "out" / "tiny-qwen2").iterdir()
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert sorted(p.name for p in run_dir.glob("*iter_*")) == ["iter_0000001"]


@pytest.mark.slow
def test_failed_start_after_the_run_dir_leaves_none_behind(model, tmp_path):
    out = tmp_path / "out"
    first = _sft(*sft_argv(model, out, max_steps=2, save_steps=2))
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = (out / "tiny-qwen2").iterdir()
    assert json.loads((run_dir / "args.json").read_text())["max_steps"] == 2
    # continuing a finished run fails after the new run dir was chosen: it must not stay behind, empty
    again = _sft(*sft_argv(model, out, max_steps=2, save_steps=2, resume_from_checkpoint=run_dir))
    assert again.returncode == 1 and "already at iteration 2" in again.stderr, again.stderr[-3000:]
    assert list((out / "tiny-qwen2").iterdir()) == [run_dir]
