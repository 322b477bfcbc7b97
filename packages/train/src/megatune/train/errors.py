"""Errors raised by megatune.train.

One exception type so the CLI can print a single clear line instead of a traceback. Messages follow STYLE.md:
what was wrong, where (file, tensor, flag), and what to do.
"""


class TrainError(RuntimeError):
    """A user-facing training error: the message is one line naming what, where and what to do."""
