"""Dataset specs, row formats, file types, bad-row errors, and the real Alpaca/ShareGPT demo files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from megatune.train.data import DataConfig, DataError, build_datasets, parse_spec
from megatune.train.data.formats import RowError, to_messages

SFT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "sft"
needs_sft_data = pytest.mark.skipif(not SFT_DATA.is_dir(), reason=f"shared SFT demo data not found at {SFT_DATA}")


@pytest.fixture(scope="module")
def tok():
    from megatune.convert.testing import build_tokenizer

    return build_tokenizer()


def _cfg(tmp_path, specs, **kw):
    kw.setdefault("dataset_test_ratio", 0.0)
    return DataConfig(dataset=specs, cache_dir=str(tmp_path / "cache"), **kw)


def _loss_text(tok, row) -> str:
    return tok.decode([i for i, lab in zip(row["input_ids"], row["labels"]) if lab != -100])


def _write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# --- spec parsing -------------------------------------------------------------------------------------------


def test_parse_spec_files_hub_and_builtin(tmp_path):
    s = parse_spec("/data/my:file.jsonl#20")
    assert (s.kind, s.name, s.sample) == ("file", "/data/my:file.jsonl", 20)
    assert parse_spec("train.parquet").sample is None
    s = parse_spec("swift-mix:sharegpt/codefuse#500")
    assert (s.kind, s.name, s.subsets, s.sample, s.hub) == ("hub", "swift-mix", ("sharegpt", "codefuse"), 500, None)
    s = parse_spec("HF::org/name:sub")
    assert (s.kind, s.hub, s.name, s.subsets) == ("hub", "hf", "org/name", ("sub",))
    s = parse_spec("self-cognition#100")
    assert (s.kind, s.sample) == ("self-cognition", 100)
    with pytest.raises(DataError, match="hub prefix"):
        parse_spec("XX::name")
    with pytest.raises(DataError, match="positive"):
        parse_spec("a.jsonl#0")
    txt = tmp_path / "data.txt"
    txt.write_text("x")
    with pytest.raises(DataError, match="unsupported suffix"):
        parse_spec(str(txt))


# --- row formats --------------------------------------------------------------------------------------------


def test_to_messages_every_format():
    sys_user_asst = [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}
    ]
    assert to_messages({"messages": sys_user_asst})[0] == sys_user_asst
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "Q"}, {"from": "function_call", "value": "{\"name\": \"f\"}"},
            {"from": "observation", "value": "{\"r\": 1}"}, {"from": "gpt", "value": "A"},
        ],
        "system": "S", "tools": "[{\"name\": \"f\"}]",
    }
    msgs, tools = to_messages(sharegpt)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant"]
    assert tools == "[{\"name\": \"f\"}]"
    alpaca = {"instruction": "Do", "input": "this", "output": "Done", "history": [["q0", "a0"]], "system": None}
    assert to_messages(alpaca)[0] == [
        {"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"},
        {"role": "user", "content": "Do\nthis"}, {"role": "assistant", "content": "Done"},
    ]
    assert to_messages({"instruction": "Do", "input": "", "output": "Done"})[0][0]["content"] == "Do"
    qr = {"query": "Q", "response": "R", "history": [], "system": "S"}
    assert [m["role"] for m in to_messages(qr)[0]] == ["system", "user", "assistant"]


@pytest.mark.parametrize(
    "row, match",
    [
        ({"text": "hello"}, "fits no known format"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "from"),
        ({"query": "only a question", "response": None}, "fits no known format"),
        ({"messages": [{"role": "user", "content": "no answer"}]}, "no assistant turn"),
    ],
)
def test_to_messages_rejects(row, match):
    with pytest.raises(RowError, match=match):
        to_messages(row)


# --- files --------------------------------------------------------------------------------------------------


def test_each_file_type_and_format(tmp_path, tok):
    import pandas as pd

    rows = [{"query": f"question {i}", "response": f"answer {i}"} for i in range(4)]
    jsonl = _write_jsonl(tmp_path / "qr.jsonl", rows)
    (tmp_path / "alpaca.json").write_text(
        json.dumps([{"instruction": f"task {i}", "input": "", "output": f"done {i}"} for i in range(3)])
    )
    pd.DataFrame(rows).to_csv(tmp_path / "qr.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "qr.parquet")
    sharegpt = _write_jsonl(tmp_path / "sg.jsonl", [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"}]}
    ])
    specs = [jsonl, str(tmp_path / "alpaca.json"), str(tmp_path / "qr.csv"), str(tmp_path / "qr.parquet"), sharegpt]
    train, val, stats = build_datasets(_cfg(tmp_path, specs), tok)
    assert stats["rows"] == 4 + 3 + 4 + 4 + 1 and len(val) == 0 and stats["bad_rows"] == 0
    answers = sorted(_loss_text(tok, r) for r in train)
    expected = sorted([f"answer {i}<|im_end|>" for i in range(4)] * 3 + [f"done {i}<|im_end|>" for i in range(3)]
                      + ["hello there<|im_end|>"])
    assert answers == expected


def test_bad_row_names_jsonl_line(tmp_path, tok):
    rows = [{"query": "q", "response": "r"}, {"query": "q2", "response": "r2"}, {"prompt": "no such format"}]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: row fits no known format.*skip_bad_rows"):
        build_datasets(_cfg(tmp_path, [path]), tok)
    train, _, stats = build_datasets(_cfg(tmp_path, [path], skip_bad_rows=True), tok)
    assert stats["bad_rows"] == 1 and stats["rows"] == 2


def test_bad_row_names_json_array_row(tmp_path, tok):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "i", "output": "o"}, {"instruction": "i", "output": ["not", "text"]}]))
    with pytest.raises(DataError, match=r"bad\.json row 2 of the JSON array: output must be a string"):
        build_datasets(_cfg(tmp_path, [str(path)]), tok)


def test_missing_file_is_clear(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(_cfg(tmp_path, [str(tmp_path / "nope.jsonl")]), tok)


# --- the real demo files ------------------------------------------------------------------------------------


@needs_sft_data
@pytest.mark.parametrize("name", ["alpaca_en_demo.json", "alpaca_zh_demo.json"])
def test_real_alpaca_demo(tmp_path, tok, name):
    path = SFT_DATA / name
    source = json.loads(path.read_text(encoding="utf-8"))
    train, val, stats = build_datasets(_cfg(tmp_path, [str(path)], max_length=100_000, dataset_test_ratio=0.01), tok)
    assert stats["rows"] + stats["val_rows"] == len(source) and stats["val_rows"] == 10
    outputs = {r["output"] + "<|im_end|>" for r in source}
    for row in train.select(range(50)):
        assert _loss_text(tok, row) in outputs


@needs_sft_data
def test_real_sharegpt_toolcall_demo(tmp_path, tok):
    path = SFT_DATA / "glaive_toolcall_en_demo.json"
    train, _, stats = build_datasets(_cfg(tmp_path, [f"{path}#40"], max_length=100_000), tok)
    assert stats["rows"] == 40
    # The tiny ChatML template has no `tools` slot, so tool schemas reach the model through the system prompt.
    with_tools = [r for r in train if "You have access to the following tools" in tok.decode(r["input_ids"])]
    assert with_tools and all("<|im_start|>system" in tok.decode(r["input_ids"]) for r in with_tools)
    calls = [r for r in train if '"arguments"' in _loss_text(tok, r)]
    assert calls, "function_call turns must be assistant turns that carry loss"
    for row in calls:
        assert "<|im_start|>tool" not in _loss_text(tok, row)
