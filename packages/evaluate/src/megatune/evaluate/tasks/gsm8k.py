"""GSM8K (grade-school math word problems). Scored on `test`; few-shot examples come from `train`.

Local layout: gsm8k/{test,train}.jsonl, one {"question", "answer"} per line; the answer ends "#### <number>".
The gold is that number with commas removed. A reply is right when its final number (see extract.py) equals the
gold within 1e-4. Native prompt (llmuses 0.4, 0-shot): "Question: {q}\nAnswer:". The loglikelihood protocol has no
choices to score here, so it generates like lm-evaluation-harness's gsm8k: k worked examples
"Question: ..\nAnswer: <solution>" joined by blank lines, raw text (no chat template), stop at "Question:".
"""

from __future__ import annotations

import re
from pathlib import Path

from megatune.evaluate.engine import UserError
from megatune.evaluate.tasks.common import Example, data_root, hub_or_fail, load_hub, read_jsonl

NAME, SPLIT, FEWSHOT_SPLIT, KIND = "gsm8k", "test", "train", "number"
LAYOUT = 'test.jsonl (and train.jsonl for few-shot), one {"question": ..., "answer": "... #### 42"} per line'
STOP = ("Question:", "</s>", "<|im_end|>")

_GOLD = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def _example(row: dict, where: str) -> Example:
    m = _GOLD.search(row.get("answer", ""))
    if not m:
        raise UserError(f"{where}: the answer has no '#### <number>' line")
    return Example(subject="main", question=row["question"].strip(), choices=[], gold=m.group(1).replace(",", ""),
                   solution=row["answer"])


def load(root: Path | str | None, split: str = SPLIT) -> dict[str, list[Example]]:
    root = data_root(root)
    if root is not None and (root / NAME / f"{split}.jsonl").is_file():
        path = root / NAME / f"{split}.jsonl"
        return {"main": [_example(row, f"{path}:{i + 1}") for i, row in enumerate(read_jsonl(path))]}

    def fetch() -> dict[str, list[Example]]:
        return {"main": [_example(row, f"openai/gsm8k main/{split}") for row in load_hub("openai/gsm8k", "main", split)]}

    return hub_or_fail(NAME, root, LAYOUT, fetch)


def native_prompt(ex: Example, shots: list[Example] = ()) -> str:
    return "".join(f"Question: {s.question}\nAnswer: {s.solution}\n\n" for s in shots) + f"Question: {ex.question}\nAnswer:"


ll_context = native_prompt
