"""What the benchmark files share: finding the data, reading per-subject CSVs, the hub, the choices block."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from megatune.evaluate.textio import read_csv

LETTERS = "ABCDEFGHIJ"


def data_root(data_dir: str | os.PathLike | None) -> Path | None:
    """--eval_data_dir, else $MEGATUNE_EVAL_DATA, else None (hub only)."""
    value = data_dir or os.environ.get("MEGATUNE_EVAL_DATA")
    return Path(value).expanduser() if value else None


def csv_subjects(folder: Path, split: str) -> dict[str, Path]:
    """{subject: file} for folder/<split>/<subject>_<split>.csv, sorted by subject."""
    suffix = f"_{split}.csv"
    files = sorted((folder / split).glob(f"*{suffix}"))
    return {p.name[:-len(suffix)]: p for p in files}


def load_csv_subjects(folder: Path, split: str, header: bool, make: Callable,
                      subjects: tuple[str, ...] | None) -> dict:
    """{subject: [make(subject, index, row, where)]} for folder/<split>/<subject>_<split>.csv of the chosen subjects
    (None: all) that exist ({} if none). `where` names the CSV record (after any header): fields span lines."""
    found = csv_subjects(folder, split)
    return {s: [make(s, i, row, f"{found[s]} record {i + 1}") for i, row in enumerate(read_csv(found[s], header))]
            for s in found if subjects is None or s in subjects}


def offline_reason() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return f"the hub is off ({var}={os.environ[var]})"
    try:
        import datasets  # noqa: F401
    except ImportError:
        return "`datasets` is not installed for a hub download (pip install datasets)"
    # without a network `datasets` retries for half a minute and floods stderr; one quick connect decides instead
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
    except OSError:
        return f"the hub ({endpoint.hostname}) cannot be reached"
    return None


def load_hub(repo: str, config: str | None, split: str):
    from datasets import load_dataset

    return load_dataset(repo, config, split=split)


def choices_block(choices: list[str], letters: str) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in zip(letters, choices))
