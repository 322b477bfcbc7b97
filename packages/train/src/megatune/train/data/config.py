"""Data configuration and dataset-spec parsing.

`DataConfig` is a plain dataclass, independent of `megatune.argmap`, so the runtime glues CLI arguments to it.
A dataset spec follows ms-swift: `[hub::]name[:subset[/subset2]][#N]` for hub datasets, or a local file path
(`.jsonl/.json/.csv/.parquet`) with an optional `#N`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
TRUNCATION_STRATEGIES = ("delete", "left", "right")


class DataError(ValueError):
    """A user-fixable problem with the data: the message names the spec/file/line and what to do."""


@dataclass
class DataConfig:
    dataset: list[str] = field(default_factory=list)
    val_dataset: list[str] = field(default_factory=list)
    dataset_test_ratio: float = 0.01
    max_length: int = 2048
    truncation_strategy: str = "delete"
    packing: bool = False
    skip_bad_rows: bool = False
    model_name: list[str] | str | None = None
    model_author: list[str] | str | None = None
    system: str | None = None
    seed: int = 42
    num_proc: int = 1
    cache_dir: str | None = None

    def __post_init__(self):
        if isinstance(self.dataset, str):
            self.dataset = [self.dataset]
        if isinstance(self.val_dataset, str):
            self.val_dataset = [self.val_dataset]
        self.dataset = list(self.dataset or [])
        self.val_dataset = list(self.val_dataset or [])
        if self.truncation_strategy not in TRUNCATION_STRATEGIES:
            raise DataError(
                f"truncation_strategy={self.truncation_strategy!r}: expected one of {', '.join(TRUNCATION_STRATEGIES)}"
            )
        if not 0.0 <= self.dataset_test_ratio < 1.0:
            raise DataError(f"dataset_test_ratio={self.dataset_test_ratio}: expected 0 <= ratio < 1")
        if self.max_length < 2:
            raise DataError(f"max_length={self.max_length}: a row needs at least 2 tokens to have a target")
        self.num_proc = max(1, int(self.num_proc or 1))


@dataclass(frozen=True)
class DatasetSpec:
    """One parsed `--dataset` entry. `kind` is "file", "hub" or "self-cognition"."""

    raw: str
    kind: str
    name: str  # file path, registry name / repo id, or "self-cognition"
    hub: str | None = None  # explicit "hf"/"ms" prefix, lower-cased
    subsets: tuple[str, ...] = ()
    sample: int | None = None  # the `#N`

    @property
    def label(self) -> str:
        return self.raw


_SAMPLE_RE = re.compile(r"^(?P<body>.*?)#(?P<n>\d+)$")


def parse_spec(raw: str) -> DatasetSpec:
    """Parse one dataset spec. Local files win when the path has a known suffix or exists on disk."""
    text = raw.strip()
    if not text:
        raise DataError("empty dataset spec")
    sample = None
    m = _SAMPLE_RE.match(text)
    if m:
        text, sample = m.group("body"), int(m.group("n"))
        if sample <= 0:
            raise DataError(f"dataset spec {raw!r}: #N must be a positive row count")
    # A path is checked before the hub syntax because paths may legitimately contain ':' or '/'.
    if text.lower().endswith(LOCAL_SUFFIXES) or os.path.isfile(text):
        if not text.lower().endswith(LOCAL_SUFFIXES):
            raise DataError(f"dataset file {text!r}: unsupported suffix; use one of {', '.join(LOCAL_SUFFIXES)}")
        return DatasetSpec(raw=raw, kind="file", name=text, sample=sample)
    hub = None
    if "::" in text:
        hub, text = text.split("::", 1)
        hub = hub.strip().lower()
        if hub not in ("hf", "ms"):
            raise DataError(f"dataset spec {raw!r}: unknown hub prefix {hub!r}; use HF:: or MS::")
    name, _, subset_part = text.partition(":")
    subsets = tuple(s for s in subset_part.split("/") if s) if subset_part else ()
    if not name:
        raise DataError(f"dataset spec {raw!r}: missing dataset name")
    kind = "self-cognition" if name == "self-cognition" and hub is None else "hub"
    return DatasetSpec(raw=raw, kind=kind, name=name, hub=hub, subsets=subsets, sample=sample)
