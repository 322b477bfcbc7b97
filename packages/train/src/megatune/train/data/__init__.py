"""SFT data for megatune: dataset specs -> normalised conversations -> chat-template tokens -> Megatron batches.

```python
from megatune.train.data import build_datasets, BatchIterator, DataConfig
train, val, stats = build_datasets(DataConfig(dataset=["alpaca.jsonl#500", "self-cognition#100"],
                                              model_name=["小黄", "Xiao Huang"], model_author=["魔搭", "ModelScope"]),
                                   tokenizer)
for micro_batches in BatchIterator(train, micro_batch_size=1, num_micro_batches=8, dp_rank=r, dp_size=d,
                                   pad_token_id=tokenizer.pad_token_id, epochs=1):
    ...
```
"""

from .batching import BatchIterator, collate, pack_first_fit
from .build import build_datasets, split_val
from .config import DataConfig, DataError, DatasetSpec, parse_spec
from .registry import REGISTRY

__all__ = [
    "BatchIterator",
    "DataConfig",
    "DataError",
    "DatasetSpec",
    "REGISTRY",
    "build_datasets",
    "collate",
    "pack_first_fit",
    "parse_spec",
    "split_val",
]
