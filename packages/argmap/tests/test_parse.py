"""Command line and config-file parsing: spellings, booleans, lists, files, overrides, and their errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import pytest
from megatune.argmap import ArgumentError, SwiftArgParser, build_help, parse_dataclass_args, parse_sft_args
from megatune.argmap.cli import parse_bool


def test_underscore_and_dash_spellings() -> None:
    a = parse_sft_args(["--learning_rate", "2e-5", "--max_length", "1024", "--resume_from_checkpoint", "ck"])
    b = parse_sft_args(["--learning-rate", "2e-5", "--max-length=1024", "--resume-from-checkpoint", "ck"])
    assert a == b and (a.learning_rate, a.max_length, a.resume_from_checkpoint) == (2e-5, 1024, "ck")


@pytest.mark.parametrize(("text", "value"), [("true", True), ("True", True), ("false", False), ("FALSE", False),
                                             ("1", True), ("0", False), ("yes", True), ("no", False)])
def test_booleans(text: str, value: bool) -> None:
    assert parse_sft_args(["--packing", text]).packing is value
    assert parse_bool(text) is value


def test_bare_boolean_flag_means_true() -> None:
    args = parse_sft_args(["--packing", "--dataset", "a.jsonl"])
    assert args.packing is True and args.dataset == ["a.jsonl"]


def test_bad_boolean_spelling() -> None:
    with pytest.raises(ArgumentError, match=r"^--packing: expected a boolean, got 'ture'; write true or false$"):
        parse_sft_args(["--packing", "ture"])


def test_lists_and_unicode_names() -> None:
    args = parse_sft_args(["--dataset", "a", "b", "c", "--model_name", "小黄", "Xiao Huang",
                           "--model_author", "魔搭", "ModelScope", "--val_dataset", "v.jsonl"])
    assert args.dataset == ["a", "b", "c"] and args.val_dataset == ["v.jsonl"]
    assert args.model_name == ["小黄", "Xiao Huang"] and args.model_author == ["魔搭", "ModelScope"]


def test_model_name_with_three_values() -> None:
    with pytest.raises(ArgumentError, match=r"^--model_name: takes at most 2 values, got 3"):
        parse_sft_args(["--model_name", "小黄", "Xiao", "Huang"])


@pytest.mark.parametrize(("argv", "suggestion"), [
    (["--learnig_rate", "1e-5"], "--learning_rate"), (["--lr", "1e-5"], "--learning_rate"),
    (["--micro_batch_size", "2"], "--batch_size"), (["--tensor-model-parallel-size", "2"], "--tp"),
    (["--datset", "x"], "--dataset")])
def test_unknown_argument_suggests_closest(argv: list[str], suggestion: str) -> None:
    with pytest.raises(ArgumentError, match=f"unknown argument .*; did you mean {suggestion}\\?$"):
        parse_sft_args(argv)


def test_bad_values() -> None:
    with pytest.raises(ArgumentError, match=r"^--tp: expected an integer, got 'two'"):
        parse_sft_args(["--tp", "two"])
    with pytest.raises(ArgumentError, match=r"^--dtype: 'int8' is not one of AUTO, bf16, fp16, fp32"):
        parse_sft_args(["--dtype", "int8"])
    with pytest.raises(ArgumentError, match=r"^--lr_scheduler_type: Megatron has no lr decay style"):
        parse_sft_args(["--lr_scheduler_type", "polynomial"])
    with pytest.raises(ArgumentError, match=r"^--fp16/--bf16: both are true"):
        parse_sft_args(["--fp16", "true", "--bf16", "true"])
    with pytest.raises(ArgumentError, match=r"^command line: unexpected value 'stray'"):
        parse_sft_args(["--tp", "2", "stray"])


def test_swift_aliases() -> None:
    args = parse_sft_args(["--per_device_train_batch_size", "4", "--train_type", "full", "--model", "/m"])
    assert (args.batch_size, args.sft_type, args.model_id_or_path) == (4, "full", "/m")


def test_yaml_file_positional_and_override(tmp_path) -> None:
    pytest.importorskip("yaml")
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("model_type: qwen2-0_5b\nlearning-rate: 1.0e-4\ndataset: [a.jsonl, b.jsonl]\n"
                   "packing: 'true'\nmodel_name: 小黄\ntp: 2\n", encoding="utf-8")
    args = parse_sft_args([str(cfg), "--tp", "1", "--dataset", "c.jsonl"])
    assert (args.model_type, args.learning_rate, args.packing) == ("qwen2-0_5b", 1e-4, True)
    assert args.tp == 1 and args.dataset == ["c.jsonl"]  # the command line wins
    assert args.model_name == ["小黄", "小黄"]  # a scalar for a list field, then swift's one-name rule


def test_json_file_with_config_flag(tmp_path) -> None:
    cfg = tmp_path / "sft.json"
    cfg.write_text(json.dumps({"max_steps": 9, "use_flash_attn": None, "bf16": False, "fp16": True}))
    args = parse_sft_args(["--max_steps", "10", "--config", str(cfg)])
    assert (args.max_steps, args.use_flash_attn, args.fp16, args.bf16) == (10, None, True, False)


def test_config_file_errors(tmp_path) -> None:
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"learnig_rate": 1e-4}))
    with pytest.raises(ArgumentError, match=r"bad\.json: unknown key --learnig_rate; did you mean --learning_rate"):
        parse_sft_args([str(cfg)])
    cfg.write_text(json.dumps({"packing": "maybe"}))
    with pytest.raises(ArgumentError, match=r"bad\.json: packing: expected a boolean, got 'maybe'"):
        parse_sft_args(["--config", str(cfg)])
    cfg.write_text("{not json")
    with pytest.raises(ArgumentError, match=r"bad\.json:1: not valid JSON"):
        parse_sft_args([str(cfg)])
    with pytest.raises(ArgumentError, match="config file not found"):
        parse_sft_args([str(tmp_path / "missing.yaml")])


def test_help_lists_megatron_counterparts(capsys) -> None:
    text = build_help()
    assert "--learning_rate float  (default: None)" in text and "Megatron: lr" in text  # None: 1e-5 full, 1e-4 lora
    assert "--lora_rank int  (default: 8)" in text and "--lora_target_modules" in text
    assert "Megatron: micro_batch_size, global_batch_size" in text
    with pytest.raises(SystemExit) as info:
        parse_sft_args(["--help"])
    assert info.value.code == 0 and "Megatron: tensor_model_parallel_size" in capsys.readouterr().out


# --- the generic helper, as infer/eval use it ---------------------------------------------------------------


@dataclass
class InferArgs:
    ckpt_dir: str | None = None
    infer_backend: Literal["pt", "vllm"] = "pt"
    eval_dataset: list[str] = field(default_factory=list)
    max_new_tokens: int | None = 2048
    temperature: float = 0.3
    stream: bool = True
    stop_words: list[str] = field(default_factory=list, metadata={"max_len": 3, "help": "stop strings"})


def test_generic_dataclass_parser() -> None:
    args = parse_dataclass_args(InferArgs, ["--ckpt-dir", "out/hf", "--infer_backend", "vllm", "--eval_dataset",
                                            "ceval", "mmlu", "--max_new_tokens", "none", "--stream", "false"])
    assert args == InferArgs(ckpt_dir="out/hf", infer_backend="vllm", eval_dataset=["ceval", "mmlu"],
                             max_new_tokens=None, stream=False)
    assert parse_dataclass_args(InferArgs, []) == InferArgs()


def test_generic_parser_errors_and_help() -> None:
    parser = SwiftArgParser(InferArgs, prog="megatune infer", aliases={"model_dir": "ckpt_dir"})
    assert parser.parse(["--model_dir", "x"]).ckpt_dir == "x"
    with pytest.raises(ArgumentError, match=r"^--infer_backend: 'tgi' is not one of pt, vllm"):
        parser.parse(["--infer_backend", "tgi"])
    with pytest.raises(ArgumentError, match=r"did you mean --temperature\?"):
        parser.parse(["--temprature", "0.1"])
    with pytest.raises(ArgumentError, match=r"^--stop_words: takes at most 3 values"):
        parser.parse(["--stop_words", "a", "b", "c", "d"])
    text = parser.format_help()
    assert "--infer_backend {pt,vllm}" in text and "also: --model_dir" in text and "stop strings" in text
