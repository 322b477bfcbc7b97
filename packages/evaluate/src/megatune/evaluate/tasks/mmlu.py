"""MMLU (57 subjects, 4 choices). Scored on `test`; few-shot examples come from `dev` (5 per subject).

Local layout: mmlu/{test,dev}/<subject>_{test,dev}.csv WITHOUT a header (question,A,B,C,D,answer).
Native prompt (llmuses 0.4) and loglikelihood context (lm-evaluation-harness mmlu) are the same text:
"The following are multiple choice questions (with answers) about {subject}.\n\n" + k shots +
"{question}\nA. ..\nD. ..\nAnswer:"; loglikelihood scores " A" .. " D".
"""

from __future__ import annotations

from pathlib import Path

from megatune.evaluate.engine import UserError
from megatune.evaluate.tasks.common import (
    Example,
    choices_block,
    data_root,
    hub_or_fail,
    load_csv_subjects,
    load_hub,
)

NAME, SPLIT, FEWSHOT_SPLIT, KIND = "mmlu", "test", "dev", "choice"
LAYOUT = "test/<subject>_test.csv and dev/<subject>_dev.csv without header: question,A,B,C,D,answer"


def _example(subject: str, row: list[str], where: str) -> Example:
    if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
        raise UserError(f"{where}: expected 6 columns question,A,B,C,D,answer(A-D), got {row[:6]!r}")
    return Example(subject=subject, question=row[0].strip(), choices=row[1:5], gold=row[5].strip())


def load(root: Path | str | None, split: str = SPLIT) -> dict[str, list[Example]]:
    root = data_root(root)
    if root is not None:
        local = load_csv_subjects(root / NAME, split, False, _example)
        if local:
            return local

    def fetch() -> dict[str, list[Example]]:
        out: dict[str, list[Example]] = {}
        for row in load_hub("cais/mmlu", "all", split):
            out.setdefault(row["subject"], []).append(
                Example(subject=row["subject"], question=row["question"].strip(), choices=list(row["choices"]),
                        gold="ABCD"[row["answer"]]))
        return dict(sorted(out.items()))

    return hub_or_fail(NAME, root, LAYOUT, fetch)


def _block(ex: Example) -> str:
    return f"{ex.question}\n{choices_block(ex)}\nAnswer:"


def _head(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def native_prompt(ex: Example, shots: list[Example] = ()) -> str:
    return _head(ex.subject) + "".join(f"{_block(s)} {s.gold}\n\n" for s in shots) + _block(ex)


ll_context = native_prompt


def ll_continuations(ex: Example) -> list[str]:
    return [f" {letter}" for letter in ex.letters]
