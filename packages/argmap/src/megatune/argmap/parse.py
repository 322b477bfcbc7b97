"""`megatune sft` flags: the swift-style parser for `SftArguments`, with each flag's Megatron counterpart in --help.

This module sits above both `sft` (the dataclass) and `mapping` (the table), so neither imports the other's
parser-side needs: sft -> (cli, errors, megatron); mapping -> (sft, megatron); parse -> (sft, mapping, cli).
"""

from __future__ import annotations

from collections.abc import Sequence

from .cli import SwiftArgParser
from .mapping import TABLE, megatron_counterparts
from .sft import SFT_ALIASES, SftArguments


def sft_parser() -> SwiftArgParser:
    notes = {name: f"Megatron: {meg}" for name, meg in megatron_counterparts().items()}
    # a Megatron-LM name typed by habit (--lr, --micro_batch_size) points at its swift name
    fields = SftArguments.__dataclass_fields__
    hints = {rule.megatron: rule.sft[0] for rule in TABLE if rule.sft and rule.megatron not in fields}
    hints.update({"epochs": "num_train_epochs", "lr_warmup_fraction": "warmup_ratio", "gbs": "global_batch_size"})
    return SwiftArgParser(SftArguments, prog="megatune sft", aliases=SFT_ALIASES, help_notes=notes, hints=hints,
                          description="Fine-tune with Megatron-Core; flags follow `swift sft` (ms-swift 2.5).")


def parse_sft_args(argv: Sequence[str] | None = None) -> SftArguments:
    """`megatune sft` flags (and/or a YAML/JSON file: first argument or --config) -> SftArguments.

    Raises ArgumentError (a ValueError) with a one-line message on any bad flag or value; `-h/--help` prints
    `build_help()` and raises SystemExit(0).
    """
    return sft_parser().parse(argv)


def build_help() -> str:
    """`megatune sft --help`: every argument with its type, default, source and Megatron counterpart."""
    return sft_parser().format_help()
