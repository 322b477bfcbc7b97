"""megatune.argmap — ms-swift `SftArguments` <-> Megatron-LM arguments, one declarative table (standard library only).

    from megatune.argmap import parse_sft_args, to_megatron
    sft = parse_sft_args(["--dataset", "data.jsonl", "--tp", "2"])
    meg = to_megatron(sft, world_size=4, train_len=10_000, val_len=100)

`megatune.argmap.cli` holds the generic swift-style flag parser for any dataclass (used by infer/eval too).
"""

from .cli import SwiftArgParser, dataclass_from_mapping, load_config_file, parse_bool, parse_dataclass_args
from .errors import ArgumentError
from .mapping import (
    TABLE,
    BatchSizes,
    Derived,
    Rule,
    batch_sizes,
    default_checkpoint,
    derive,
    from_megatron,
    megatron_counterparts,
    to_megatron,
    with_parallel_defaults,
)
from .megatron import MegatronArguments
from .parse import build_help, parse_sft_args, sft_parser
from .sft import SftArguments

__version__ = "0.1.0"

__all__ = [
    "TABLE", "ArgumentError", "BatchSizes", "Derived", "batch_sizes", "default_checkpoint", "MegatronArguments", "Rule", "SftArguments", "SwiftArgParser",
    "build_help", "dataclass_from_mapping", "derive", "from_megatron", "load_config_file", "megatron_counterparts",
    "parse_bool", "parse_dataclass_args", "parse_sft_args", "sft_parser", "to_megatron", "with_parallel_defaults",
]
