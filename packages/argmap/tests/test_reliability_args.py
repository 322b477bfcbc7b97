"""Issue 15 (argument side): non-finite and out-of-range numbers are refused at parse time with one line naming the
flag, and negative numbers are read as values, not as flags."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from megatune.argmap import ArgumentError, SftArguments, SwiftArgParser, parse_sft_args


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "Infinity", "NaN"])
@pytest.mark.parametrize("flag", ["--learning_rate", "--min_lr", "--weight_decay", "--max_grad_norm", "--adam_beta1",
                                  "--adam_epsilon", "--warmup_ratio", "--dataset_test_ratio"])
def test_non_finite_float_flags_are_refused(flag: str, value: str) -> None:
    with pytest.raises(ArgumentError) as err:
        parse_sft_args([flag, value])
    message = str(err.value)
    assert message.startswith(f"{flag}: ") and "finite" in message and "\n" not in message, message


def test_non_finite_values_refused_when_built_in_code() -> None:
    """A config file or a checkpoint's args build SftArguments without the command line: same check."""
    with pytest.raises(ArgumentError, match=r"^--learning_rate: must be a finite number, got nan"):
        SftArguments(learning_rate=float("nan"))
    with pytest.raises(ArgumentError, match=r"^--max_grad_norm: must be a finite number, got inf"):
        SftArguments(max_grad_norm=float("inf"))


def test_negative_learning_rate_is_a_value_with_a_clear_refusal() -> None:
    for text in ("-1e-3", "-0.001", "-1"):
        with pytest.raises(ArgumentError, match=r"^--learning_rate: must be > 0, got -0?\.?0*1") as err:
            parse_sft_args(["--learning_rate", text, "--max_length", "64"])
        assert "expected one argument" not in str(err.value)
    assert SwiftArgParser(SftArguments).parse_dict(["--learning-rate", "-1e-3"]) == {"learning_rate": -1e-3}


@pytest.mark.parametrize(("flag", "value", "words"), [
    ("--weight_decay", "-0.1", "must be >= 0.0"),
    ("--max_grad_norm", "-1", "must be >= 0.0"),
    ("--min_lr", "-1e-6", "must be >= 0.0"),
    ("--adam_epsilon", "0", "must be > 0.0"),
    ("--adam_beta1", "1.0", "must be in [0, 1)"),
    ("--adam_beta2", "-0.5", "must be in [0, 1)"),
])
def test_out_of_range_optimizer_values(flag: str, value: str, words: str) -> None:
    with pytest.raises(ArgumentError) as err:
        parse_sft_args([flag, value])
    assert str(err.value).startswith(f"{flag}: {words}"), str(err.value)


@dataclass
class Shift:
    offset: float = 0.0
    steps: int = 0
    name: str = ""


def test_negative_numbers_reach_any_single_value_flag() -> None:
    parser = SwiftArgParser(Shift)
    assert parser.parse(["--offset", "-1e-3", "--steps", "-2", "--name", "-5"]) == Shift(-1e-3, -2, "-5")
    assert parser.parse(["--offset=-2.5e+1"]).offset == -25.0
    with pytest.raises(ArgumentError, match=r"^--offset: expected a finite number, got 'nan'"):
        parser.parse(["--offset", "nan"])
    with pytest.raises(ArgumentError, match=r"unknown argument --x"):  # a real unknown flag is still one
        parser.parse(["--offset", "-1", "--x"])
