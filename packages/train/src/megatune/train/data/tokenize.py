"""Chat-template tokenisation with loss masks on assistant tokens only.

The template is the tokenizer's own (`apply_chat_template`); there is no template engine here. Assistant spans:
- templates with `{% generation %}` markers: `return_assistant_tokens_mask`, which is exact by construction;
- otherwise: render the conversation up to each assistant turn with and without the turn, check that both
  renderings are prefixes of the full text (a template that rewrites history, e.g. dropping earlier reasoning,
  fails loudly instead of masking the wrong tokens), and label the tokens starting inside
  [len(prompt), len(prompt + turn)). Trailing whitespace after the end-of-turn token (ChatML's "\n") is left
  out, so the span is the content plus `<|im_end|>`, matching what the model emits before stopping.
One fast-tokenizer call per batch with offsets maps characters to tokens, so rows cost one tokenisation.

Labels are unshifted (label[t] = input_ids[t] or -100); the batch iterator shifts them per document.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from datasets import Features, List, Value

from .config import DataError
from .formats import add_system

IGNORE = -100
OK, TOO_LONG, NO_LOSS, BAD = 0, 1, 2, 3

TOKEN_FEATURES = Features(
    {
        "input_ids": List(Value("int32")),
        "labels": List(Value("int32")),
        "length": Value("int32"),
        "status": Value("int8"),
        "error": Value("string"),
    }
)


# files that hold a vocabulary: from a directory with only tokenizer_config.json or a chat template, transformers
# builds a tokenizer of one token, and every row then "has no assistant tokens"
VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "*.model", "*.tiktoken")


def check_vocabulary(tokenizer) -> None:
    """DataError when the tokenizer was loaded from a local directory that holds no vocabulary file."""
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    where = Path(name)
    if name and where.is_dir() and not any(next(where.glob(p), None) for p in VOCAB_FILES):
        raise DataError(f"{where}: no tokenizer files ({', '.join(VOCAB_FILES)}); copy the tokenizer files of the "
                        "original Hugging Face model into this directory")


class ChatTokenizer:
    """`datasets.map(batched=True)` body turning `messages`/`tools` rows into input_ids/labels."""

    def __init__(self, tokenizer, *, max_length: int, truncation_strategy: str = "delete", system: str | None = None):
        template = tokenizer.chat_template
        if not template:
            raise DataError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template; SFT needs one to render "
                "conversations (use an instruct/chat checkpoint or set tokenizer.chat_template)"
            )
        if not isinstance(template, str):  # a dict of named templates: the default one renders conversations
            template = template.get("default") or next(iter(template.values()))
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.truncation_strategy = truncation_strategy
        self.system = system
        self.generation_markers = "generation %}" in template
        self.template_takes_tools = "tools" in template

    def fingerprint(self, parent: str) -> str:
        """Stable cache key: the tokenizer object itself hashes differently once it has been called."""
        tok = self.tokenizer
        key = json.dumps(
            [parent, "megatune-tokenize-v1", getattr(tok, "name_or_path", ""), len(tok), self.template,
             self.max_length, self.truncation_strategy, self.system, tok.__class__.__name__],
            ensure_ascii=False,
        )
        return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]

    def _render(self, messages, tools, **kw) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **kw)

    def _prepare(self, messages, tools_json):
        messages = add_system([dict(m) for m in messages], self.system)
        tools = json.loads(tools_json) if tools_json else None
        if tools is not None and not isinstance(tools, list):
            tools = [tools]
        if tools and not self.template_takes_tools:
            # The template cannot show tool schemas, so they go into the system prompt where the model can read them.
            text = "You have access to the following tools:\n" + json.dumps(tools, ensure_ascii=False)
            if messages and messages[0]["role"] == "system":
                messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + text}
            else:
                messages = [{"role": "system", "content": text}, *messages]
            tools = None
        return messages, tools

    def _spans(self, messages, tools, text: str) -> list[tuple[int, int]]:
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or i == 0:
                continue  # an opening assistant turn has no prompt to answer: context only
            prompt = self._render(messages[:i], tools, add_generation_prompt=True)
            turn = self._render(messages[: i + 1], tools)
            if not (text.startswith(prompt) and text.startswith(turn) and len(turn) > len(prompt)):
                raise ValueError(
                    f"the chat template renders turn {i} inconsistently with the full conversation (it rewrites "
                    "earlier turns), so assistant tokens cannot be located"
                )
            end = len(turn)
            while end > len(prompt) and turn[end - 1].isspace():
                end -= 1
            spans.append((len(prompt), end))
        return spans

    def _labels_from_offsets(self, ids, offsets, spans) -> list[int]:
        # A token belongs to the span its first character falls in (a token straddling the start is prompt).
        starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
        inside = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            inside |= (starts >= a) & (starts < b)
        return np.where(inside, np.asarray(ids, dtype=np.int64), IGNORE).tolist()

    def _encode_with_markers(self, messages, tools):
        out = self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(out["input_ids"])
        return ids, [i if m else IGNORE for i, m in zip(ids, out["assistant_masks"])]

    def _finish(self, ids, labels, out):
        status = OK
        if len(ids) > self.max_length:
            if self.truncation_strategy == "delete":
                status = TOO_LONG
            elif self.truncation_strategy == "left":
                ids, labels = ids[-self.max_length :], labels[-self.max_length :]
            else:
                ids, labels = ids[: self.max_length], labels[: self.max_length]
        # labels[0] can never be a target once shifted, so a row needs a labelled token after the first.
        if status == OK and all(x == IGNORE for x in labels[1:]):
            status = NO_LOSS
        if status != OK:
            ids, labels = [], []
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["status"].append(status)
        out["error"].append("")

    def __call__(self, batch: dict) -> dict:
        out = {k: [] for k in TOKEN_FEATURES}
        texts, spans, rows = [], [], []
        for messages, tools_json in zip(batch["messages"], batch["tools"]):
            try:
                msgs, tools = self._prepare(messages, tools_json)
                if self.generation_markers:
                    rows.append(("ids", *self._encode_with_markers(msgs, tools)))
                    continue
                text = self._render(msgs, tools)
                spans.append(self._spans(msgs, tools, text))
                texts.append(text)
                rows.append(("text", len(texts) - 1))
            except Exception as e:  # template errors become a bad row, reported with its place by the caller
                rows.append(("bad", f"{e.__class__.__name__}: {e}"))
        enc = (
            self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            if texts
            else {"input_ids": [], "offset_mapping": []}
        )
        for row in rows:
            if row[0] == "bad":
                for k, v in (("input_ids", []), ("labels", []), ("length", 0), ("status", BAD), ("error", row[1])):
                    out[k].append(v)
            elif row[0] == "ids":
                self._finish(row[1], row[2], out)
            else:
                k = row[1]
                ids = enc["input_ids"][k]
                self._finish(ids, self._labels_from_offsets(ids, enc["offset_mapping"][k], spans[k]), out)
        return out
