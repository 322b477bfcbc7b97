"""The benchmarks, one file each, every one a `Task` (base.py). TASKS maps the --eval_dataset name to it."""

from __future__ import annotations

from megatune.evaluate.tasks.arc import Arc
from megatune.evaluate.tasks.base import Example, MultipleChoiceTask, NumberTask, Task
from megatune.evaluate.tasks.ceval import Ceval
from megatune.evaluate.tasks.gsm8k import Gsm8k
from megatune.evaluate.tasks.mmlu import Mmlu

TASKS: dict[str, Task] = {t.name: t for t in (Ceval(), Mmlu(), Gsm8k(), Arc())}

__all__ = ["TASKS", "Example", "MultipleChoiceTask", "NumberTask", "Task"]
