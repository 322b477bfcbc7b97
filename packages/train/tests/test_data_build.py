"""build_datasets end to end: self-cognition, `#N` sampling (also across processes), mixing, val split, hub
registry offline behaviour, num_proc parity."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest
from megatune.train.data import REGISTRY, DataConfig, DataError, build_datasets, parse_spec, split_val
from megatune.train.data.loading import SELF_COGNITION_FILE, load_spec, sample_indices


@pytest.fixture(scope="module")
def tok():
    from megatune.convert.testing import build_tokenizer

    return build_tokenizer()


def _loss_text(tok, row) -> str:
    return tok.decode([i for i, lab in zip(row["input_ids"], row["labels"]) if lab != -100])


def _qr_file(path: Path, n: int) -> str:
    path.write_text("".join(json.dumps({"query": f"q{i}", "response": f"r{i}"}) + "\n" for i in range(n)))
    return str(path)


# --- self-cognition -----------------------------------------------------------------------------------------


def test_self_cognition_file_contents():
    rows = [json.loads(line) for line in SELF_COGNITION_FILE.read_text(encoding="utf-8").splitlines()]
    tags = collections.Counter(r["tag"] for r in rows)
    assert len(rows) >= 100 and tags["zh"] == tags["en"] == len(rows) // 2
    assert all("{{NAME}}" in r["response"] and "{{AUTHOR}}" in r["response"] for r in rows)
    queries = {r["query"] for r in rows}
    for q in ("你是谁？", "Who are you?", "What is your name?", "Who made you?", "Are you ChatGPT?", "你是ChatGPT吗？"):
        assert q in queries


def test_self_cognition_fills_both_languages(tmp_path, tok):
    cfg = DataConfig(dataset=["self-cognition"], dataset_test_ratio=0, model_name=["小黄", "Xiao Huang"],
                     model_author=["魔搭", "ModelScope"], cache_dir=str(tmp_path))
    train, _, stats = build_datasets(cfg, tok)
    answers = [_loss_text(tok, r) for r in train]
    zh = [a for a in answers if "人工智能" in a or "我" in a]
    en = [a for a in answers if a not in zh]
    assert len(zh) == len(en) == stats["rows"] // 2
    assert all("{{" not in a for a in answers)
    assert all("小黄" in a and "魔搭" in a and "Xiao Huang" not in a for a in zh)
    assert all("Xiao Huang" in a and "ModelScope" in a and "小黄" not in a for a in en)
    assert any(a.startswith("I am Xiao Huang, an AI assistant developed by ModelScope.") for a in en)


def test_self_cognition_one_value_serves_both_and_missing_is_error(tmp_path):
    cfg = DataConfig(dataset=["self-cognition#10"], model_name="Tiny", model_author=["Acme"], cache_dir=str(tmp_path))
    ds, _ = load_spec(parse_spec("self-cognition#10"), cfg)
    assert all("Tiny" in m[-1]["content"] and "Acme" in m[-1]["content"] for m in ds["messages"])
    for kw, missing in (({"model_author": ["Acme"]}, "model_name"), ({"model_name": ["Tiny"]}, "model_author")):
        with pytest.raises(DataError, match=f"needs {missing}"):
            load_spec(parse_spec("self-cognition"), DataConfig(dataset=["self-cognition"], **kw))
    with pytest.raises(DataError, match="one or two values"):
        load_spec(parse_spec("self-cognition"), DataConfig(dataset=["x"], model_name=["a", "b", "c"], model_author="x"))


# --- sampling -----------------------------------------------------------------------------------------------


def test_sample_more_than_data_repeats_then_samples():
    idx = sample_indices(5, 12, seed=1, key="a.jsonl#12")
    counts = collections.Counter(idx.tolist())
    assert sorted(counts) == [0, 1, 2, 3, 4] and sorted(counts.values()) == [2, 2, 2, 3, 3]
    assert sample_indices(5, 12, 1, "k").tolist() == sample_indices(5, 12, 1, "k").tolist()
    small = sample_indices(100, 10, seed=1, key="k")
    assert len(set(small.tolist())) == 10 and small.tolist() != sample_indices(100, 10, 2, "k").tolist()


_CHILD = """
import json, sys
from megatune.train.data import DataConfig, parse_spec
from megatune.train.data.loading import load_spec
spec, cache = sys.argv[1], sys.argv[2]
ds, _ = load_spec(parse_spec(spec), DataConfig(dataset=[spec], seed=123, cache_dir=cache))
print(json.dumps([m[1]["content"] for m in ds["messages"]]))
"""


def test_sampling_identical_across_processes(tmp_path):
    spec = _qr_file(tmp_path / "data.jsonl", 40) + "#57"
    outs = []
    for k in range(2):  # separate interpreters: any hash()/global-RNG dependence would show up here
        proc = subprocess.run([sys.executable, "-c", _CHILD, spec, str(tmp_path / f"cache{k}")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1] and len(outs[0]) == 57
    assert collections.Counter(outs[0])["r0"] in (1, 2)


# --- mixing, val split, num_proc ----------------------------------------------------------------------------


def test_mixing_and_val_split(tmp_path, tok):
    a = _qr_file(tmp_path / "a.jsonl", 30)
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"instruction": f"i{k}", "output": f"o{k}"}) + "\n" for k in range(20)))
    cfg = DataConfig(dataset=[a + "#10", str(b)], dataset_test_ratio=0.1, cache_dir=str(tmp_path / "c"))
    train, val, stats = build_datasets(cfg, tok)
    assert (stats["rows"], stats["val_rows"]) == (27, 3)
    texts = {_loss_text(tok, r) for r in train} | {_loss_text(tok, r) for r in val}
    assert sum(t.startswith("r") for t in texts) == 10 and sum(t.startswith("o") for t in texts) == 20
    again = build_datasets(cfg, tok)[1]
    assert [r["input_ids"] for r in again] == [r["input_ids"] for r in val], "val split is seeded"
    cfg_val = DataConfig(dataset=[a], val_dataset=[str(b) + "#4"], cache_dir=str(tmp_path / "c"))
    train, val, stats = build_datasets(cfg_val, tok)
    assert (stats["rows"], stats["val_rows"]) == (30, 4)


def test_split_val_sizes():
    assert [len(split_val(n, 0.01, 0)[1]) for n in (1, 2, 99, 100, 101, 1000)] == [0, 1, 1, 1, 2, 10]
    assert len(split_val(10, 0.0, 0)[1]) == 0
    tr, va = split_val(50, 0.2, 0)
    assert sorted(tr.tolist() + va.tolist()) == list(range(50))


def test_num_proc_two_matches_one(tmp_path, tok):
    path = _qr_file(tmp_path / "d.jsonl", 600)
    out = []
    for num_proc in (1, 2):
        cfg = DataConfig(dataset=[path], num_proc=num_proc, cache_dir=str(tmp_path / f"c{num_proc}"))
        out.append(build_datasets(cfg, tok))
    assert out[0][0]["input_ids"] == out[1][0]["input_ids"] and out[0][0]["labels"] == out[1][0]["labels"]
    assert out[0][2]["tokens"] == out[1][2]["tokens"]


# --- hub registry -------------------------------------------------------------------------------------------


def test_registry_names():
    for name in ("swift-mix", "alpaca-zh", "alpaca-en"):
        assert name in REGISTRY
    assert REGISTRY["alpaca-en"].hf_id and REGISTRY["swift-mix"].ms_id == "swift/swift-sft-mixture"


@pytest.mark.parametrize("spec", ["alpaca-en#100", "HF::org/some-dataset"])
def test_hub_offline_fails_fast_naming_spec(tmp_path, tok, monkeypatch, spec):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        build_datasets(DataConfig(dataset=[spec], cache_dir=str(tmp_path)), tok)
    msg = str(err.value)
    assert repr(spec) in msg and "HF_HUB_OFFLINE" in msg and ".jsonl" in msg


def test_modelscope_only_and_unknown_names(tmp_path, tok):
    with pytest.raises(DataError, match=r"swift-mix:sharegpt.*ModelScope only.*swift/swift-sft-mixture.*\.jsonl"):
        build_datasets(DataConfig(dataset=["swift-mix:sharegpt#1000"]), tok)
    with pytest.raises(DataError, match="not a known dataset name"):
        build_datasets(DataConfig(dataset=["no-such-dataset"]), tok)
