"""`leave`: how every megatune entry point ends its process (README "Exit codes")."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAM = """
import atexit, sys
from megatune.argmap.errors import leave
atexit.register(lambda: print("teardown ran", flush=True))
print("said before leaving", end="")  # no newline: only an explicit flush gets it out before os._exit
print("line on stderr", file=sys.stderr, end="")
leave({code})
"""


@pytest.mark.parametrize(("code", "teardown"), [(0, True), (1, True), (2, True), (130, False), (143, False)])
def test_stopped_commands_skip_teardown_and_keep_their_output(code: int, teardown: bool) -> None:
    proc = subprocess.run([sys.executable, "-c", PROGRAM.format(code=code)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == code
    assert proc.stdout.startswith("said before leaving") and proc.stderr.endswith("line on stderr")
    assert ("teardown ran" in proc.stdout) is teardown
