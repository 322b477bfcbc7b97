"""Reading users' data files: UTF-8 only, and every problem named by file and line.

A file in another encoding (a GBK C-Eval CSV, a Latin-1 JSONL) is refused with "FILE line N: not UTF-8" instead of
a UnicodeDecodeError traceback. CSV is parsed from the decoded text with newline="" semantics (benchmark fields
hold embedded newlines and CRs), JSONL is split on "\\n" only (U+2028 may appear inside a JSON string).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

from megatune.evaluate.errors import EvalError


def not_utf8(where: str, data: bytes, err: UnicodeDecodeError) -> EvalError:
    line = data[:err.start].count(b"\n") + 1
    return EvalError(f"{where} line {line}: not UTF-8 (byte 0x{data[err.start]:02x}); re-save the file as UTF-8, "
                     f"e.g. `iconv -f GBK -t UTF-8` or `iconv -f LATIN1 -t UTF-8`")


def read_text(path: Path) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise EvalError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise not_utf8(str(path), data, e) from None


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line."""
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path} line {lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise EvalError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_json(path: Path):
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EvalError(f"{path} line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None


def read_csv(path: Path, header: bool) -> list:
    """Rows as dicts (header) or lists; a malformed file is named with the line csv stopped at."""
    reader_input = io.StringIO(read_text(path), newline="")
    reader = csv.DictReader(reader_input) if header else csv.reader(reader_input)
    try:
        return list(reader)
    except csv.Error as e:
        line = reader.line_num if not header else reader.reader.line_num
        raise EvalError(f"{path} line {line}: not valid CSV ({e})") from None
