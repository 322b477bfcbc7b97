"""Normalise every supported row format to `messages` (a list of {role, content}) plus an optional `tools` string.

Formats, tried in this order on the non-empty keys of a row:
- `messages`: OpenAI style, roles system/user/assistant/tool.
- `conversations`: ShareGPT, `from`/`value` (human/gpt/system/function_call/observation) or role/content.
- `instruction` + `output` (+ `input`, `system`, `history`): Alpaca.
- `query` + `response` (+ `history`, `system`): ms-swift's own.
A row that fits none of them yields an error string instead of raising, so `datasets.map` can run in worker
processes and the caller decides between failing (with file and line) and skipping (`skip_bad_rows`).

ShareGPT tool calls: `function_call` becomes an assistant turn (the model must learn to emit the call, so it
carries loss) and `observation` becomes a `tool` turn (the environment's answer, no loss).
"""

from __future__ import annotations

import json

from datasets import Features, List, Value

MESSAGE_FEATURES = Features(
    {
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "tools": Value("string"),
        "error": Value("string"),
    }
)

_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "assistant", "tool_call": "assistant",
    "observation": "tool", "tool": "tool", "function": "tool", "tool_response": "tool",
}
_ROLES = ("system", "user", "assistant", "tool")


class RowError(ValueError):
    pass


def _text(value, what: str) -> str:
    if value is None:
        raise RowError(f"{what} is missing")
    if not isinstance(value, str):
        if isinstance(value, int | float | bool):
            return str(value)
        raise RowError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _history_turns(history) -> list[dict]:
    """`history` is a list of [query, response] pairs (swift / LLaMA-Factory)."""
    out = []
    for i, pair in enumerate(history or []):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise RowError(f"history[{i}] must be a [query, response] pair")
        out.append({"role": "user", "content": _text(pair[0], f"history[{i}][0]")})
        out.append({"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")})
    return out


def _from_messages(msgs) -> list[dict]:
    if not isinstance(msgs, list):
        raise RowError("`messages` must be a list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RowError(f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if role not in _ROLES:
            raise RowError(f"messages[{i}].role={role!r}: expected one of {', '.join(_ROLES)}")
        out.append({"role": role, "content": _text(m.get("content"), f"messages[{i}].content")})
    return out


def _from_sharegpt(conv) -> list[dict]:
    if not isinstance(conv, list):
        raise RowError("`conversations` must be a list")
    out = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise RowError(f"conversations[{i}] must be an object")
        speaker = turn.get("from") if turn.get("from") is not None else turn.get("role")
        value = turn.get("value") if turn.get("value") is not None else turn.get("content")
        role = _SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise RowError(f"conversations[{i}].from={speaker!r}: expected one of {', '.join(sorted(_SHAREGPT_ROLES))}")
        out.append({"role": role, "content": _text(value, f"conversations[{i}].value")})
    return out


def _present(row: dict, key: str) -> bool:
    v = row.get(key)
    return v is not None and not (isinstance(v, list | str) and len(v) == 0)


def to_messages(row: dict) -> tuple[list[dict], str | None]:
    """Return (messages, tools) for one raw row or raise RowError saying what is wrong."""
    system = row.get("system")
    if _present(row, "messages"):
        msgs = _from_messages(row["messages"])
    elif _present(row, "conversations"):
        msgs = _from_sharegpt(row["conversations"])
    elif _present(row, "instruction") and row.get("output") is not None:
        query = _text(row["instruction"], "instruction")
        extra = row.get("input")
        if extra not in (None, ""):
            query = f"{query}\n{_text(extra, 'input')}"
        msgs = _history_turns(row.get("history"))
        msgs += [{"role": "user", "content": query}, {"role": "assistant", "content": _text(row["output"], "output")}]
    elif _present(row, "query") and row.get("response") is not None:
        msgs = _history_turns(row.get("history"))
        msgs += [
            {"role": "user", "content": _text(row["query"], "query")},
            {"role": "assistant", "content": _text(row["response"], "response")},
        ]
    else:
        keys = sorted(k for k, v in row.items() if v is not None)
        raise RowError(
            f"row fits no known format (non-empty keys: {keys}); expected `messages`, `conversations` "
            "(ShareGPT), `instruction`+`output` (Alpaca) or `query`+`response`"
        )
    if system not in (None, "") and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": _text(system, "system")})
    if not any(m["role"] == "assistant" for m in msgs):
        raise RowError("row has no assistant turn, so nothing to learn")
    if msgs[-1]["role"] != "assistant":
        # A trailing user/tool turn has no answer to train on; dropping it keeps the rest of the row useful.
        while msgs and msgs[-1]["role"] != "assistant":
            msgs.pop()
    tools = row.get("tools")
    if tools is not None and not isinstance(tools, str):
        tools = json.dumps(tools, ensure_ascii=False)
    return msgs, (tools or None)


def normalize_batch(batch: dict) -> dict:
    """`datasets.map(batched=True)` body: raw columns in, MESSAGE_FEATURES columns out (errors as strings)."""
    n = len(next(iter(batch.values()))) if batch else 0
    out = {"messages": [], "tools": [], "error": []}
    for i in range(n):
        row = {k: v[i] for k, v in batch.items()}
        try:
            msgs, tools = to_messages(row)
            out["messages"].append(msgs)
            out["tools"].append(tools)
            out["error"].append("")
        except RowError as e:
            out["messages"].append([])
            out["tools"].append(None)
            out["error"].append(str(e))
    return out


def add_system(messages: list[dict], system: str | None) -> list[dict]:
    """The configured default system prompt applies only to rows that bring none of their own (as in swift)."""
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages
