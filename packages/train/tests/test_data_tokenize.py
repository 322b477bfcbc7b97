"""Loss masks checked token by token against the rendered chat template; truncation; template variants."""

from __future__ import annotations

import copy
import re

import datasets
import pytest
from megatune.train.data import DataConfig, DataError
from megatune.train.data.build import tokenize_dataset
from megatune.train.data.formats import MESSAGE_FEATURES
from megatune.train.data.tokenize import ChatTokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "另一个？"},
    {"role": "assistant", "content": "红色，\n还有绿色。"},
]


@pytest.fixture(scope="module")
def tok():
    from megatune.convert.testing import build_tokenizer

    return build_tokenizer()


def _rows(conversations):
    return datasets.Dataset.from_dict(
        {"messages": conversations, "tools": [None] * len(conversations), "error": [""] * len(conversations)},
        features=MESSAGE_FEATURES,
    ).remove_columns("error")


def _encode(tok, conversations, **cfg):
    cfg.setdefault("max_length", 4096)
    ds, counts = tokenize_dataset(_rows(conversations), tok, DataConfig(dataset=["x"], **cfg))
    return ds, counts


def _assistant_regions(text: str) -> list[tuple[int, int]]:
    """Independent of the implementation: assistant content plus its <|im_end|>, found in the rendered text."""
    return [(m.start(1), m.end(1)) for m in re.finditer(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text, re.S)]


def _check_token_by_token(tok, messages, row):
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert row["input_ids"] == enc["input_ids"], "tokens must be exactly the rendered template"
    regions = _assistant_regions(text)
    assert regions
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        inside = any(a <= start and end <= b for a, b in regions)
        piece = text[start:end]
        if inside:
            assert row["labels"][t] == row["input_ids"][t], f"assistant token {piece!r} must carry loss"
        else:
            assert row["labels"][t] == -100, f"non-assistant token {piece!r} must not carry loss"


def test_labels_token_by_token_multi_turn(tok):
    ds, _ = _encode(tok, [CONVERSATION])
    row = ds[0]
    _check_token_by_token(tok, CONVERSATION, row)
    ids = row["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    labelled_ends = [t for t, i in enumerate(ids) if i == im_end and row["labels"][t] != -100]
    assert len(labelled_ends) == 2, "each assistant turn's <|im_end|> carries loss, no other <|im_end|> does"
    assert len(row["labels"]) == len(ids) == row["length"]


def test_default_system_applies_only_without_own(tok):
    with_own = CONVERSATION
    without = CONVERSATION[1:]
    ds, _ = _encode(tok, [with_own, without], system="Default system.")
    assert "Default system." not in tok.decode(ds[0]["input_ids"])
    assert tok.decode(ds[1]["input_ids"]).startswith("<|im_start|>system\nDefault system.<|im_end|>")
    _check_token_by_token(tok, [{"role": "system", "content": "Default system."}, *without], ds[1])


def test_generation_marker_template_gives_same_labels(tok):
    marked = copy.deepcopy(tok)
    marked.chat_template = (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{{ '\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    assert ChatTokenizer(marked, max_length=10).generation_markers
    plain, _ = _encode(tok, [CONVERSATION])
    gen, _ = _encode(marked, [CONVERSATION])
    assert gen[0]["input_ids"] == plain[0]["input_ids"]
    assert gen[0]["labels"] == plain[0]["labels"]


def test_template_that_rewrites_history_is_a_bad_row(tok):
    rewriting = copy.deepcopy(tok)
    # Shows only the last assistant turn's content, like templates that strip earlier reasoning.
    rewriting.chat_template = (
        "{% for message in messages %}{% if message['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\n(hidden)<|im_end|>\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(DataError, match="inconsistently"):
        _encode(rewriting, [CONVERSATION])
    ds, counts = _encode(rewriting, [CONVERSATION, CONVERSATION[:3]], skip_bad_rows=True)
    assert len(ds) == 1 and counts[3] == 1


def test_truncation_strategies(tok):
    long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    full, _ = _encode(tok, [long])
    n = full[0]["length"]
    ds, counts = _encode(tok, [long, short], max_length=64)
    assert len(ds) == 1 and counts[1] == 1  # delete (the default) drops the long row and counts it
    left, _ = _encode(tok, [long], max_length=64, truncation_strategy="left")
    assert left[0]["input_ids"] == full[0]["input_ids"][n - 64 :] and left[0]["labels"] == full[0]["labels"][n - 64 :]
    right, _ = _encode(tok, [long], max_length=64, truncation_strategy="right")
    assert right[0]["input_ids"] == full[0]["input_ids"][:64] and right[0]["length"] == 64
    # Right-truncating a long prompt leaves no assistant token: such a row is dropped, not trained on.
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    ds, counts = _encode(tok, [long_prompt], max_length=64, truncation_strategy="right")
    assert len(ds) == 0 and counts[2] == 1


def test_loaded_tiny_model_tokenizer(tmp_path, tok):
    """The tokenizer as the runtime loads it (AutoTokenizer from a tiny model dir) masks the same way."""
    from megatune.convert.testing import make_tiny_model
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(make_tiny_model("qwen2", tmp_path / "tiny"))
    ds, _ = _encode(loaded, [CONVERSATION])
    _check_token_by_token(loaded, CONVERSATION, ds[0])
