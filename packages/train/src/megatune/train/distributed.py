"""Process-group setup for megatron-core, and a helper that runs a function in N local gloo processes (tests).

`init_distributed(tp, pp)` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); without it, it runs as a single process on a free local port. Device and backend come from the device
policy (policy.py: nccl on GPU; gloo on the CPU, where installing the policy enables cpu_mode's patches first). It
then calls megatron-core's `parallel_state.initialize_model_parallel` and seeds python/numpy/torch plus
megatron-core's RNG tracker the way Megatron-LM does (seed + 100 * pp_rank; the tracker adds per-TP-rank offsets).

`run_local(world_size, fn, *args)` starts `world_size` fresh processes that each call `fn(rank, world_size, *args)`
with the torchrun variables set (so `fn` can call `init_distributed`), and returns the per-rank results. An exception
in any rank is re-raised in the caller with that rank's traceback. `fn`, `args` and the results must be picklable.
Without CUDA the processes fork from a forkserver that has imported torch and megatron-core once (measured on a
2-core box: a 4-process group starts in 0.6 s instead of 20 s); they inherit the environment and working
directory the forkserver started with, so callers pass what a rank needs as arguments (as `fn`'s args), not by
changing os.environ or the cwd between calls.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pickle
import random
import traceback

import numpy as np
import torch
from megatune.train import policy as device_policy
from megatune.train.errors import TrainError
from megatune.train.launch import free_port  # noqa: F401 - re-exported: tests and callers use distributed.free_port


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    backend: str
    ep: int = 1  # expert parallelism: carved out of dp (megatron-core); experts split over ep ranks
    ep_rank: int = 0


def init_distributed(tp: int = 1, pp: int = 1, *, ep: int = 1, backend: str | None = None, seed: int = 42,
                     timeout_minutes: int = 30, policy: device_policy.DevicePolicy | None = None) -> DistInfo:
    """Initialise torch.distributed + megatron-core model parallel state for this process; returns its coordinates.
    `policy`: installed first (None: the active one, by default the machine's)."""
    from megatron.core import parallel_state, tensor_parallel

    policy = device_policy.install(policy) if policy is not None else device_policy.active()
    backend = backend or policy.backend
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size % (tp * pp * ep) != 0:
        raise TrainError(f"world size {world_size} is not divisible by tp*pp*ep = {tp}*{pp}*{ep}; "
                         f"launch a multiple of {tp * pp * ep} processes or change --tp/--pp/--ep")
    if policy.device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        torch.distributed.init_process_group(
            backend=backend, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        distributed_timeout_minutes=timeout_minutes)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    stage_seed = seed + 100 * pp_rank  # as Megatron-LM: different init/dropout per pipeline stage
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)
    return DistInfo(
        rank=rank, world_size=world_size, local_rank=local_rank, tp=tp, pp=pp, dp=world_size // (tp * pp),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(), pp_rank=pp_rank,
        dp_rank=parallel_state.get_data_parallel_rank(), device=policy.device, backend=backend, ep=ep,
        ep_rank=parallel_state.get_expert_model_parallel_rank())


def destroy() -> None:
    """Tear down megatron-core's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _child(rank: int, world_size: int, port: int, threads: int, fn, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)  # N processes share few cores: oversubscription makes gloo tests crawl
    try:
        result = fn(rank, world_size, *args)
        # Plain pickle (not torch's shared-memory reductions): the payload must outlive this process.
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            destroy()
        except Exception:  # noqa: BLE001 - best-effort cleanup after a failure
            pass


# What every run_local process imports anyway (torch ~3 s, megatron-core ~5 s per process on a CI core): on a CUDA-less
# machine a forkserver imports them once and forks each process from there, so a 4-process run does not pay for
# 4 imports (the train tests start dozens of such groups). Modules that fail to import are skipped by the forkserver.
_PRELOAD = ["torch", "megatron.core", "megatron.core.models.gpt", "megatron.core.optimizer",
            "megatron.core.distributed", "megatron.core.pipeline_parallel", "megatune.train.model",
            "megatune.train.steps", "megatune.train.optim", "megatune.train.runtime", "megatune.train.distributed"]


def _context():
    """spawn on CUDA machines (a forked CUDA is unusable, and the server's imports may touch the driver), else a
    forkserver preloaded with _PRELOAD: its processes start with megatron-core imported but never initialised."""
    import torch.multiprocessing as mp

    if torch.cuda.is_available():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_local(world_size: int, fn, *args, timeout: float = 300.0, threads: int = 1) -> list:
    """Run fn(rank, world_size, *args) in `world_size` fresh processes over gloo (forked from a preloaded forkserver
    on CUDA-less machines, spawned otherwise: _context); return results by rank."""
    import queue as queue_mod

    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, threads, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        while len(results) + len(errors) < world_size:
            try:
                rank, ok, payload = queue.get(timeout=timeout)
            except queue_mod.Empty:
                raise TrainError(f"run_local: ranks {sorted(set(range(world_size)) - set(results) - set(errors))} "
                                 f"gave no result within {timeout:.0f}s (deadlock in a collective?)") from None
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
                # A failed rank usually leaves its peers blocked in a collective: stop waiting for them.
                break
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"run_local: rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]
