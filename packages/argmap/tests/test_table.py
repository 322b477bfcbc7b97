"""README.md's table is the code's table; `python -m megatune.argmap.table` prints it; no torch is imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from megatune.argmap.table import BEGIN, END, markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_matches_code() -> None:
    text = README.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, "README.md lost its table markers"
    embedded = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert embedded == markdown_table(), "README.md is stale: paste `python -m megatune.argmap.table` into it"


def test_module_prints_table_and_imports_no_torch() -> None:
    code = "import runpy, sys; runpy.run_module('megatune.argmap.table', run_name='__main__'); " \
           "assert 'torch' not in sys.modules and 'yaml' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == markdown_table()
