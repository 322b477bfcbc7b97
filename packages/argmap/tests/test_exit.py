"""`leave`: how every megatune entry point ends its process (README "Exit codes")."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

PROGRAM = """
import atexit, multiprocessing, sys, time
from megatune.argmap.errors import leave

if __name__ == "__main__":
    atexit.register(lambda: print("teardown ran", flush=True))
    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(120,))
    child.start()
    print(f"child {{child.pid}}", flush=True)
    print("said before leaving", end="")  # no newline: only an explicit flush gets it out before os._exit
    print("line on stderr", file=sys.stderr, end="")
    if {code} in (0, 1, 2):
        child.terminate()  # a normal exit joins non-daemonic children: the program ends them itself
    leave({code})
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(("code", "teardown"), [(0, True), (1, True), (2, True), (130, False), (143, False)])
def test_leave_keeps_output_and_skips_teardown_only_when_stopped(tmp_path, code: int, teardown: bool) -> None:
    script = tmp_path / "prog.py"
    script.write_text(PROGRAM.format(code=code))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    first, rest = proc.stdout.split("\n", 1)
    assert rest.startswith("said before leaving") and proc.stderr.endswith("line on stderr")
    assert ("teardown ran" in rest) is teardown
    pid = int(first.split()[1])
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    survived = _alive(pid)
    if survived:  # end it before failing, so no orphan outlives the test
        os.kill(pid, 9)
    assert not survived, "a stopped command left its multiprocessing child running"
