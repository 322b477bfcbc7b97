import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_DATA = REPO / "src" / "megatune" / "cli" / "demo_data"


def megatune(*args: str, env: dict | None = None, stdin: str | None = None, cwd: Path | None = None,
             check: bool = True, timeout: float = 1200) -> subprocess.CompletedProcess:
    """Run `megatune ...` exactly as a user would (a fresh process), return the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "megatune.cli.main", *args], env=full_env, input=stdin, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"megatune {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def sft_file() -> Path:
    """The real Alpaca demo data when ../shared/data is present, else the built-in slice of it."""
    real = SHARED_DATA / "sft" / "alpaca_en_demo.json"
    return real if real.exists() else DEMO_DATA / "sft" / "alpaca_en_short.jsonl"


@pytest.fixture(scope="session")
def eval_data() -> Path:
    return SHARED_DATA if (SHARED_DATA / "mmlu").exists() else DEMO_DATA
