"""`--eval_dataset` specs: NAME[:SUBSET[,SUBSET...]][#N], as `sft`'s dataset specs (`/` also separates subsets).

    mmlu                          every MMLU subject          arc:easy,challenge   both ARC sets
    mmlu:abstract_algebra,anatomy two subjects                ceval:computer_network#20
    gsm8k#50                      the first 50 problems

`#N` keeps the first N samples of each subject of that dataset (it is --eval_limit for that dataset alone, and
wins over it); lm-evaluation-harness's --limit counts the same way (one task per MMLU subject).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from megatune.evaluate.errors import UsageError

_SPEC = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)(?::(?P<subsets>[^#]*))?(?:#(?P<limit>[^#]*))?")
FORMAT = "NAME[:SUBSET[,SUBSET]][#N], e.g. mmlu:abstract_algebra,anatomy#10"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    subsets: tuple[str, ...] = ()  # () = the task's default subsets
    limit: int | None = None  # at most this many samples per subject

    def __str__(self) -> str:
        return self.name + (f":{','.join(self.subsets)}" if self.subsets else "") + (
            f"#{self.limit}" if self.limit is not None else "")


def parse_spec(text: str) -> DatasetSpec:
    m = _SPEC.fullmatch(text.strip())
    if not m:
        raise UsageError(f"--eval_dataset {text!r}: expected {FORMAT}")
    subsets: tuple[str, ...] = ()
    if m.group("subsets") is not None:
        subsets = tuple(s.strip() for s in re.split(r"[,/]", m.group("subsets")))
        if not all(subsets):
            raise UsageError(f"--eval_dataset {text!r}: an empty subset name; expected {FORMAT}")
    limit = None
    if m.group("limit") is not None:
        if not m.group("limit").isdigit() or int(m.group("limit")) < 1:
            raise UsageError(f"--eval_dataset {text!r}: #N needs a whole number >= 1; expected {FORMAT}")
        limit = int(m.group("limit"))
    return DatasetSpec(m.group("name").lower(), subsets, limit)


def parse_specs(texts: Sequence[str], known: Mapping) -> list[DatasetSpec]:
    """Every spec parsed, its name known, each dataset named once (its subsets together: mmlu:a,b)."""
    specs = [parse_spec(t) for t in texts]
    unknown = [s.name for s in specs if s.name not in known]
    if unknown:
        raise UsageError(f"--eval_dataset {' '.join(unknown)}: unknown; choose from {' '.join(known)}")
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise UsageError(f"--eval_dataset names {s.name} twice; list its subsets in one spec: {s.name}:A,B")
        seen.add(s.name)
    if not specs:
        raise UsageError(f"--eval_dataset: no dataset given; choose from {' '.join(known)}")
    return specs
