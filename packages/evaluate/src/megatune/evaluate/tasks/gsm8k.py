"""GSM8K (grade-school math word problems). Scored on `test`; few-shot examples come from `train`.

Local layout: gsm8k/{test,train}.jsonl, one {"question", "answer"} per line; the answer ends "#### <number>".
The gold is that number with commas removed. A reply is right when its final number (see extract.py) equals the
gold within 1e-4. Native prompt (llmuses 0.4, 0-shot): "Question: {q}\\nAnswer:". The loglikelihood protocol has no
choices to score here, so it generates like lm-evaluation-harness's gsm8k: k worked examples
"Question: ..\\nAnswer: <solution>" joined by blank lines, raw text (no chat template), stop at "Question:".
A sample's id is its 0-based line in test.jsonl (lm-eval's doc_id).
"""

from __future__ import annotations

import re
from pathlib import Path

from megatune.evaluate.errors import EvalError
from megatune.evaluate.tasks.base import Data, Example, NumberTask
from megatune.evaluate.tasks.common import load_hub
from megatune.evaluate.textio import read_jsonl

_GOLD = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def _example(index: int, row: dict, where: str) -> Example:
    m = _GOLD.search(str(row.get("answer", "")))
    if not m or "question" not in row:
        raise EvalError(f"{where}: expected {{\"question\", \"answer\": \"... #### <number>\"}}")
    return Example(subject="main", question=row["question"].strip(), choices=[], gold=m.group(1).replace(",", ""),
                   solution=row["answer"], id=str(index))


class Gsm8k(NumberTask):
    name, split, fewshot_split = "gsm8k", "test", "train"
    subsets = ("main",)
    stop = ("Question:", "</s>", "<|im_end|>")

    def layout(self, split: str) -> str:
        return f'{split}.jsonl, one {{"question": ..., "answer": "... #### 42"}} per line'

    def load_local(self, folder: Path, split: str, subsets: tuple[str, ...] | None) -> Data | None:
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            return None
        return {"main": [_example(i, row, f"{path} line {n}") for i, (n, row) in enumerate(read_jsonl(path))]}

    def load_hub(self, split: str, subsets: tuple[str, ...]) -> Data:
        return {"main": [_example(i, row, f"openai/gsm8k main/{split} row {i + 1}")
                         for i, row in enumerate(load_hub("openai/gsm8k", "main", split))]}

    def native_prompt(self, ex: Example, shots=()) -> str:
        return "".join(f"Question: {s.question}\nAnswer: {s.solution}\n\n" for s in shots) + \
            f"Question: {ex.question}\nAnswer:"

    ll_context = native_prompt
