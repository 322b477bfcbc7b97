"""MoE with torch_dist checkpoints (megatron-core dist_checkpointing), CPU mode, gloo, one group of 2 processes:
a (tp, pp, ep) = (1,1,2) run with grouped experts saves at iterations 5 and 10; rewound to 5 it resumes
- with the same settings: iterations 6..10 bit-exactly;
- with megatron-core's SequentialMLP experts (`--moe_grouped_gemm false`): the checkpoint's experts, saved as two
  3-D tensors per layer in SequentialMLP's global layout, load into per-expert modules with their Adam moments;
  iterations 6..10 within 1e-5;
- at ep=1: refused in one line (megatron-core gives expert parameters an optimizer of their own only when ep > 1,
  so the optimizer states do not correspond).
"""

from __future__ import annotations

import moe_helpers as H
import pytest
from group_helpers import as_rank as _as_rank
from group_helpers import rewind, run_bad_inputs, sft_argv
from megatune.train.distributed import free_port
from test_torch_dist import spawn  # non-daemon ranks: megatron-core's torch_dist writer forks processes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FLAGS = {"ckpt_format": "torch_dist", "max_steps": 10, "save_steps": 5, "moe_z_loss_coeff": 1e-3}


def _group(rank: int, world: int, model_dir: str, out_dir: str, ports: list[int]) -> dict:
    from megatune.train import cli

    _as_rank(rank, 2, ports[0])
    first = cli.run(sft_argv(model_dir, out_dir, expert_model_parallel_size=2, **FLAGS), progress=False)
    rewind(rank, out_dir, [first["run_dir"]], 5)  # a crash after the save of iteration 5: the tracker points there
    out = {"first": first["losses"]}
    for name, port, extra in (("same", ports[1], {}), ("sequential", ports[2], {"moe_grouped_gemm": "false"})):
        _as_rank(rank, 2, port)
        res = cli.run(sft_argv(model_dir, out_dir, expert_model_parallel_size=2,
                               resume_from_checkpoint=first["run_dir"], **FLAGS, **extra), progress=False)
        out[name] = (res["start_iteration"], res["losses"])
    if rank == 0:
        out |= run_bad_inputs({"ep1": (1, sft_argv(model_dir, out_dir, expert_model_parallel_size=1,
                                                    resume_from_checkpoint=first["run_dir"], **FLAGS))})
    return out


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    from megatune.convert.testing import make_tiny_model

    moe = make_tiny_model("qwen2_moe", tmp_path_factory.mktemp("tiny") / "qwen2_moe", seed=0)
    H.sharpen_routers(moe)
    out = tmp_path_factory.mktemp("runs")
    return spawn(2, _group, str(moe), str(out), [free_port() for _ in range(4)])[0]


@pytest.mark.slow
def test_resume_same_layout_is_bit_exact(group):
    assert group["same"] == (5, group["first"][5:])


@pytest.mark.slow
def test_resume_into_sequential_experts(group):
    start, losses = group["sequential"]
    diff = max(abs(a - b) for a, b in zip(losses, group["first"][5:]))
    assert start == 5 and len(losses) == 5 and diff <= 1e-5, (losses, group["first"][5:])


@pytest.mark.slow
def test_resume_at_ep1_is_refused_in_one_line(group):
    code, err = group["ep1"]
    lines = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert code != 0 and len(lines) == 1 and "saved with ep=2" in lines[0], err
