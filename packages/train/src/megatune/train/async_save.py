"""`--async_save true`: torch_dist tensors are written by a forked process while training goes on.

megatron-core's dist_checkpointing.save(async_sharded_save=True) returns an AsyncRequest: the tensors are staged in
host memory (on the GPU a device-to-host copy; on the CPU the fork's copy-on-write snapshot is the copy), then a
forked process writes the .distcp files. Its finalize steps (metadata.json, then our publish: fsync, swap the
staging directory in, megatune.json, megatron_args.sh, the tracker last) run in the training process once every
rank's writer has finished, which `finalize()` checks with one small all-reduce per call (every rank calls it after
each iteration, as Megatron-LM does). A kill at any point before the tracker is replaced keeps the previous
checkpoint as the latest one; the orphaned staging directory is removed by the next save in that directory.

One save is in flight at a time: a new save first waits for the previous one (blocking finalize).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from megatune.train.errors import TrainError

# test hook: seconds[@iteration] the forked writer waits before writing (lets a test kill -9 the run mid-write)
WRITE_SLEEP_ENV = "MEGATUNE_TEST_ASYNC_WRITE_SLEEP"


def _slow(request, iteration: int):
    seconds, _, only_at = os.environ.get(WRITE_SLEEP_ENV, "").partition("@")
    sleep = float(seconds or 0)
    if sleep <= 0 or request.async_fn is None or (only_at and int(only_at) != iteration):
        return request
    write = request.async_fn

    def slow_write(*args, **kwargs):
        print(f"megatune-test: async writer of iteration {iteration} sleeping {sleep}s", flush=True)
        time.sleep(sleep)
        return write(*args, **kwargs)

    return request._replace(async_fn=slow_write)


class AsyncWriter:
    """The training process's side of asynchronous saves (megatron-core's AsyncCallsQueue)."""

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue()

    def schedule(self, request, iteration: int, publish: Callable[[], None]) -> None:
        """Start writing `request` (every rank calls); `publish` runs on every rank once all writes are done."""
        request.add_finalize_fn(publish)
        self.queue.schedule_async_request(_slow(request, iteration))

    def finalize(self, blocking: bool = False, where: str = "") -> list[int]:
        """Publish the saves whose writes have finished on every rank (a collective); `blocking`: wait for them."""
        from megatron.core.dist_checkpointing.core import CheckpointingException

        try:
            return self.queue.maybe_finalize_async_calls(blocking=blocking)
        except CheckpointingException as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainError(f"{where}: an asynchronous checkpoint write failed ({first}); the previous checkpoint is "
                             f"kept; check free space and permissions of --output_dir") from None

    @property
    def pending(self) -> int:
        return self.queue.get_num_unfinalized_calls()
