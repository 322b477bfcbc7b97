"""ARC-Challenge (grade-school science, 3-5 choices). Scored on `test` (1172 questions); few-shot from `train`.

Two local layouts under arc/, tried in this order:
1. the original AI2 files, ARC-Challenge-{Test,Train}.jsonl (also inside an ARC-Challenge/ folder): one
   {"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"} per line. Labels are A-E or 1-5;
   both become A, B, ... by position.
2. llm-foundry's arc_challenge.jsonl: {"query": "Question: ...", "choices": [4 texts], "gold": 0-based index}.
   Its gold is wrong on 23 rows (see shared/data/README.md). When AI2's ARC-Challenge-Test.question-answers.jsonl
   ({"id", "answerKey"}, same row order) sits beside it, the official key replaces `gold`. Four of the 23 rows
   repeat a choice text (e.g. ["faster", "slower", "faster", "at the same speed"]): the reformatting reordered and
   duplicated their options, so the official key no longer points at the right text and neither does `gold`.
   Those rows keep a `defect` note: they are counted but not scored.
Native prompt (llmuses 0.4): "{question}\nA. ..\nAnswer:". Loglikelihood (lm-evaluation-harness arc_challenge):
"Question: {question}\nAnswer:" scored against " {choice text}", reporting acc and acc_norm (log-prob / characters).
"""

from __future__ import annotations

import sys
from pathlib import Path

from megatune.evaluate.engine import UserError
from megatune.evaluate.tasks.common import (
    LETTERS,
    Example,
    choices_block,
    data_root,
    hub_or_fail,
    load_hub,
    read_jsonl,
)

NAME, SPLIT, FEWSHOT_SPLIT, KIND = "arc", "test", "train", "choice"
SUBJECT = "ARC-Challenge"
REPORT_ACC_NORM = True  # choices are texts of different lengths; for single letters acc_norm == acc
LAYOUT = ("ARC-Challenge-Test.jsonl (AI2: id, question.stem, question.choices[{text,label}], answerKey) "
          "or arc_challenge.jsonl (llm-foundry: query, choices, gold) + ARC-Challenge-Test.question-answers.jsonl")


def key_index(key: str, labels: list[str] | None = None) -> int:
    """Position of an answer key: its place among `labels` when given, else A..E -> 0..4 and 1..5 -> 0..4."""
    key = str(key).strip()
    if labels is not None and key in labels:
        return labels.index(key)
    if key.isdigit():
        return int(key) - 1
    if key in LETTERS:
        return LETTERS.index(key)
    raise ValueError(f"answer key {key!r} is neither a letter nor a number")


def _from_ai2(row: dict, where: str) -> Example:
    try:
        q = row["question"]
        labels = [c["label"] for c in q["choices"]]
        gold = key_index(row["answerKey"], labels)
        return Example(subject=SUBJECT, question=q["stem"].strip(), choices=[c["text"] for c in q["choices"]],
                       gold=LETTERS[gold], id=row.get("id", ""))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: not an AI2 ARC row ({type(e).__name__}: {e})") from None


def _from_foundry(rows: list[dict], keys: list[dict] | None, where: Path) -> list[Example]:
    if keys is not None and len(keys) != len(rows):
        raise UserError(f"{where}: {len(rows)} rows but the answer-key file beside it has {len(keys)}; they must align")
    out = []
    for i, row in enumerate(rows):
        query = row["query"].strip()
        ex = Example(subject=SUBJECT, question=query.removeprefix("Question:").strip(), choices=list(row["choices"]),
                     gold=LETTERS[row["gold"]])
        if keys is not None:
            ex.id, official = keys[i]["id"], key_index(keys[i]["answerKey"])
            if official != row["gold"]:
                if len(set(ex.choices)) < len(ex.choices):
                    ex.defect = (f"choices repeat a text, so neither official key {keys[i]['answerKey']!r} nor "
                                 f"gold {row['gold']} can be trusted")
                else:
                    ex.extra["gold_fixed_from"] = row["gold"]
                    ex.gold = LETTERS[official]
        out.append(ex)
    return out


def load(root: Path | str | None, split: str = SPLIT) -> dict[str, list[Example]]:
    root = data_root(root)
    Split = split.capitalize()
    if root is not None:
        d = root / NAME
        for path in (d / f"ARC-Challenge-{Split}.jsonl", d / "ARC-Challenge" / f"ARC-Challenge-{Split}.jsonl"):
            if path.is_file():
                return {SUBJECT: [_from_ai2(r, f"{path}:{i + 1}") for i, r in enumerate(read_jsonl(path))]}
        foundry = d / "arc_challenge.jsonl"
        if split == "test" and foundry.is_file():
            key_file = d / "ARC-Challenge-Test.question-answers.jsonl"
            keys = list(read_jsonl(key_file)) if key_file.is_file() else None
            if keys is None:
                print(f"warning: {foundry} has 23 known-wrong `gold` rows; put AI2's {key_file.name} beside it to "
                      "correct them", file=sys.stderr)
            return {SUBJECT: _from_foundry(list(read_jsonl(foundry)), keys, foundry)}

    def fetch() -> dict[str, list[Example]]:
        rows = load_hub("allenai/ai2_arc", "ARC-Challenge", split)
        return {SUBJECT: [_from_ai2({"id": r["id"], "answerKey": r["answerKey"],
                                     "question": {"stem": r["question"],
                                                  "choices": [{"text": t, "label": lab} for t, lab in
                                                              zip(r["choices"]["text"], r["choices"]["label"])]}},
                                    f"allenai/ai2_arc/{split}") for r in rows]}

    return hub_or_fail(NAME, root, LAYOUT if split == "test" else f"ARC-Challenge-{Split}.jsonl (AI2 layout)", fetch)


def native_prompt(ex: Example, shots: list[Example] = ()) -> str:
    return "".join(f"{s.question}\n{choices_block(s)}\nAnswer: {s.gold}\n\n" for s in shots) + (
        f"{ex.question}\n{choices_block(ex)}\nAnswer:")


def ll_context(ex: Example, shots: list[Example] = ()) -> str:
    return "".join(f"Question: {s.question}\nAnswer: {s.choices[s.gold_index]}\n\n" for s in shots) + (
        f"Question: {ex.question}\nAnswer:")


def ll_continuations(ex: Example) -> list[str]:
    return [f" {text}" for text in ex.choices]
