"""Issue 15: stopping a multi-process `megatune sft` (NPROC_PER_NODE=2, a real torchrun run on the CPU).

- SIGTERM / SIGHUP to the launcher's pid (`kill $!`), Ctrl-C to its process group: every rank stops, the launcher
  exits 143 / 129 / 130, and no checkpoint or log line is written afterwards;
- SIGKILL to the launcher's whole process group: no rank is left running (they die with their parent);
- one rank killed: the launcher names it and its signal in one line, without the survivor's traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from group_helpers import sft_argv


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            out.setdefault(int(fields[1]), []).append(int(entry.name))
    return out


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pids) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if state[state.rindex(")") + 2] != "Z":
            alive.add(pid)
    return alive


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


class Launch:
    """`NPROC_PER_NODE=2 megatune sft ...` in its own process group, as a shell runs a background job."""

    def __init__(self, model: Path, out: Path) -> None:
        from megatune.convert.testing import make_tiny_model

        make_tiny_model("qwen2", model, seed=0)
        self.out = out
        argv = sft_argv(model, out, tp=2, max_steps=100000, save_steps=3, logging_steps=1, max_length=32)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(NPROC_PER_NODE="2", OMP_NUM_THREADS="1")
        # stderr to a file: orphaned ranks (the defect) would hold a pipe open forever
        self.stderr = out.parent / "stderr.txt"
        with open(self.stderr, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "megatune.train.cli", *argv], env=env,
                                         stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        self.seen: set[int] = set()

    def run_dirs(self) -> list[Path]:
        return sorted(self.out.glob("*/v*-*"))

    def state(self) -> tuple[list[str], int]:
        """(checkpoint dirs, logged lines) of the run dir."""
        (run_dir,) = self.run_dirs()
        log = run_dir / "logging.jsonl"
        lines = len(log.read_text().splitlines()) if log.is_file() else 0
        return sorted(p.name for p in run_dir.glob("iter_*")), lines

    def wait_for_training(self, timeout: float = 240) -> None:
        """Until two ranks run and a step was logged; remembers every process of the job."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, self.stderr.read_text()[-3000:]
            self.seen |= _descendants(self.proc.pid)
            if self.run_dirs() and self.state()[1] >= 1 and len(self.ranks()) == 2:
                return
            time.sleep(0.5)
        raise AssertionError("training did not start")

    def ranks(self) -> dict[int, int]:
        return {rank: pid for pid in _descendants(self.proc.pid) if (rank := _rank_of(pid)) is not None}

    def wait(self, timeout: float = 90) -> tuple[int | None, str]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.proc.returncode, self.stderr.read_text(errors="replace")

    def survivors(self, grace: float = 15) -> set[int]:
        deadline = time.time() + grace
        while (alive := _alive(self.seen)) and time.time() < deadline:
            time.sleep(0.25)
        return alive

    def cleanup(self) -> None:
        for pid in _alive(self.seen | {self.proc.pid}):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


PARENT = """
import os, subprocess, sys, time
child = '''
import os, sys, time
from megatune.train.launch import die_with_parent
die_with_parent(int(sys.argv[1]))
print(os.getpid(), flush=True)
time.sleep(120)
'''
subprocess.Popen([sys.executable, "-c", child, str(os.getpid())], start_new_session=True)
time.sleep(120)
"""


def test_a_rank_dies_with_its_parent():
    """torchrun starts ranks in their own session: only die_with_parent stops one when the agent is killed."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert _alive([child])
        parent.kill()
        parent.wait()
        deadline = time.time() + 10
        while _alive([child]) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive([child])
    finally:
        for pid in _alive([child]):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def launch(tmp_path):
    job = Launch(tmp_path / "tiny-qwen2", tmp_path / "out")
    yield job
    job.cleanup()


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "group", "code"), [(signal.SIGTERM, False, 143), (signal.SIGHUP, False, 129),
                                                    (signal.SIGINT, True, 130)], ids=["SIGTERM", "SIGHUP", "ctrl-c"])
def test_signal_stops_every_rank(launch, sig, group, code):
    launch.wait_for_training()
    (os.killpg if group else os.kill)(launch.proc.pid, sig)
    rc, err = launch.wait()
    assert not launch.survivors(), f"ranks still running after {sig.name}: {err[-2000:]}"
    assert rc == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    said = "interrupted" if sig == signal.SIGINT else f"terminated ({sig.name}); every rank was stopped"
    assert f"megatune sft: error: {said}" in err, err[-3000:]
    after_exit = launch.state()
    time.sleep(3)
    assert launch.state() == after_exit  # nothing trains or saves after the stop


@pytest.mark.slow
def test_kill_9_of_the_process_group_leaves_no_rank(launch):
    launch.wait_for_training()
    os.killpg(launch.proc.pid, signal.SIGKILL)
    launch.wait()
    assert not launch.survivors(), "orphaned ranks keep training after kill -9 of the launcher's group"
    after = launch.state()
    time.sleep(3)
    assert launch.state() == after


@pytest.mark.slow
def test_a_dead_rank_is_named_in_one_line(launch):
    launch.wait_for_training()
    os.kill(launch.ranks()[1], signal.SIGKILL)
    rc, err = launch.wait()
    assert rc == 1, err[-3000:]
    errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line
              or "peer" in line]
    assert len(errors) == 1 and errors[0].startswith("megatune sft: error: rank 1 "), err[-3000:]
    assert "SIGKILL" in errors[0]
    assert not launch.survivors()
