"""Signal dispositions for the child processes a test interrupts."""

from __future__ import annotations

import signal


def default_sigint() -> None:
    """`preexec_fn` for a child that a test stops with SIGINT (Ctrl-C): give it Ctrl-C's default disposition.

    A shell starts a background job (`nox -s tests &`, `nohup ...`) with SIGINT ignored; children inherit that, and a
    Python started with SIGINT ignored never raises KeyboardInterrupt, so the test would wait on a child that
    rightly ignores the signal it sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
