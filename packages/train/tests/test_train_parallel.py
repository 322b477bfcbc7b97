"""Real megatron-core over gloo on the CPU, all in ONE spawned group of 4 processes (imports, data building and
process start-up are paid once; the whole module takes about a minute and a half on 2 cores):

1. the same 20 steps at (tp, pp, dp) = (1,1,1), (2,1,1), (1,2,1), (1,1,2), (2,2,1) give the same loss curve,
   with sequence parallelism / full / no recompute switched on in some of them (EXTRA); for each layout the first
   tp*pp*dp processes form a fresh process group on a fresh port, the others sit out. Packed rows too (PACKED);
2. resume: the (1,1,1) and (1,2,1) runs saved at iteration 10; rewinding `latest` to 10 (what a crash after
   that save leaves) and resuming reproduces iterations 11..20 bit-exactly (optimizer, scheduler, RNG, data);
3. bad input through `cli.main` in-process on rank 0: one `megatune sft: error:` line, exit code != 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from group_helpers import STEPS, rewind, run_bad_inputs, sft_argv, train_layouts
from megatune.train.distributed import free_port, run_local

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1)]
# the same math must come out whatever the execution options: vary them across layouts for free coverage
EXTRA = {(2, 1, 1): {"sequence_parallel": "true"}, (1, 2, 1): {"recompute_granularity": "full"},
         (1, 1, 2): {"recompute_granularity": "none"}, (2, 2, 1): {"sequence_parallel": "true"}}
PACKED = [(1, 1, 1), (1, 2, 1)]  # packed rows (document-masked attention) through no-pipelining and 1F1B
RESUMED = [(1, 1, 1), (1, 2, 1)]


def _bad_inputs(model_dir: str, out_dir: str, tp2_run: str) -> dict[str, tuple[int, str]]:
    """name -> (exit code, stderr) of `megatune sft` on bad input, single process."""
    blocker = Path(out_dir) / "a-file"
    blocker.write_text("")
    cases = {
        "tp_heads": (3, sft_argv(model_dir, out_dir, tp=3)),  # 8 heads / 2 KV heads over tp=3
        "tp_pp_world": (1, sft_argv(model_dir, out_dir, tp=2)),  # tp x pp = 2 does not divide world size 1
        "ckpt_tp_mismatch": (1, sft_argv(model_dir, out_dir, resume_from_checkpoint=tp2_run, tp=1)),
        "empty_dataset": (1, sft_argv(model_dir, out_dir, max_length=8)),
        "unwritable_output": (1, sft_argv(model_dir, str(blocker / "sub"))),
        "missing_checkpoint": (1, sft_argv(model_dir, out_dir, resume_from_checkpoint=str(blocker) + "-nope")),
        "unknown_flag": (1, [*sft_argv(model_dir, out_dir), "--learning_rat", "1"]),
        "fp8_native": (1, sft_argv(model_dir, out_dir, fp8_format="hybrid")),  # FP8 needs the TE spec
        "fp8_recipe": (1, sft_argv(model_dir, out_dir, fp8_format="hybrid", fp8_recipe="fast")),
    }
    return run_bad_inputs(cases)


def _group(rank: int, world: int, model_dir: str, out_dir: str, ports: list[int]) -> dict:
    def argv(tp, pp, dp, **flags):
        return sft_argv(model_dir, out_dir, tp=tp, pp=pp, **EXTRA.get((tp, pp, dp), {}), **flags)

    results = train_layouts(rank, LAYOUTS, ports, argv, ("losses", "run_dir", "tp", "pp", "dp", "last_saved"))
    # the run dirs now look as if the save of iteration 20 never happened
    rewind(rank, out_dir, [results[layout]["run_dir"] for layout in RESUMED] if rank == 0 else [], 10)
    results |= train_layouts(rank, RESUMED, ports[len(LAYOUTS):],
                             lambda tp, pp, dp: sft_argv(model_dir, out_dir, tp=tp, pp=pp,
                                                         resume_from_checkpoint=results[(tp, pp, dp)]["run_dir"]),
                             ("losses", "run_dir", "start_iteration"), tag=("resumed",))

    packed = train_layouts(rank, PACKED, ports[len(LAYOUTS) + len(RESUMED):],
                           lambda tp, pp, dp: sft_argv(model_dir, out_dir, tp=tp, pp=pp, packing="true",
                                                       max_length=128, max_steps=6, global_batch_size=2),
                           ("losses",), tag=("packed",))
    results |= {key: run["losses"] for key, run in packed.items()}

    if rank == 0:
        results["bad"] = _bad_inputs(model_dir, out_dir, results[(2, 1, 1)]["run_dir"])
    return results


@pytest.fixture(scope="module")
def group(tiny_qwen2, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    ports = [free_port() for _ in range(len(LAYOUTS) + len(RESUMED) + len(PACKED))]
    return run_local(4, _group, str(tiny_qwen2), str(out), ports, timeout=600)[0]


@pytest.mark.slow
def test_same_loss_curve_for_every_layout(group):
    base = group[(1, 1, 1)]["losses"]
    assert len(base) == STEPS
    assert base[-1] < base[0] - 0.5, f"loss did not fall: {base}"
    for layout in LAYOUTS:
        run = group[layout]
        assert (run["tp"], run["pp"], run["dp"]) == layout
        diff = max(abs(a - b) for a, b in zip(run["losses"], base))
        assert len(run["losses"]) == STEPS and diff <= 1e-4, f"{layout}: max |loss diff| {diff:.2e} vs (1,1,1)"


@pytest.mark.slow
def test_packed_rows_same_loss_with_pipeline(group):
    single, piped = group[("packed", 1, 1, 1)], group[("packed", 1, 2, 1)]
    assert len(single) == 6 and all(loss == loss for loss in single)
    assert max(abs(a - b) for a, b in zip(single, piped)) <= 1e-4, (single, piped)


@pytest.mark.slow
@pytest.mark.parametrize("layout", RESUMED)
def test_resume_is_bit_exact(group, layout):
    resumed = group[("resumed", *layout)]
    assert resumed["start_iteration"] == 10
    assert resumed["run_dir"] != group[layout]["run_dir"]  # a resumed run writes a new version dir
    assert resumed["losses"] == group[layout]["losses"][10:]  # exact float equality, not approx
    assert (Path(resumed["run_dir"]) / "iter_0000020").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("case,expect", [
    ("tp_heads", "heads"), ("tp_pp_world", "world size"), ("ckpt_tp_mismatch", "tp=2"),
    ("empty_dataset", "max_length"), ("unwritable_output", "not writable"), ("missing_checkpoint", "no such"),
    ("unknown_flag", "learning_rate"), ("fp8_native", "--transformer_impl te"), ("fp8_recipe", "--fp8_recipe"),
])
def test_bad_input_is_one_line(group, case, expect):
    code, err = group["bad"][case]
    lines = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert code != 0, err
    assert len(lines) == 1 and lines[0].startswith("megatune sft: error: "), err
    assert expect in lines[0], lines[0]
