"""The benchmarks, one file each. TASKS maps the --eval_dataset name to its module."""

from __future__ import annotations

from megatune.evaluate.tasks import arc, ceval, gsm8k, mmlu

TASKS = {"ceval": ceval, "mmlu": mmlu, "gsm8k": gsm8k, "arc": arc}
