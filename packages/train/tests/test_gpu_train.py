"""`megatune sft` on GPUs through the real CLI path (bf16, distributed optimizer with distrib_optim.pt, fused AdamW,
overlapped gradient reduce-scatter when DP > 1, flex_attention for packed rows), on the tiny model:

1. 20 steps (DP over all lent GPUs, at most 2), saved at 10; `latest` rewound to 10 and resumed: iterations
   11..20 repeat the first run's losses (GPU kernels are not bit-reproducible, so within 2e-3), because the
   distributed optimizer's master weights and Adam moments come back from distrib_optim.pt;
2. the control that shows (1) can fail: the same resume without distrib_optim.pt (Adam moments restart) departs
   from the first run by more than the tolerance;
3. packed rows (document-masked flex_attention, compiled once for the padded length): 8 steps, loss finite and falling.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from group_helpers import as_rank as _as_rank
from group_helpers import sft_argv
from megatune.train.distributed import free_port, run_local

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = 2e-3


def _group(rank: int, world: int, model_dir: str, out_dir: str, ports: list[int]) -> dict:
    from megatune.convert import api
    from megatune.train import cli
    from megatune.train.checkpoint import DISTRIB_OPTIM_FILE

    gpu = dict(dtype="bf16", learning_rate=3e-4)
    _as_rank(rank, world, ports[0])
    first = cli.run(sft_argv(model_dir, out_dir, **gpu), progress=False)
    ready = Path(out_dir) / "rewound"
    control = Path(out_dir) / "control"
    if rank == 0:
        shutil.copytree(first["run_dir"], control)
        for d in (first["run_dir"], control):
            api.write_latest(d, 10)
        removed = list(control.glob(f"iter_0000010/*/{DISTRIB_OPTIM_FILE}"))
        assert removed, f"no {DISTRIB_OPTIM_FILE} under {control}/iter_0000010"
        for f in removed:
            f.unlink()
        ready.write_text("")
    while not ready.exists():
        time.sleep(0.2)
    _as_rank(rank, world, ports[1])
    resumed = cli.run(sft_argv(model_dir, out_dir, resume_from_checkpoint=first["run_dir"], **gpu), progress=False)
    _as_rank(rank, world, ports[2])
    fresh = cli.run(sft_argv(model_dir, out_dir, resume_from_checkpoint=str(control), **gpu), progress=False)
    _as_rank(rank, world, ports[3])
    packed = cli.run(sft_argv(model_dir, out_dir, packing="true", max_length=100, max_steps=8, global_batch_size=2,
                              **gpu), progress=False)
    return {"first": first["losses"], "dp": first["dp"], "resumed": resumed["losses"],
            "start": resumed["start_iteration"], "fresh_moments": fresh["losses"], "packed": packed["losses"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatune.convert.testing import make_tiny_model

    model = make_tiny_model("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2", seed=0)
    world = min(2, torch.cuda.device_count())
    out = tmp_path_factory.mktemp("runs")
    result = run_local(world, _group, str(model), str(out), [free_port() for _ in range(4)], timeout=900)[0]
    print({k: ([round(x, 4) for x in v] if isinstance(v, list) else v) for k, v in result.items()})
    return result


def test_resume_restores_distributed_optimizer_state(runs):
    first, resumed = runs["first"], runs["resumed"]
    assert runs["start"] == 10 and len(resumed) == 10 and first[-1] < first[0] - 0.2, runs
    diff = max(abs(a - b) for a, b in zip(resumed, first[10:]))
    assert diff <= TOL, f"DP{runs['dp']} resumed losses differ from the uninterrupted run by {diff:.2e}"


def test_resume_without_optimizer_state_departs(runs):
    diff = max(abs(a - b) for a, b in zip(runs["fresh_moments"], runs["first"][10:]))
    assert diff > TOL, f"restarting Adam moments changed the losses by only {diff:.2e}: the resume test has no signal"


def test_packed_rows_train_on_gpu(runs):
    packed = runs["packed"]
    assert len(packed) == 8 and all(loss == loss for loss in packed), packed
    assert packed[-1] < packed[0], packed
