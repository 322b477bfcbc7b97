"""`megatune infer`: the chat REPL, one-shot `--query`, and `--val_dataset` batch inference to a jsonl.

The REPL follows swift's: a `<<< ` prompt, history kept across turns, `clear` forgets it, `exit` (or end of input)
leaves; with the pt engine the reply is printed while it is decoded. When stdin is not a terminal (a pipe, a test)
each query is echoed after the prompt so the transcript reads like the session a person would have seen. A line
that is not UTF-8 is skipped with "<stdin> line N: not UTF-8" on stderr; the session goes on.

Dataset rows (local .jsonl/.json/.csv, `path#N` keeps the first N) in any of the formats swift reads:
messages [{role, content}], ShareGPT conversations [{from, value}], query/response (+history, system), and
alpaca instruction/input/output. The last assistant turn, when present, is the label, not part of the prompt.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import TextIO

from megatune.evaluate.engine import Engine, Message, Sampling
from megatune.evaluate.errors import EvalError, UsageError
from megatune.evaluate.textio import read_csv, read_json, read_jsonl

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                   "function_call": "assistant", "observation": "tool", "tool": "tool"}


def parse_spec(spec: str) -> tuple[Path, int | None]:
    m = re.fullmatch(r"(.+?)(?:#(\d+))?", spec)
    path, n = Path(m.group(1)).expanduser(), m.group(2)
    if not path.is_file():
        raise UsageError(f"--val_dataset {spec}: no such file (a local .jsonl, .json or .csv, optionally with #N)")
    return path, int(n) if n else None


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """[(where, row)]: every row of a .jsonl/.json/.csv file, `where` naming its file and line (or row)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [(f"{path} line {n}", row) for n, row in read_jsonl(path)]
    if suffix == ".json":
        data = read_json(path)
        rows = data.get("data", data) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise EvalError(f"{path}: expected a JSON array of rows (or {{\"data\": [...]}})")
        return [(f"{path} row {i + 1}", row) for i, row in enumerate(rows)]
    if suffix == ".csv":
        return [(f"{path} record {i + 1}", row) for i, row in enumerate(read_csv(path, header=True))]
    raise UsageError(f"--val_dataset {path}: unsupported file type {suffix!r}; use .jsonl, .json or .csv")


def row_to_chat(row: dict, system: str | None = None, where: str = "") -> tuple[list[Message], str | None]:
    """(prompt messages ending with a user turn, label or None)."""
    if not isinstance(row, dict):
        raise EvalError(f"{where}: expected an object with messages, conversations, query or instruction")
    try:
        return _row_to_chat(row, system, where)
    except (KeyError, TypeError, ValueError) as e:
        raise EvalError(f"{where}: malformed row ({type(e).__name__}: {e})") from None


def _row_to_chat(row: dict, system: str | None, where: str) -> tuple[list[Message], str | None]:
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
        raise EvalError(f"{where}: a row needs messages, conversations, query or instruction; got keys {sorted(row)}")
    if not msgs or msgs[-1]["role"] not in ("user", "tool"):
        raise EvalError(f"{where}: the prompt must end with a user turn")
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return msgs, label


def batch_infer(engine: Engine, specs: list[str], sampling: Sampling, system: str | None, out_path: Path,
                progress: bool = True) -> int:
    from tqdm import tqdm

    prompts, labels = [], []
    for spec in specs:
        path, n = parse_spec(spec)
        for where, row in read_rows(path)[:n]:
            msgs, label = row_to_chat(row, system, where)
            prompts.append(msgs)
            labels.append(label)
    tmp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}"
    try:  # before any generation: an unwritable --result_dir fails in a second
        out_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "w", encoding="utf-8")
    except OSError as e:
        raise EvalError(f"--result_dir {out_path.parent}: cannot write there ({e.strerror or e}); "
                        "pass a folder you can write to") from None
    try:
        with f, tqdm(total=len(prompts), desc="infer", unit="samples", disable=not progress, file=sys.stderr) as bar:
            responses = engine.generate(prompts, sampling, progress=bar)
            for msgs, label, response in zip(prompts, labels, responses):
                row = {"query": msgs[-1]["content"], "messages": msgs, "response": response, "label": label}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except OSError as e:
        raise EvalError(f"{e.filename or out_path}: cannot write the answers ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
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


def _read_line(stdin: TextIO, lineno: int) -> str | None:
    """The next line without its end, None at end of input, "" (with a notice) for a line that is not UTF-8.
    Reads bytes when the stream has them, so one bad line cannot end the session."""
    raw = stdin.buffer.readline() if hasattr(stdin, "buffer") else stdin.readline()
    if not raw:
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            print(f"<stdin> line {lineno}: not UTF-8 (byte 0x{raw[e.start]:02x}); line skipped", file=sys.stderr)
            return ""
    return raw.rstrip("\r\n")


def repl(engine: Engine, sampling: Sampling, system: str | None, stream: bool = True,
         stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """Chat until `exit` or end of input; returns the number of replies."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    interactive = stdin.isatty() and out.isatty()
    head = [{"role": "system", "content": system}] if system else []
    history: list[Message] = []
    replies = lineno = 0
    while True:
        lineno += 1
        if interactive:
            try:
                query = input("<<< ")  # line editing when a person types
            except EOFError:
                out.write("\n")
                break
            except UnicodeDecodeError:
                query = "\udcff"  # reported below, like a line the C locale decoded with surrogateescape
        else:
            out.write("<<< ")
            out.flush()
            query = _read_line(stdin, lineno)
            if query is None:
                out.write("\n")
                break
            out.write(query.encode("utf-8", "replace").decode("utf-8") + "\n")
        try:
            query.encode("utf-8")
        except UnicodeEncodeError:  # a terminal in the C locale hands bad bytes over as surrogates
            print(f"<stdin> line {lineno}: not UTF-8; line skipped", file=sys.stderr)
            continue
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
