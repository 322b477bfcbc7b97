"""Bad input and stopped runs (issue 15: 7, 8, 15, 17) and the exit codes of `infer` / `eval` (2 usage, 1 runtime
failure, 130 interrupted, 143 terminated): one line saying what and where, and nothing half-written left behind."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from megatune.convert.testing import default_sigint
from megatune.evaluate import infer, report, runner
from megatune.evaluate.cli import eval_main, infer_main
from megatune.evaluate.engine import Sampling


def _err(capsys) -> str:
    err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("Loading weights")]
    assert len(err) == 1, err
    return err[0]


def _python_m(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "megatune.evaluate", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint, **kw)


# ---------------------------------------------------------------- 7: not UTF-8
def test_gbk_ceval_csv_names_file_and_line(tiny_dir, tmp_path, capsys):
    folder = tmp_path / "ceval" / "val"
    folder.mkdir(parents=True)
    text = "id,question,A,B,C,D,answer\n0,一加一等于几,1,2,3,4,B\n1,二加二等于几,1,2,3,4,D\n"
    (folder / "logic_val.csv").write_bytes(text.encode("gbk"))
    assert eval_main(["--ckpt_dir", str(tiny_dir), "--eval_dataset", "ceval", "--eval_data_dir", str(tmp_path)]) == 1
    err = _err(capsys)
    assert f"{folder / 'logic_val.csv'} line 2: not UTF-8" in err and "iconv" in err


def test_latin1_val_dataset_names_file_and_line(tiny_dir, tmp_path, capsys):
    data = tmp_path / "val.jsonl"
    data.write_bytes(b'{"query": "hi"}\n{"query": "caf\xe9"}\n')
    assert infer_main(["--ckpt_dir", str(tiny_dir), "--val_dataset", str(data), "--result_dir", str(tmp_path)]) == 1
    assert f"{data} line 2: not UTF-8 (byte 0xe9)" in _err(capsys)
    assert not list(tmp_path.glob("*.jsonl.tmp*")) and not list(tmp_path.glob("2*.jsonl"))


def test_repl_survives_a_line_that_is_not_utf8(tiny_dir):
    proc = _python_m("infer", "--ckpt_dir", str(tiny_dir), "--max_new_tokens", "3")
    out, err = proc.communicate(b"hello\n\xff\xfe bad\nagain\nexit\n", timeout=120)
    assert proc.returncode == 0, err
    assert b"<stdin> line 2: not UTF-8" in err and b"Traceback" not in err
    assert out.count(b"<<< ") == 4 and b"<<< again\n" in out  # the session went on after the bad line


class EchoEngine:
    def stream(self, messages, sampling):
        yield "ok:" + messages[-1]["content"]


def test_repl_skips_a_line_decoded_with_surrogateescape(capsys):
    """A terminal in the C locale hands undecodable bytes over as lone surrogates; they must not reach the model."""
    out = io.StringIO()
    assert infer.repl(EchoEngine(), Sampling(), None, stdin=io.StringIO("caf\udce9\nnext\n"), out=out) == 1
    assert "ok:next" in out.getvalue() and "caf" not in out.getvalue().split("<<< ")[2]
    assert "<stdin> line 1: not UTF-8; line skipped" in capsys.readouterr().err


# ---------------------------------------------------------------- 8: one line, not a traceback
@pytest.mark.parametrize("name, content, where", [
    ("broken.json", '[{"query": "a"},\n {"query": "b"\n]', "broken.json line 3: not valid JSON"),
    ("broken.jsonl", '{"query": "a"}\n{"query": }\n', "broken.jsonl line 2: not valid JSON"),
    ("rows.json", '[{"query": "a"}, ["not", "an", "object"]]', "rows.json row 2: expected an object"),
    ("bad.jsonl", '{"messages": [{"role": "user"}]}\n', "bad.jsonl line 1: malformed row (KeyError"),
])
def test_broken_val_dataset_is_one_line(tiny_dir, tmp_path, capsys, name, content, where):
    (tmp_path / name).write_text(content, encoding="utf-8")
    assert infer_main(["--ckpt_dir", str(tiny_dir), "--val_dataset", str(tmp_path / name)]) == 1
    assert where in _err(capsys)


def test_unwritable_eval_output_dir_is_one_line_before_loading(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: pytest.fail("ran although the output cannot be written"))
    assert eval_main(["--ckpt_dir", str(tiny_dir), "--eval_dataset", "gsm8k#1", "--eval_data_dir", str(data_dir),
                      "--eval_output_dir", str(blocker / "out")]) == 1
    err = _err(capsys)
    assert f"--eval_output_dir {blocker / 'out'}: cannot write there" in err


def test_unwritable_result_dir_is_one_line(tiny_dir, tmp_path, capsys):
    (tmp_path / "val.jsonl").write_text('{"query": "hi"}\n', encoding="utf-8")
    (tmp_path / "a-file").write_text("")
    assert infer_main(["--ckpt_dir", str(tiny_dir), "--val_dataset", str(tmp_path / "val.jsonl"),
                       "--result_dir", str(tmp_path / "a-file" / "res")]) == 1
    assert "--result_dir" in _err(capsys)


# ---------------------------------------------------------------- 15: the previous results survive
def _previous_run(out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples.jsonl").write_text('{"old": 1}\n', encoding="utf-8")
    (out / "eval_result.json").write_text('{"old": true}\n', encoding="utf-8")
    return {p.name: p.read_bytes() for p in out.iterdir()}


def _eval_args(tiny_dir, data_dir, out):
    return ["--ckpt_dir", str(tiny_dir), "--eval_dataset", "gsm8k#1", "mmlu:anatomy#1", "--eval_data_dir",
            str(data_dir), "--max_new_tokens", "2", "--eval_output_dir", str(out), "--progress", "false"]


def test_interrupted_eval_keeps_the_previous_results(tiny_dir, data_dir, tmp_path, monkeypatch, capsys):
    before = _previous_run(tmp_path / "out")
    real = runner._run_generate
    calls = []

    def interrupt_second(*a, **k):  # the first dataset finishes (its samples are added), the second is stopped
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner, "_run_generate", interrupt_second)
    assert eval_main(_eval_args(tiny_dir, data_dir, tmp_path / "out")) == 130
    assert "interrupted" in _err(capsys)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before  # no temp file left either


def test_full_disk_at_the_end_keeps_the_previous_results(tiny_dir, data_dir, tmp_path, monkeypatch, capsys):
    before = _previous_run(tmp_path / "out")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report.os, "fsync", full)
    assert eval_main(_eval_args(tiny_dir, data_dir, tmp_path / "out")) == 1
    assert "No space left on device" in _err(capsys)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_finished_eval_replaces_both_files(tiny_dir, data_dir, tmp_path, capsys):
    _previous_run(tmp_path / "out")
    assert eval_main(_eval_args(tiny_dir, data_dir, tmp_path / "out")) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["eval_result.json", "samples.jsonl"]
    samples = (tmp_path / "out" / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["dataset"] for x in samples] == ["gsm8k", "mmlu"]
    assert "results" in json.loads((tmp_path / "out" / "eval_result.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- 17: cut prompts are announced
def test_long_prompt_is_cut_from_the_left_with_a_notice(engine, capsys):
    long = "word " * (engine.max_length * 2)
    out = engine.generate([long, "short"], Sampling(max_new_tokens=2))
    assert len(out) == 2
    err = capsys.readouterr().err
    assert "notice: 1 of 2 prompts are longer than" in err and "cut from the left" in err
    engine.loglikelihood([(long, " end"), ("short", " end")])
    assert "notice: 1 of 2 prompts" in capsys.readouterr().err


# ---------------------------------------------------------------- exit codes
def test_sigterm_exits_143_and_sigint_130(tiny_dir):
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        proc = _python_m("infer", "--ckpt_dir", str(tiny_dir), "--max_new_tokens", "4",
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        deadline, seen = time.time() + 120, b""
        while seen.count(b"<<< ") < 2:  # the reply is out and the REPL waits for the next line
            seen += os.read(proc.stdout.fileno(), 4096)
            assert time.time() < deadline and proc.poll() is None, seen
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        assert err.decode().strip().splitlines()[-1].startswith("megatune infer: error: ")
