"""What every benchmark file shares: the Example record, finding the data, reading CSV/JSONL, the hub fallback.

A task module (ceval.py, mmlu.py, gsm8k.py, arc.py) exposes:
  NAME, SPLIT, FEWSHOT_SPLIT, KIND ("choice" | "number"), LAYOUT (the local layout, for error messages),
  load(root, split) -> {subject: [Example]}       local files under root/NAME, else the hub, else UserError
  native_prompt(ex, shots) -> str                 the user message of the Native (generate + extract) protocol
  ll_context(ex, shots) -> str                    the lm-evaluation-harness context (loglikelihood protocol)
  ll_continuations(ex) -> [str]                   what is scored after the context, one per choice
"""

from __future__ import annotations

import csv
import json
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from megatune.evaluate.engine import UserError

LETTERS = "ABCDEFGHIJ"


@dataclass
class Example:
    subject: str
    question: str
    choices: list[str]  # option texts in label order (A, B, ...); empty for open questions (GSM8K)
    gold: str  # the letter for multiple choice, the number (as text) for GSM8K
    solution: str = ""  # the worked answer (GSM8K few-shot)
    id: str = ""
    defect: str = ""  # why this row cannot be scored fairly; such rows are counted but skipped when scoring
    extra: dict = field(default_factory=dict)

    @property
    def letters(self) -> str:
        return LETTERS[:len(self.choices)]

    @property
    def gold_index(self) -> int:
        return self.letters.index(self.gold)


def data_root(data_dir: str | os.PathLike | None) -> Path | None:
    """--eval_data_dir, else $MEGATUNE_EVAL_DATA, else None (hub only)."""
    value = data_dir or os.environ.get("MEGATUNE_EVAL_DATA")
    return Path(value).expanduser() if value else None


def read_csv(path: Path, header: bool) -> Iterator[dict | list]:
    # newline="" matters: fields hold embedded newlines and CRs, so never split these files by lines
    with open(path, newline="", encoding="utf-8-sig") as f:
        yield from (csv.DictReader(f) if header else csv.reader(f))


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def csv_subjects(folder: Path, split: str) -> dict[str, Path]:
    """{subject: file} for folder/<split>/<subject>_<split>.csv, sorted by subject."""
    suffix = f"_{split}.csv"
    files = sorted((folder / split).glob(f"*{suffix}"))
    return {p.name[:-len(suffix)]: p for p in files}


def load_csv_subjects(folder: Path, split: str, header: bool, make: Callable) -> dict[str, list[Example]]:
    """{subject: [make(subject, row, where)]} for folder/<split>/<subject>_<split>.csv ({} if none).

    `where` names the CSV record (after any header), not the line: fields span lines in these files."""
    return {s: [make(s, row, f"{path} record {i + 1}") for i, row in enumerate(read_csv(path, header=header))]
            for s, path in csv_subjects(folder, split).items()}


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


def hub_or_fail(name: str, root: Path | None, layout: str, fetch: Callable[[], dict]) -> dict:
    """Fetch from the hub when we may; otherwise (or when that fails) one error naming the expected local layout."""
    reason = offline_reason()
    if reason is None:
        try:
            return fetch()
        except Exception as e:  # network, auth, renamed repo: all end in the same advice
            reason = f"the hub download failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
    where = f"nothing usable under {root / name}" if root else "no --eval_data_dir / MEGATUNE_EVAL_DATA"
    raise UserError(f"{name}: {where}, and {reason}; put the data at <eval_data_dir>/{name}/ as {layout}")


def load_hub(repo: str, config: str | None, split: str):
    from datasets import load_dataset

    return load_dataset(repo, config, split=split)


def limit_per_subject(data: dict[str, list[Example]], limit: int | None) -> dict[str, list[Example]]:
    return data if limit is None else {s: rows[:limit] for s, rows in data.items()}


def choices_block(ex: Example) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in zip(ex.letters, ex.choices))
