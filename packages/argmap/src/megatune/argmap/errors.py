"""One error type for every bad argument, with a one-line message: what was wrong, where, and what to do."""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterable, Mapping
from typing import NoReturn

# Exit codes of every megatune command (README "Exit codes"): 128 + the signal for a stopped command, as a shell does.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


def leave(code: int) -> NoReturn:
    """End the process with `code`; every megatune entry point calls this with what its main returned.

    Interpreter teardown with torch, megatron-core and transformers loaded spends ~2.5 s collecting the garbage of
    ~540k objects (measured on the CPU machine), and destroying a leftover gloo/NCCL process group there can block
    (a CI run saw a SIGTERM'd `sft` print its line and not exit within 120 s). So: after success or an error (0/1/2)
    the objects alive now are frozen out of the collector (gc.freeze; atexit handlers and reference-count frees still
    run, cyclic garbage is left to the OS) and the process exits normally: 0.4 s instead of 2.6-3.3 s. A stopped
    command (130/143) has run its `finally` blocks and printed its line: its multiprocessing children (a checkpoint
    writer, data workers) are stopped and it exits at once, without teardown."""
    if code not in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        import gc

        gc.freeze()
        sys.exit(code)
    if "multiprocessing" in sys.modules:  # what multiprocessing's own exit handler would do, for every child
        children = sys.modules["multiprocessing"].active_children()
        for child in children:
            child.terminate()
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.kill()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to say
            pass
    os._exit(code)


class ArgumentError(ValueError):
    """A bad command-line / config-file argument. `str(err)` is a single line meant for the user."""

    def __init__(self, where: str, what: str, todo: str = "") -> None:
        self.where, self.what, self.todo = where, what, todo
        message = f"{where}: {what}" if where else what
        super().__init__(f"{message}; {todo}" if todo else message)


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like `name` (difflib, cutoff 0.6), or None."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_name_error(name: str, candidates: Iterable[str], where: str = "", kind: str = "argument",
                       hints: Mapping[str, str] | None = None) -> ArgumentError:
    """`unknown argument --lr; did you mean --learning_rate?` (or a pointer to --help when nothing is close).

    `hints` maps names people type by habit (e.g. Megatron's `lr`) to the real one; difflib covers typos.
    """
    flag = "--" + name
    guess = (hints or {}).get(name) or closest(name, candidates)
    todo = f"did you mean --{guess}?" if guess else "run with --help to list the arguments"
    return ArgumentError(where or flag, f"unknown {kind} {flag}", todo)
