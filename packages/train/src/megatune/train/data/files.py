"""Local dataset files: the checks that let an error say `FILE line N: ...` instead of a loader's traceback.

`datasets` reads JSON/CSV through pyarrow and pandas, whose errors carry no line (`DatasetGenerationError`,
`StopIteration` for an empty file) and whose JSON reader does not even validate UTF-8 (a Latin-1 file loads, then
fails later while decoding a column). So two cheap checks run before every load of a text file (empty, not UTF-8:
one streaming pass in 16 MiB chunks), and when the loader still fails, `diagnose` re-reads the file with the
standard library to find the first bad line. Parquet is binary and self-describing; it gets neither.
"""

from __future__ import annotations

import codecs
import csv
import json
from pathlib import Path

from .config import DataError

_CHUNK = 16 << 20
TEXT_SUFFIXES = (".jsonl", ".json", ".csv")


def check_text_file(path: Path) -> None:
    """DataError for an empty (or blank) file, or for the first line that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    blank = True
    with open(path, "rb") as f:
        try:
            while chunk := f.read(_CHUNK):
                decoder.decode(chunk)
                blank = blank and not chunk.strip()
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(_first_non_utf8(path)) from None
    if blank:
        raise DataError(f"{path}: the file is empty; a dataset file needs at least one row")


def _first_non_utf8(path: Path) -> str:
    todo = "re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 IN > OUT`"
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):  # b"\n" never occurs inside a UTF-8 multi-byte character
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{path} line {number}: not UTF-8 (byte 0x{line[e.start]:02x} at byte {e.start + 1}); {todo}"
    return f"{path}: not UTF-8; {todo}"


def diagnose(path: Path) -> str | None:
    """`FILE line N: what` for the first thing a JSON/JSONL/CSV loader chokes on, or None when nothing is found."""
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".csv":
        return _diagnose_csv(path, text)
    if suffix == ".json" and text.lstrip().startswith("["):
        return _diagnose_json_document(path, text)
    return _diagnose_json_lines(path, text)  # `datasets` reads a .json file of one object per line as JSON Lines


def _diagnose_json_lines(path: Path, text: str) -> str | None:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno}); one JSON object per line"
        if not isinstance(value, dict):
            return f"{path} line {number}: expected a JSON object ({{...}}), got {type(value).__name__}"
    return None


def _diagnose_json_document(path: Path, text: str) -> str | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); the file must be one JSON array"
    bad = next((i for i, row in enumerate(value) if not isinstance(row, dict)), None)
    if bad is not None:
        return f"{path} row {bad + 1} of the JSON array: expected a JSON object ({{...}}), got {type(value[bad]).__name__}"
    return None


def _diagnose_csv(path: Path, text: str) -> str | None:
    reader = csv.reader(text.splitlines(keepends=True), strict=True)
    start = 1
    try:
        header = next(reader, None)
        if header is None:
            return f"{path}: no header row"
        start = reader.line_num + 1
        for row in reader:
            if len(row) != len(header):
                return (f"{path} line {start}: {len(row)} fields, the header has {len(header)}; quote fields that "
                        "contain commas")
            start = reader.line_num + 1
    except csv.Error as e:
        return f"{path} line {start}: broken CSV record ({e}); check the quotes from this line on"
    return None
