"""What `megatune eval` prints and writes: the dataset | score table, the per-subject breakdown, eval_result.json
and samples.jsonl (one line per sample: dataset, subject, prompt, response, extracted, gold, correct)."""

from __future__ import annotations

import json
from pathlib import Path


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


class OutputDir:
    """eval_result.json + samples.jsonl in one folder. Samples are appended per dataset as each one finishes,
    so a long run that dies half-way still leaves the finished datasets' samples."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.samples = self.path / "samples.jsonl"
        self.samples.write_text("", encoding="utf-8")

    def add_samples(self, dataset: str, records: list[dict]) -> None:
        with open(self.samples, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    def write_result(self, result: dict) -> Path:
        out = self.path / "eval_result.json"
        out.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return out
