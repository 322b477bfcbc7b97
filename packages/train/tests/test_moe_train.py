"""MoE training through `megatune sft` (cli.run) on a tiny Qwen2-MoE (shared expert + gate, a dense layer), CPU mode,
gloo, all in ONE spawned group of 4 processes:

1. the same 20 steps at (tp, pp, ep) = (1,1,1), (1,1,2), (2,1,2), (1,2,2) give the same loss curve and the same
   load-balancing-loss curve (<= 1e-4), with the z-loss on; execution options vary across layouts (allgather
   dispatcher, sequential experts, sequence parallelism, full recomputation);
2. resume with expert parallelism: the (1,1,2) and (1,2,2) runs saved at iteration 10; rewinding `latest` to 10 and
   resuming reproduces iterations 11..20 bit-exactly;
3. an ep=2 checkpoint trained at ep=1 (resharded in memory) starts from the same loss as the HF weights;
4. bad input: ep not dividing the experts, world size not divisible by tp x pp x ep, a run saved with ep=2
   continued with ep=1, ep on a dense model, the allgather dispatcher with ep > 1 (it needs equal lengths on all
   ep ranks): one `megatune sft: error:` line each.
"""

from __future__ import annotations

import json
from pathlib import Path

import moe_helpers as H
import pytest
from group_helpers import STEPS, rewind, run_bad_inputs, sft_argv, train_layouts
from group_helpers import as_rank as _as_rank
from megatune.train.distributed import free_port, run_local

LAYOUTS = [(1, 1, 1), (1, 1, 2), (2, 1, 2), (1, 2, 2)]
EXTRA = {(1, 1, 1): {"moe_token_dispatcher_type": "allgather"}, (1, 1, 2): {"moe_grouped_gemm": "false"},
         (2, 1, 2): {"sequence_parallel": "true"}, (1, 2, 2): {"recompute_granularity": "full"}}
RESUMED = [(1, 1, 2), (1, 2, 2)]
MOE = {"moe_z_loss_coeff": 1e-3, "moe_aux_loss_coeff": 0.01}
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _aux_curve(run_dir: str) -> list[float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "logging.jsonl").read_text().splitlines() if line.strip()]
    return [r["moe_aux_loss"] for r in rows if "moe_aux_loss" in r]


def _argv(model_dir, out_dir, tp, pp, ep, **overrides):
    return sft_argv(model_dir, out_dir, tp=tp, pp=pp, expert_model_parallel_size=ep, **MOE, **overrides)


def _bad_inputs(model_dir: str, dense_dir: str, out_dir: str, ep2_run: str) -> dict[str, tuple[int, str]]:
    cases = {
        "ep_experts": (3, _argv(model_dir, out_dir, 1, 1, 3)),  # 4 experts over ep=3
        "ep_world": (1, _argv(model_dir, out_dir, 1, 1, 2)),  # world 1 over tp x pp x ep = 2
        "ep_resume": (2, _argv(model_dir, out_dir, 1, 1, 1, resume_from_checkpoint=ep2_run)),
        "ep_dense": (2, sft_argv(dense_dir, out_dir, expert_model_parallel_size=2)),
        "ep_allgather": (2, _argv(model_dir, out_dir, 1, 1, 2, moe_token_dispatcher_type="allgather")),
    }
    return run_bad_inputs(cases)


