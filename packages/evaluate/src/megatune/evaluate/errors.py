"""The error types of megatune.evaluate and the exit code each one ends in (the codes every megatune command uses,
from megatune.argmap.errors: 2 usage error, 1 runtime failure, 130 interrupted, 143 terminated).

Both messages are one line meant for the user: what was wrong, where (flag, file, line), and what to do.
"""

from __future__ import annotations


class EvalError(Exception):
    """A runtime failure (exit 1): a data file that cannot be read or parsed, a model folder that does not load,
    an output folder that cannot be written."""


class UsageError(EvalError):
    """A bad command line (exit 2): an unknown flag or dataset, a path that does not exist, a flag combination that
    cannot work, an optional extra the chosen flag needs."""
