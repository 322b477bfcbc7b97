"""Re-launch `megatune sft` under torchrun when swift's launcher variables are set.

ms-swift reads NPROC_PER_NODE / NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT from the environment and, when either
of the first two is set, re-executes itself under `torch.distributed.run`. We do the same so a swift command line
works unchanged. Inside the children torchrun sets LOCAL_RANK, which is how we know not to re-launch again.
Multi-node is plain torchrun + NCCL; nothing here is home-made rendezvous. The re-launch execs
`python -m megatune.train.launch`, which is torchrun's parse_args/run with its failure report turned into the
exit code, so bad input under torchrun still ends as the ranks' one `megatune sft: error:` line.

Stopping: the launcher's pid becomes the agent's (exec), so SIGTERM / SIGHUP / Ctrl-C reach torchrun, which stops
every rank; we exit 128 + the signal (143, 129, 130). Each rank runs `megatune.train.cli` (rank_main), which asks the kernel to kill it
when the agent dies (kill -9 of the launcher or its process group leaves no rank behind). When a rank is killed,
the agent names it and its signal in one line, and the ranks that lost it as a peer exit without a traceback.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from megatune.argmap.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

LAUNCH_VARS = ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
AGENT_PID = "MEGATUNE_AGENT_PID"  # set by the torchrun agent for its ranks


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


def relaunch(argv: Sequence[str]) -> NoReturn:
    """Become the torchrun agent (exec): a signal sent to this pid (`kill $!`, a scheduler's SIGTERM) reaches the
    agent, which stops every rank and exits 128 + the signal; the ranks die with the agent even on kill -9."""
    cmd = torchrun_command(argv, quiet=True)  # ranks run megatune.train.cli (its rank_main)
    print("megatune sft: launching torchrun " + " ".join(cmd[3:]), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when `parent` dies (Linux prctl PR_SET_PDEATHSIG).

    torchrun starts each rank in its own session, so a kill -9 of the launcher's process group never reaches the
    ranks, and nothing else would stop them. If the parent is already gone, exit at once."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(128 + signal.SIGKILL)


# gloo/NCCL errors a rank gets when another rank has died under it; the agent names the dead rank instead
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
             "NCCL communicator was aborted")
PEER_LOST_EXIT = 75  # a rank that lost a peer, exiting quietly so that the agent reports the cause


def _failure_line(failures: Mapping[int, Any]) -> tuple[str | None, int]:
    """(one line for the user or None, exit code) for torchrun's {global rank: ProcessFailure}.

    torchrun records failures in the order it saw them: the first is the cause, the ranks after it were stopped by
    the agent (SIGTERM) or lost it as a peer. A rank that exited 1, 2 or 130 printed its own line already."""
    causes = [(rank, f) for rank, f in failures.items() if f.exitcode != PEER_LOST_EXIT]
    if not causes:
        return (f"rank {next(iter(failures))} lost its connection to another rank (did a rank on another node die?); "
                "see the other nodes' output", EXIT_FAILURE)
    rank, f = causes[0]
    if f.exitcode < 0:
        hint = " (out of memory? see `dmesg`)" if -f.exitcode == signal.SIGKILL else ""
        return (f"rank {rank} (pid {f.pid}) was killed by {f.signal_name()}{hint}; the other ranks were stopped",
                EXIT_FAILURE)
    if f.exitcode in (EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED):
        return None, f.exitcode
    return f"rank {rank} (pid {f.pid}) exited with code {f.exitcode}; the other ranks were stopped", EXIT_FAILURE


def _torchrun_main(args: Sequence[str]) -> int:
    """torchrun's own `main`, minus its failure report and with signals turned into exit codes.

    When a rank exits non-zero, `torch.distributed.run.main` (decorated with @record) prints a 40-line
    ChildFailedError block. Our ranks already printed the one-line `megatune sft: error: ...` (or, for a bug, their
    traceback), so we run the same parse_args/run, say in one line which rank died when one was killed, and exit
    with the rank's code. A signal to the agent (SIGTERM, SIGHUP, Ctrl-C) stops every rank: 128 + the signal.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if not os.environ.get("MEGATUNE_TORCHRUN_VERBOSE"):  # its "failed (exitcode: 1)" / SIGTERM log lines, likewise
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ[AGENT_PID] = str(os.getpid())  # the ranks inherit it: see die_with_parent
    try:
        run(parse_args(list(args)))
    except ChildFailedError as e:
        line, code = _failure_line(e.failures)
        if line:
            print(f"megatune sft: error: {line}", file=sys.stderr, flush=True)
        return code
    except SignalException as e:
        if e.sigval != signal.SIGINT:  # on Ctrl-C rank 0 has already said "interrupted"
            print(f"megatune sft: error: terminated ({e.sigval.name}); every rank was stopped", file=sys.stderr,
                  flush=True)
        return 128 + int(e.sigval)  # EXIT_TERMINATED for SIGTERM, EXIT_INTERRUPTED for Ctrl-C, as a shell counts
    return EXIT_OK


def peer_lost(error: BaseException) -> bool:
    """A rank's gloo/NCCL error that only says another rank died (the agent names that rank instead)."""
    return isinstance(error, RuntimeError) and any(text in str(error) for text in PEER_LOST) and \
        not os.environ.get("MEGATUNE_TORCHRUN_VERBOSE")


if __name__ == "__main__":  # the agent (see relaunch); its ranks run megatune.train.cli
    sys.exit(_torchrun_main(sys.argv[1:]))