def _group(rank: int, world: int, model_dir: str, dense_dir: str, out_dir: str, ports: list[int]) -> dict:
    from megatune.convert import convert
    from megatune.train import cli

    def argv(tp, pp, ep, **flags):  # dp = ep: expert parallelism is carved out of data parallelism
        return _argv(model_dir, out_dir, tp, pp, ep, **EXTRA.get((tp, pp, ep), {}), **flags)

    results = train_layouts(rank, LAYOUTS, ports, argv, ("losses", "run_dir", "tp", "pp", "dp"))
    if rank == 0:
        for run in results.values():
            run["aux"] = _aux_curve(run["run_dir"])
    # the run dirs now look as if the save of iteration 20 never happened
    rewind(rank, out_dir, [results[layout]["run_dir"] for layout in RESUMED] if rank == 0 else [], 10)
    def resumed(tp, pp, ep):
        return argv(tp, pp, ep, resume_from_checkpoint=results[(tp, pp, ep)]["run_dir"])

    results |= train_layouts(rank, RESUMED, ports[len(LAYOUTS):], resumed, ("losses", "run_dir", "start_iteration"),
                             tag=("resumed",))

    if rank == 0:
        ep2 = Path(out_dir) / "tiny-ep2"
        convert.hf_to_megatron(model_dir, ep2, tp=1, pp=1, ep=2)
        _as_rank(0, 1, ports[-1])
        res = cli.run(_argv(model_dir, out_dir, 1, 1, 1, resume_from_checkpoint=str(ep2), max_steps=2),
                      progress=False)
        results["resharded"] = res["losses"]
        results["bad"] = _bad_inputs(model_dir, dense_dir, out_dir, results[(1, 1, 2)]["run_dir"])
    return results


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    from megatune.convert.testing import make_tiny_model

    tiny = tmp_path_factory.mktemp("tiny")
    moe = make_tiny_model("qwen2_moe", tiny / "qwen2_moe", seed=0)
    H.sharpen_routers(moe)  # well-separated top-k choices: layouts then agree to rounding (see the helper)
    dense = make_tiny_model("qwen2", tiny / "qwen2", seed=0)
    out = tmp_path_factory.mktemp("runs")
    ports = [free_port() for _ in range(len(LAYOUTS) + len(RESUMED) + 1)]
    return run_local(4, _group, str(moe), str(dense), str(out), ports, timeout=1500)[0]


@pytest.mark.slow
def test_same_loss_and_aux_curves_for_every_layout(group):
    base = group[(1, 1, 1)]
    assert len(base["losses"]) == STEPS and len(base["aux"]) == STEPS
    assert base["losses"][-1] < base["losses"][0] - 0.5, f"loss did not fall: {base['losses']}"
    for layout in LAYOUTS:
        run = group[layout]
        assert (run["tp"], run["pp"], run["dp"]) == (layout[0], layout[1], layout[2])
        diff = max(abs(a - b) for a, b in zip(run["losses"], base["losses"]))
        aux = max(abs(a - b) for a, b in zip(run["aux"], base["aux"]))
        assert len(run["losses"]) == STEPS and diff <= 1e-4, f"{layout}: max |loss diff| {diff:.2e} vs (1,1,1)"
        assert len(run["aux"]) == STEPS and aux <= 1e-4, f"{layout}: max |aux loss diff| {aux:.2e} vs (1,1,1)"


@pytest.mark.slow
@pytest.mark.parametrize("layout", RESUMED)
def test_resume_with_expert_parallelism_is_bit_exact(group, layout):
    resumed = group[("resumed", *layout)]
    assert resumed["start_iteration"] == 10
    assert resumed["losses"] == group[layout]["losses"][10:]  # exact float equality
    ranks = sorted(p.name for p in (Path(resumed["run_dir"]) / "iter_0000020").iterdir())
    tp, pp, ep = layout
    assert len(ranks) == tp * pp * ep and all(r.endswith(("_000", "_001")) for r in ranks), ranks


@pytest.mark.slow
def test_ep2_checkpoint_trains_at_ep1(group):
    assert abs(group["resharded"][0] - group[(1, 1, 1)]["losses"][0]) <= 1e-5, group["resharded"]


@pytest.mark.slow
@pytest.mark.parametrize("case,expect", [
    ("ep_experts", "does not divide the 4 experts"), ("ep_world", "tp x pp x ep"), ("ep_resume", "ep=2"),
    ("ep_dense", "dense model"), ("ep_allgather", "use alltoall"),
])
def test_bad_expert_parallel_input_is_one_line(group, case, expect):
    code, err = group["bad"][case]
    lines = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert code != 0, err
    assert len(lines) == 1 and lines[0].startswith("megatune sft: error: "), err
    assert expect in lines[0], lines[0]
