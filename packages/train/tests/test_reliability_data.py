"""Issue 15 (data side): a bad dataset file or tokenizer directory is one line naming the file and line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from megatune.train.data import DataConfig, DataError, build_datasets, parse_spec
from megatune.train.data.loading import load_spec

ROWS = [json.dumps({"query": f"q{i}", "response": f"r{i}"}) for i in range(10)]


def _error(path: Path, tmp_path: Path) -> str:
    with pytest.raises(DataError) as err:
        load_spec(parse_spec(str(path)), DataConfig(dataset=[str(path)], cache_dir=str(tmp_path / "cache")))
    message = str(err.value)
    assert "\n" not in message and "DatasetGenerationError" not in message and "StopIteration" not in message
    return message


def test_broken_jsonl_line_is_named(tmp_path):
    lines = list(ROWS)
    lines[6] = '{"query": "q6", "response": '
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert _error(path, tmp_path).startswith(f"{path} line 7: not valid JSON (")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text("\n".join([*ROWS[:2], "[1, 2]", *ROWS[2:]]) + "\n")
    assert _error(path, tmp_path).startswith(f"{path} line 3: expected a JSON object")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_latin1_file_names_the_line(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    head = "\n".join(ROWS[:3]) + "\n" if suffix == ".jsonl" else "query,response\na,b\nc,d\n"
    tail = '{"query": "café", "response": "r"}\n' if suffix == ".jsonl" else "café,x\n"
    path.write_bytes(head.encode() + tail.encode("latin-1"))
    assert _error(path, tmp_path).startswith(f"{path} line 4: not UTF-8 (byte 0xe9")


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "empty.csv", "blank.jsonl"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n  \n" if name.startswith("blank") else "")
    assert _error(path, tmp_path) == f"{path}: the file is empty; a dataset file needs at least one row"


def test_trailing_garbage_in_json_array(tmp_path):
    path = tmp_path / "trailing.json"
    path.write_text(json.dumps([{"query": "a", "response": "b"}], indent=1) + "\n garbage\n")
    assert _error(path, tmp_path).startswith(f"{path} line 7 column 2: not valid JSON (Extra data)")


def test_broken_csv_positions(tmp_path):
    quote = tmp_path / "quote.csv"
    quote.write_text('query,response\na,b\n"c,d\ne,f\n')
    assert _error(quote, tmp_path).startswith(f"{quote} line 3: broken CSV record")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("query,response\na,b\nc,d\ne,f,g\n")
    assert _error(ragged, tmp_path).startswith(f"{ragged} line 4: 3 fields, the header has 2")


def test_good_files_still_load(tmp_path):
    path = tmp_path / "good.jsonl"
    path.write_text("\n".join(ROWS) + "\n")
    ds, bad = load_spec(parse_spec(str(path)), DataConfig(dataset=[str(path)], cache_dir=str(tmp_path / "c")))
    assert len(ds) == 10 and bad == 0


def test_model_dir_without_tokenizer_files(tmp_path):
    from megatune.convert.testing import make_tiny_model
    from transformers import AutoTokenizer

    model = make_tiny_model("qwen2", tmp_path / "tiny-qwen2", seed=0)
    bare = tmp_path / "bare"
    shutil.copytree(model, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    tokenizer = AutoTokenizer.from_pretrained(str(bare))  # transformers builds a one-token tokenizer, no error
    cfg = DataConfig(dataset=["self-cognition#20"], model_name=["小黄", "Xiao Huang"], model_author=["魔搭", "ModelScope"],
                     cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=rf"^{bare}: no tokenizer files \(tokenizer.json, "):
        build_datasets(cfg, tokenizer)
    train, _, _ = build_datasets(cfg, AutoTokenizer.from_pretrained(str(model)))
    assert len(train) > 0
