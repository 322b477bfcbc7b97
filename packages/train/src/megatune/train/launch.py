"""Re-launch `megatune sft` under torchrun when swift's launcher variables are set.

ms-swift reads NPROC_PER_NODE / NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT from the environment and, when either
of the first two is set, re-executes itself under `torch.distributed.run`. We do the same so a swift command line
works unchanged. Inside the children torchrun sets LOCAL_RANK, which is how we know not to re-launch again.
Multi-node is plain torchrun + NCCL; nothing here is home-made rendezvous. The re-launch goes through
`python -m megatune.train.launch`, which is torchrun's parse_args/run with its failure report turned into the
exit code, so bad input under torchrun still ends as the ranks' one `megatune sft: error:` line.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence

LAUNCH_VARS = ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def should_relaunch(env: Mapping[str, str] | None = None) -> bool:
    """True when a launcher variable asks for torchrun and we are not already one of its children."""
    env = os.environ if env is None else env
    wants = bool(env.get("NPROC_PER_NODE") or env.get("NNODES"))
    return wants and "LOCAL_RANK" not in env


def local_device_count(env: Mapping[str, str] | None = None) -> int:
    """Processes per node when NPROC_PER_NODE is unset: the visible GPUs, as swift counts them; 1 on CPU."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return max(1, len([d for d in visible.split(",") if d.strip()]))
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:  # torch without CUDA support, or a driver problem: one process per node
        return 1


def torchrun_command(argv: Sequence[str], env: Mapping[str, str] | None = None, module: str = "megatune.train.cli",
                     quiet: bool = False) -> list[str]:
    """`python -m torch.distributed.run --nproc_per_node N ... -m megatune.train.cli <argv>`.

    quiet=True runs the same torchrun through `python -m megatune.train.launch` (see `_torchrun_main`)."""
    env = os.environ if env is None else env
    nproc = env.get("NPROC_PER_NODE") or str(local_device_count(env))
    runner = "megatune.train.launch" if quiet else "torch.distributed.run"
    cmd = [sys.executable, "-m", runner, "--nproc_per_node", nproc]
    cmd += ["--nnodes", env.get("NNODES") or "1"]
    for var in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if env.get(var):
            cmd += [f"--{var.lower()}", env[var]]
    if not env.get("NNODES") or env.get("NNODES") == "1":
        # a single node needs no external rendezvous; --standalone would pick a random port and ignore MASTER_PORT
        if not env.get("MASTER_PORT"):
            cmd += ["--master_port", str(free_port())]
    return [*cmd, "-m", module, *argv]


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port free now, below the kernel's ephemeral range when it can be: a port the OS hands out for bind(0)
    lies inside that range, where the many connections gloo opens between ranks take their source ports, and one of
    them can grab it before the rendezvous listens on it (EADDRINUSE, seen in the CPU test suite)."""
    try:
        first_ephemeral = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32768
    rng = random.SystemRandom()
    if first_ephemeral > 11000:
        for _ in range(200):
            port = rng.randrange(10000, first_ephemeral)
            if _bindable(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relaunch(argv: Sequence[str]) -> int:
    """Run ourselves under torchrun and return its exit code (Ctrl-C is forwarded by the shared process group)."""
    cmd = torchrun_command(argv, quiet=True)
    print("megatune sft: launching torchrun " + " ".join(cmd[3:]), file=sys.stderr, flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130


def _torchrun_main(args: Sequence[str]) -> int:
    """torchrun's own `main`, minus its failure report.

    When a rank exits non-zero, `torch.distributed.run.main` (decorated with @record) prints a 40-line
    ChildFailedError block. Our ranks already printed the one-line `megatune sft: error: ...` (or, for a bug, their
    traceback), so we run the same parse_args/run and only turn that exception into the rank's exit code.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if not os.environ.get("MEGATUNE_TORCHRUN_VERBOSE"):  # its "failed (exitcode: 1)" / SIGTERM log lines, likewise
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(list(args)))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if isinstance(failure.exitcode, int) and failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(_torchrun_main(sys.argv[1:]))
