"""`megatune infer`: the chat REPL, one-shot `--query`, and `--val_dataset` batch inference to a jsonl.

The REPL follows swift's: a `<<< ` prompt, history kept across turns, `clear` forgets it, `exit` (or end of input)
leaves; with the pt engine the reply is printed while it is decoded. When stdin is not a terminal (a pipe, a test)
each query is echoed after the prompt so the transcript reads like the session a person would have seen.

Dataset rows (local .jsonl/.json/.csv, `path#N` keeps the first N) in any of the formats swift reads:
messages [{role, content}], ShareGPT conversations [{from, value}], query/response (+history, system), and
alpaca instruction/input/output. The last assistant turn, when present, is the label, not part of the prompt.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path
from typing import TextIO

from megatune.evaluate.engine import Engine, Message, Sampling, UserError

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                   "function_call": "assistant", "observation": "tool", "tool": "tool"}


def parse_spec(spec: str) -> tuple[Path, int | None]:
    m = re.fullmatch(r"(.+?)(?:#(\d+))?", spec)
    path, n = Path(m.group(1)).expanduser(), m.group(2)
    if not path.is_file():
        raise UserError(f"--val_dataset {spec}: no such file (a local .jsonl, .json or .csv, optionally with #N)")
    return path, int(n) if n else None


def read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data.get("data", data) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise UserError(f"{path}: expected a JSON array of rows (or {{\"data\": [...]}})")
        return rows
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    raise UserError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .csv")


def row_to_chat(row: dict, system: str | None = None, where: str = "") -> tuple[list[Message], str | None]:
    """(prompt messages ending with a user turn, label or None)."""
    if "messages" in row or "conversations" in row:
        if "messages" in row:
            msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        else:
            msgs = [{"role": _SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m["value"]}
                    for m in row["conversations"]]
        label = msgs.pop()["content"] if msgs and msgs[-1]["role"] == "assistant" else None
    elif "query" in row:
        msgs = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        for q, r in row.get("history") or []:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
        msgs.append({"role": "user", "content": row["query"]})
        label = row.get("response")
    elif "instruction" in row:
        text = "\n".join(x for x in (row["instruction"], row.get("input") or "") if x)
        msgs, label = [{"role": "user", "content": text}], row.get("output")
    else:
        raise UserError(f"{where}: a row needs messages, conversations, query or instruction; got keys {sorted(row)}")
    if not msgs or msgs[-1]["role"] not in ("user", "tool"):
        raise UserError(f"{where}: the prompt must end with a user turn")
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return msgs, label


def batch_infer(engine: Engine, specs: list[str], sampling: Sampling, system: str | None, out_path: Path,
                progress: bool = True) -> int:
    from tqdm import tqdm

    prompts, labels = [], []
    for spec in specs:
        path, n = parse_spec(spec)
        for i, row in enumerate(read_rows(path)[:n]):
            msgs, label = row_to_chat(row, system, f"{path} row {i + 1}")
            prompts.append(msgs)
            labels.append(label)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(prompts), desc="infer", unit="samples", disable=not progress, file=sys.stderr) as bar:
        responses = engine.generate(prompts, sampling, progress=bar)
    with open(out_path, "w", encoding="utf-8") as f:
        for msgs, label, response in zip(prompts, labels, responses):
            row = {"query": msgs[-1]["content"], "messages": msgs, "response": response, "label": label}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(prompts)} answers -> {out_path}")
    return len(prompts)


def _reply(engine: Engine, messages: list[Message], sampling: Sampling, out: TextIO, stream: bool) -> str:
    if not stream:
        text = engine.generate([messages], sampling)[0]
        out.write(text)
        return text
    parts = []
    for piece in engine.stream(messages, sampling):
        out.write(piece)
        out.flush()
        parts.append(piece)
    return "".join(parts)


def one_shot(engine: Engine, query: str, sampling: Sampling, system: str | None, stream: bool = True,
             out: TextIO | None = None) -> str:
    out = out or sys.stdout
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": query}]
    text = _reply(engine, msgs, sampling, out, stream)
    out.write("\n")
    return text


def repl(engine: Engine, sampling: Sampling, system: str | None, stream: bool = True,
         stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """Chat until `exit` or end of input; returns the number of replies."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    interactive = stdin.isatty() and out.isatty()
    head = [{"role": "system", "content": system}] if system else []
    history: list[Message] = []
    replies = 0
    while True:
        if interactive:
            try:
                query = input("<<< ")  # line editing when a person types
            except EOFError:
                out.write("\n")
                break
        else:
            out.write("<<< ")
            line = stdin.readline()
            if not line:
                out.write("\n")
                break
            query = line.rstrip("\r\n")
            out.write(query + "\n")
        command = query.strip()
        if command == "exit":
            break
        if command == "clear":
            history = []
            continue
        if not command:
            continue
        turn = {"role": "user", "content": query}
        text = _reply(engine, head + history + [turn], sampling, out, stream)
        out.write("\n")
        out.flush()
        history += [turn, {"role": "assistant", "content": text}]
        replies += 1
    return replies
