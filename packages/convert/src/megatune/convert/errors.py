"""The one exception type of megatune.convert: the CLI turns it into a single stderr line and exit code 1."""

from __future__ import annotations


class ConvertError(Exception):
    """Bad input for a conversion. The message says what was wrong, where (file / tensor name), and what to do."""
