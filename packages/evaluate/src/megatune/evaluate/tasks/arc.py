"""ARC (grade-school science, 3-5 choices): `arc:challenge` (the default, 1172 test questions) and `arc:easy`
(2376). Scored on `test`; few-shot examples come from `train`.

Two local layouts under arc/, tried in this order for each subset (NAME = ARC-Challenge or ARC-Easy):
1. the original AI2 files, NAME-{Test,Train}.jsonl (also inside a NAME/ folder): one
   {"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"} per line. Labels are A-E or 1-5;
   both become A, B, ... by position.
2. llm-foundry's arc_challenge.jsonl / arc_easy.jsonl: {"query": "Question: ...", "choices": [4 texts], "gold":
   0-based index}. Its gold is wrong on 23 / 79 rows (see shared/data/README.md). When AI2's
   NAME-Test.question-answers.jsonl ({"id", "answerKey"}, same row order) sits beside it, the official key replaces
   `gold`. Rows that repeat a choice text (e.g. ["faster", "slower", "faster", "at the same speed"]: the
   reformatting reordered and duplicated their options) and one ARC-Easy row whose key names a fifth choice the file
   dropped cannot be scored fairly: they keep a `defect` note, are counted but not scored.
Native prompt (llmuses 0.4): "{question}\\nA. ..\\nAnswer:". Loglikelihood (lm-evaluation-harness arc_challenge /
arc_easy): "Question: {question}\\nAnswer:" scored against " {choice text}", reporting acc and acc_norm.
"""

from __future__ import annotations

import sys
from pathlib import Path

from megatune.evaluate.errors import EvalError
from megatune.evaluate.tasks.base import Data, Example, MultipleChoiceTask
from megatune.evaluate.tasks.common import LETTERS, choices_block, load_hub
from megatune.evaluate.textio import read_jsonl

NAMES = {"challenge": "ARC-Challenge", "easy": "ARC-Easy"}
KNOWN_WRONG = {"challenge": 23, "easy": 79}  # llm-foundry gold rows that disagree with AI2's key
SUBJECT = NAMES["challenge"]


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


def _from_ai2(subject: str, row: dict, where: str) -> Example:
    try:
        q = row["question"]
        labels = [c["label"] for c in q["choices"]]
        gold = key_index(row["answerKey"], labels)
        return Example(subject=subject, question=q["stem"].strip(), choices=[c["text"] for c in q["choices"]],
                       gold=LETTERS[gold], id=row.get("id", ""))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise EvalError(f"{where}: not an AI2 ARC row ({type(e).__name__}: {e})") from None


def _from_foundry(subject: str, rows: list[tuple[int, dict]], keys: list | None, where: Path) -> list[Example]:
    if keys is not None and len(keys) != len(rows):
        raise EvalError(f"{where}: {len(rows)} rows but the answer-key file beside it has {len(keys)}; they must align")
    out = []
    for i, (line, row) in enumerate(rows):
        try:
            ex = Example(subject=subject, question=row["query"].strip().removeprefix("Question:").strip(),
                         choices=list(row["choices"]), gold=LETTERS[row["gold"]], id=f"{subject}/{i}")
        except (KeyError, TypeError, IndexError) as e:
            raise EvalError(f"{where} line {line}: expected query, choices, gold ({type(e).__name__}: {e})") from None
        if keys is not None:
            key = keys[i][1]["answerKey"]
            ex.id, official = keys[i][1]["id"], key_index(key)
            if official != row["gold"]:
                if len(set(ex.choices)) < len(ex.choices):
                    ex.defect = f"choices repeat a text, so neither official key {key!r} nor gold {row['gold']} " \
                                "can be trusted"
                elif official >= len(ex.choices):
                    ex.defect = f"the official key {key!r} names a choice this file dropped"
                else:
                    ex.extra["gold_fixed_from"] = row["gold"]
                    ex.gold = LETTERS[official]
        out.append(ex)
    return out


class Arc(MultipleChoiceTask):
    name, split, fewshot_split = "arc", "test", "train"
    subsets, default_subsets = tuple(NAMES), ("challenge",)
    metrics = ("acc", "acc_norm")  # choices are texts of different lengths (for single letters acc_norm == acc)

    def subject_of(self, subset: str) -> str:
        return NAMES[subset]

    def layout(self, split: str) -> str:
        Split = split.capitalize()
        if split != "test":
            return f"ARC-Challenge-{Split}.jsonl / ARC-Easy-{Split}.jsonl (AI2 layout: id, question.stem, " \
                   "question.choices[{text,label}], answerKey)"
        return ("ARC-Challenge-Test.jsonl (AI2: id, question.stem, question.choices[{text,label}], answerKey) or "
                "arc_challenge.jsonl (llm-foundry: query, choices, gold) + ARC-Challenge-Test.question-answers.jsonl "
                "(likewise ARC-Easy / arc_easy)")

    def _load_one(self, folder: Path, split: str, subset: str) -> list[Example] | None:
        name, Split = NAMES[subset], split.capitalize()
        for path in (folder / f"{name}-{Split}.jsonl", folder / name / f"{name}-{Split}.jsonl"):
            if path.is_file():
                return [_from_ai2(name, row, f"{path} line {n}") for n, row in read_jsonl(path)]
        foundry = folder / f"arc_{subset}.jsonl"
        if split != "test" or not foundry.is_file():
            return None
        key_file = folder / f"{name}-Test.question-answers.jsonl"
        keys = list(read_jsonl(key_file)) if key_file.is_file() else None
        if keys is None:
            print(f"warning: {foundry} has {KNOWN_WRONG[subset]} known-wrong `gold` rows; put AI2's {key_file.name} "
                  "beside it to correct them", file=sys.stderr)
        return _from_foundry(name, list(read_jsonl(foundry)), keys, foundry)

    def load_local(self, folder: Path, split: str, subsets: tuple[str, ...] | None) -> Data | None:
        found = {NAMES[s]: self._load_one(folder, split, s) for s in subsets or self.default_subsets}
        return {name: rows for name, rows in found.items() if rows is not None} or None

    def load_hub(self, split: str, subsets: tuple[str, ...]) -> Data:
        out: Data = {}
        for s in subsets:
            out[NAMES[s]] = [_from_ai2(NAMES[s], {"id": r["id"], "answerKey": r["answerKey"], "question": {
                "stem": r["question"], "choices": [{"text": t, "label": lab} for t, lab in
                                                   zip(r["choices"]["text"], r["choices"]["label"])]}},
                f"allenai/ai2_arc {NAMES[s]}/{split} row {i + 1}")
                for i, r in enumerate(load_hub("allenai/ai2_arc", NAMES[s], split))]
        return out

    def choice_texts(self, ex: Example) -> list[str]:
        return list(ex.choices)

    def native_prompt(self, ex: Example, shots=()) -> str:
        return "".join(f"{s.question}\n{choices_block(s.choices, s.letters)}\nAnswer: {s.gold}\n\n" for s in shots) \
            + f"{ex.question}\n{choices_block(ex.choices, ex.letters)}\nAnswer:"

    def ll_context(self, ex: Example, shots=()) -> str:
        return "".join(f"Question: {s.question}\nAnswer: {s.choices[s.gold_index]}\n\n" for s in shots) + (
            f"Question: {ex.question}\nAnswer:")
