"""`megatune infer` and `megatune eval` as a user runs them: the REPL through stdin, batch inference, the eval
table and files, and one clear line for every bad input."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from megatune.evaluate import infer
from megatune.evaluate.cli import eval_main, infer_main
from megatune.evaluate.engine import Sampling


def test_repl_through_stdin_subprocess(tiny_dir):
    proc = subprocess.run(
        # `python -m megatune.evaluate` is `megatune` without the root distribution, which this package's
        # test environment does not install
        [sys.executable, "-m", "megatune.evaluate", "infer", "--ckpt_dir", str(tiny_dir), "--max_new_tokens", "6"],
        input="who are you?\nclear\n你好\nexit\n", text=True, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("<<< ") == 4  # three inputs and the exit
    assert "<<< who are you?\n" in proc.stdout and "<<< 你好\n" in proc.stdout


class RecordingEngine:
    """Stands in for a model: remembers what it was asked, answers 'reply N'."""

    def __init__(self):
        self.calls = []

    def stream(self, messages, sampling):
        self.calls.append([dict(m) for m in messages])
        yield "reply "
        yield str(len(self.calls))

    def generate(self, prompts, sampling, progress=None):
        return ["".join(self.stream(p, sampling)) for p in prompts]


def test_repl_keeps_history_and_clear_forgets_it():
    engine, out = RecordingEngine(), io.StringIO()
    n = infer.repl(engine, Sampling(), "be nice", stdin=io.StringIO("hi\nmore\nclear\n\nagain\nexit\nignored\n"), out=out)
    assert n == 3
    assert [m["content"] for m in engine.calls[1]] == ["be nice", "hi", "reply 1", "more"]
    assert [m["content"] for m in engine.calls[2]] == ["be nice", "again"]
    assert "ignored" not in out.getvalue() and "reply 2" in out.getvalue()


def test_repl_with_real_model_and_patched_stdin(tiny_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))  # ends without `exit`: end of input leaves too
    assert infer_main(["--ckpt_dir", str(tiny_dir), "--max-new-tokens", "5", "--progress", "false"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("<<< hello\n") and out.count("<<< ") == 2


def test_one_shot_query_is_deterministic(tiny_dir, engine, capsys):
    assert infer_main(["--ckpt_dir", str(tiny_dir), "--query", "who are you?", "--max_new_tokens", "7",
                       "--torch_dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    expected = engine.generate([[{"role": "user", "content": "who are you?"}]], Sampling(max_new_tokens=7))[0]
    assert printed == expected + "\n"


def test_batch_inference_writes_answers(tiny_dir, tmp_path, capsys):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"query": "2+2?", "response": "4", "history": [["1+1?", "2"]]},
        {"instruction": "Translate", "input": "你好", "output": "hello"},
        {"conversations": [{"from": "human", "value": "hey"}]},
    ]
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "more.json").write_text(json.dumps(rows[:1]), encoding="utf-8")
    code = infer_main(["--ckpt_dir", str(tiny_dir), "--val_dataset", f"{data}#3", str(tmp_path / "more.json"),
                       "--max_new_tokens", "4", "--result_dir", str(tmp_path / "res"), "--progress", "false"])
    assert code == 0
    (out,) = (tmp_path / "res").glob("*.jsonl")
    answers = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [a["label"] for a in answers] == ["hello", "4", "hello", "hello"]
    assert answers[1]["messages"][:2] == [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]
    assert answers[2]["query"] == "Translate\n你好" and all(isinstance(a["response"], str) for a in answers)


def test_eval_end_to_end(tiny_dir, data_dir, tmp_path, capsys):
    out_dir = tmp_path / "eval"
    code = eval_main(["--ckpt_dir", str(tiny_dir), "--eval_dataset", "ceval", "mmlu", "gsm8k", "arc",
                      "--eval_backend", "Native", "--eval_data_dir", str(data_dir), "--eval_limit", "2",
                      "--max_new_tokens", "8", "--eval_output_dir", str(out_dir)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| dataset | score" in printed
    for name in ("ceval", "mmlu", "gsm8k", "arc"):
        assert f"| {name} " in printed
    assert "computer_network" in printed and "abstract_algebra" in printed  # the per-subject breakdown
    result = json.loads((out_dir / "eval_result.json").read_text(encoding="utf-8"))
    nums = {k: v["num"] for k, v in result["results"].items()}
    assert nums == {"ceval": 52 * 2, "mmlu": 57 * 2, "gsm8k": 2, "arc": 2}
    assert result["protocol"] == "native" and 0.0 <= result["results"]["ceval"]["score"] <= 1.0
    samples = [json.loads(x) for x in (out_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(samples) == sum(nums.values())
    assert {"prompt", "response", "extracted", "gold", "correct"} <= set(samples[0])
    assert samples[0]["prompt"].startswith("以下是中国关于")
    mean = sum(s["correct"] for s in samples if s["dataset"] == "mmlu") / nums["mmlu"]
    assert result["results"]["mmlu"]["score"] == round(mean, 4)


def test_eval_loglikelihood_protocol_few_shot(tiny_dir, data_dir, tmp_path, capsys):
    code = eval_main(["--ckpt_dir", str(tiny_dir), "--eval_dataset", "mmlu", "gsm8k", "--eval_protocol",
                      "loglikelihood", "--eval_few_shot", "2", "--eval_data_dir", str(data_dir), "--eval_limit", "1",
                      "--max_new_tokens", "8", "--eval_output_dir", str(tmp_path), "--progress", "false"])
    assert code == 0
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    mc = samples[0]
    assert len(mc["logprobs"]) == 4 and mc["extracted"] in "ABCD"
    assert mc["prompt"].count("\nAnswer:") == 3  # two shots from dev, then the question
    assert samples[-1]["dataset"] == "gsm8k" and samples[-1]["prompt"].count("Question:") == 3


def test_eval_arc_reports_acc_norm(tiny_dir, data_dir, tmp_path, capsys):
    code = eval_main(["--ckpt_dir", str(tiny_dir), "--eval_dataset", "arc", "--eval_protocol", "loglikelihood",
                      "--eval_data_dir", str(data_dir), "--eval_limit", "3", "--eval_output_dir", str(tmp_path),
                      "--progress", "false"])
    assert code == 0 and "acc_norm" in capsys.readouterr().out
    assert "acc_norm" in json.loads((tmp_path / "eval_result.json").read_text())["results"]["arc"]


def test_default_output_dir(tiny_dir, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert eval_main(["--ckpt_dir", str(tiny_dir), "--eval_dataset", "gsm8k", "--eval_data_dir", str(data_dir),
                      "--eval_limit", "1", "--max_new_tokens", "2", "--progress", "false"]) == 0
    (run,) = (tmp_path / "eval_outputs" / tiny_dir.name).iterdir()
    assert (run / "eval_result.json").is_file() and (run / "samples.jsonl").is_file()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("verb", ["infer", "eval"])
def test_missing_checkpoint_dir(verb, tmp_path, capsys):
    main = infer_main if verb == "infer" else eval_main
    assert main(["--ckpt_dir", str(tmp_path / "nope")]) == 2
    assert "no such directory" in _one_error_line(capsys)


def test_megatron_checkpoint_points_to_export(tmp_path, capsys):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    assert infer_main(["--ckpt_dir", str(tmp_path)]) == 2
    assert "megatune export --ckpt_dir" in _one_error_line(capsys)


def test_missing_data_is_one_line(tiny_dir, tmp_path, capsys):
    assert eval_main(["--ckpt_dir", str(tiny_dir), "--eval_dataset", "ceval", "--eval_data_dir", str(tmp_path)]) == 2
    err = _one_error_line(capsys)
    assert "ceval" in err and "val/<subject>_val.csv" in err


def test_bad_flags(tiny_dir, capsys):
    assert eval_main(["--ckpt_dir", str(tiny_dir), "--eval_datset", "gsm8k"]) == 2
    assert "--eval_dataset" in _one_error_line(capsys)
    assert eval_main(["--ckpt_dir", str(tiny_dir), "--eval_dataset", "hellaswag"]) == 2
    assert "ceval mmlu gsm8k arc" in _one_error_line(capsys)
    assert eval_main(["--ckpt_dir", str(tiny_dir), "--eval_backend", "OpenCompass"]) == 2
    assert "Native" in _one_error_line(capsys)


def test_vllm_missing_says_how_to_install(tiny_dir, capsys):
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    assert infer_main(["--ckpt_dir", str(tiny_dir), "--infer_backend", "vllm", "--query", "hi"]) == 2
    err = _one_error_line(capsys)
    assert "pip install 'megatune-evaluate[vllm]'" in err and "--infer_backend pt" in err
