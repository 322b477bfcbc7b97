"""What `megatune eval` prints and writes: the dataset | score table, the per-subject breakdown, eval_result.json
and samples.jsonl (one line per sample: dataset, subject, id, prompt, response, extracted, gold, correct).

Files in --eval_output_dir are replaced only when a run finishes: samples go to a temporary sibling while the run
lasts, then samples.jsonl and eval_result.json are each written to a temporary file, fsynced and renamed into place.
An interrupted or failed run leaves the previous run's files as they were (and removes its temporary file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megatune.evaluate.errors import EvalError


def grid(header: list[str], rows: list[list[str]]) -> str:
    """A plain ASCII grid, the shape ms-swift's eval summary has."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def fmt(row: list[str]) -> str:
        return "| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |"

    return "\n".join([line, fmt(header), line, *map(fmt, rows), line])


def score_table(results: dict[str, dict]) -> str:
    rows = []
    for name, r in results.items():
        score = f"{r['score']:.4f}" + (f" (acc_norm {r['acc_norm']:.4f})" if "acc_norm" in r else "")
        rows.append([name, score])
    return grid(["dataset", "score"], rows)


def breakdown(results: dict[str, dict]) -> str:
    rows = []
    for name, r in results.items():
        for c, v in r.get("categories", {}).items():
            rows.append([name, f"[{c}]", str(v["num"]), f"{v['score']:.4f}"])
        for s, v in r["subjects"].items():
            rows.append([name, s, str(v["num"]), f"{v['score']:.4f}"])
    return grid(["dataset", "subject", "num", "score"], rows)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not every filesystem lets a directory be opened; the renames are still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputDir:
    """eval_result.json + samples.jsonl in one folder, replaced together at the end of a run (`commit`).

    Opening checks that the folder can be written before any model is loaded."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.samples = self.path / "samples.jsonl"
        self.result = self.path / "eval_result.json"
        self._tmp = self.path / f".samples.jsonl.tmp-{os.getpid()}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._file = open(self._tmp, "w", encoding="utf-8")
        except OSError as e:
            raise EvalError(f"--eval_output_dir {self.path}: cannot write there ({e.strerror or e}); "
                            "pass a folder you can write to") from None

    def add_samples(self, dataset: str, records: list[dict]) -> None:
        for r in records:
            self._file.write(json.dumps(r, ensure_ascii=False) + "\n")
        self._file.flush()

    def commit(self, result: dict) -> Path:
        """Write eval_result.json beside the samples, fsync both, then rename both into place (the renames come
        last, so a failed write, a full disk say, leaves the previous pair untouched); returns the result's path."""
        tmp = self.path / f".eval_result.json.tmp-{os.getpid()}"
        try:
            os.fsync(self._file.fileno())
            self._file.close()
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(self._tmp, self.samples)
            os.replace(tmp, self.result)
            _fsync_dir(self.path)
        except OSError as e:
            self.discard()
            tmp.unlink(missing_ok=True)
            raise EvalError(f"{e.filename or self.path}: cannot write the results ({e.strerror or e}); "
                            "the previous files there are unchanged") from None
        return self.result

    def discard(self) -> None:
        """Drop this run's temporary file (an interrupted or failed run); the previous results stay."""
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)
