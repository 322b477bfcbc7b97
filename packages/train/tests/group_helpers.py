"""What the multi-layout training tests share: acting as one rank of a group, and rewinding run dirs.

A test's `_group(rank, world, ...)` runs in each of `distributed.run_local`'s processes; for every layout it joins a
fresh process group (`as_rank`), trains with `cli.run`, and for resume tests `rewind`s the run dirs so that they
look as if the later saves never happened (a crash after the save of `iteration`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path


def as_rank(rank: int, world: int, port: int) -> None:
    """Make this process rank `rank` of a `world`-process group at MASTER_PORT `port` (the next init reads it)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_PORT=str(port))


def rewind(rank: int, out_dir: str | Path, run_dirs: Iterable[str | Path], iteration: int) -> None:
    """Rank 0 points each run dir's tracker at `iteration` (only rank 0 reads `run_dirs`: a rank that did not train
    every layout passes []); every rank waits until it has (cli.run tore the process
    group down, so a marker file stands for the barrier)."""
    from megatune.convert import ckpt_layout

    ready = Path(out_dir) / "rewound"
    if rank == 0:
        for run_dir in run_dirs:
            ckpt_layout.write_latest(run_dir, iteration)
        ready.write_text("")
    while not ready.exists():
        time.sleep(0.2)


STEPS = 20  # sft_argv's max_steps


def sft_argv(model_dir, out_dir, **overrides) -> list[str]:
    """A small, fast, fp32 `megatune sft` command line on the tiny model (self-cognition, STEPS steps, saves at 10)."""
    flags = {
        "model_id_or_path": str(model_dir), "dataset": "self-cognition#80", "model_name": ["小黄", "Xiao Huang"],
        "model_author": ["魔搭", "ModelScope"], "max_length": 64, "learning_rate": 1e-3, "batch_size": 1,
        "global_batch_size": 4, "max_steps": STEPS, "logging_steps": 1, "eval_steps": 1000, "save_steps": 10,
        "dtype": "fp32", "dataset_test_ratio": 0.0, "output_dir": str(out_dir), "seed": 7,
    }
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        argv.append(f"--{key}")
        argv.extend(str(v) for v in value) if isinstance(value, list) else argv.append(str(value))
    return argv


def run_bad_inputs(cases: dict[str, tuple[int, list[str]]]) -> dict[str, tuple[int, str]]:
    """name -> (exit code, stderr) of `megatune sft` for each name -> (world size it believes in, argv), run in this
    single process (the error comes before any collective)."""
    import contextlib
    import io

    from megatune.train import cli
    from megatune.train.distributed import free_port

    out = {}
    for name, (world, argv) in cases.items():
        as_rank(0, world, free_port())
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(argv)
        out[name] = (code, err.getvalue())
    return out


def train_layouts(rank: int, layouts, ports, argv_for, keys, tag: tuple = ()) -> dict:
    """For each layout (tp, pp, n), a group of tp*pp*n processes (n: dp, or ep carved out of dp): the ranks below
    that size join a fresh group at the layout's port and run `cli.run(argv_for(tp, pp, n))`. Returns
    {tag + layout: {key: result[key] for key in keys}} for the layouts this rank trained in."""
    from megatune.train import cli

    results = {}
    for layout, port in zip(layouts, ports):
        size = layout[0] * layout[1] * layout[2]
        if rank < size:
            as_rank(rank, size, port)
            res = cli.run(argv_for(*layout), progress=False)
            results[tag + tuple(layout)] = {k: res[k] for k in keys}
    return results
