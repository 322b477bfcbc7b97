"""The exception types of megatune.convert: the CLI turns each into a single stderr line and an exit code
(ConvertError 1, UsageError 2)."""

from __future__ import annotations


class ConvertError(Exception):
    """Bad input for a conversion. The message says what was wrong, where (file / tensor name), and what to do."""


class UsageError(ConvertError):
    """A bad command line: unknown flag, bad flag value, or a flag combination that cannot work (exit code 2)."""
