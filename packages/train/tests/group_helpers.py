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
