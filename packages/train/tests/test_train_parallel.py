"""Real megatron-core over gloo on the CPU: the same 20 steps give the same loss curve at every (tp, pp, dp).

All five layouts run inside ONE spawned group of 4 processes (imports and data building are paid once): for each
layout the first tp*pp*dp processes form a fresh process group on a fresh port, the others sit it out. The (2,1,1)
run dir is reused by the bad-input test (resume with a different tp must be refused).
"""

from __future__ import annotations

import os

import pytest

from megatune.train.distributed import free_port, run_local

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1)]
STEPS = 20


def sft_argv(model_dir, out_dir, **overrides) -> list[str]:
    """A small, fast, fp32 `megatune sft` command line on the tiny model."""
    flags = {
        "model_id_or_path": str(model_dir), "dataset": "self-cognition#80", "model_name": ["小黄", "Xiao Huang"],
        "model_author": ["魔搭", "ModelScope"], "max_length": 64, "learning_rate": 1e-3, "batch_size": 1,
        "global_batch_size": 4, "max_steps": STEPS, "logging_steps": 1, "eval_steps": 1000, "dtype": "fp32",
        "dataset_test_ratio": 0.0, "output_dir": str(out_dir), "seed": 7,
    }
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        argv.append(f"--{key}")
        argv.extend(str(v) for v in value) if isinstance(value, list) else argv.append(str(value))
    return argv


def _layouts_group(rank: int, world: int, model_dir: str, out_dir: str, ports: list[int]) -> dict:
    from megatune.train import cli

    results = {}
    for (tp, pp, dp), port in zip(LAYOUTS, ports):
        n = tp * pp * dp
        if rank >= n:
            continue
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK=str(rank), MASTER_PORT=str(port))
        res = cli.run(sft_argv(model_dir, out_dir, tp=tp, pp=pp), progress=False)
        results[(tp, pp, dp)] = {"losses": res["losses"], "run_dir": res["run_dir"], "layout": (res["tp"], res["pp"],
                                                                                              res["dp"])}
    return results


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    from megatune.convert.testing import make_tiny_model

    return make_tiny_model("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2", seed=0)


@pytest.fixture(scope="module")
def layout_runs(tiny_qwen2, tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts")
    ports = [free_port() for _ in LAYOUTS]
    per_rank = run_local(4, _layouts_group, str(tiny_qwen2), str(out), ports, timeout=600)
    return per_rank[0]


@pytest.mark.slow
def test_same_loss_curve_for_every_layout(layout_runs):
    base = layout_runs[(1, 1, 1)]["losses"]
    assert len(base) == STEPS
    assert base[-1] < base[0] - 0.5, f"loss did not fall: {base}"
    for layout in LAYOUTS:
        run = layout_runs[layout]
        assert run["layout"] == layout
        diff = max(abs(a - b) for a, b in zip(run["losses"], base))
        assert len(run["losses"]) == STEPS and diff <= 1e-4, f"{layout}: max |loss diff| {diff:.2e} vs (1,1,1)"
