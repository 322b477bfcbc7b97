"""`megatune demo`: the whole ms-swift Megatron workflow on a built-in tiny model, end to end.

    make tiny HF model -> export --to_megatron (tp2) -> sft (2 processes, self-cognition) -> export --to_hf
    -> infer ("who are you" / "你是谁") -> eval (ceval mmlu gsm8k arc on built-in slices)

Every step is the real command a user would type, printed before it runs, so the demo doubles as a tutorial.
CPU (gloo, fp32) when there is no GPU; the same commands use NCCL and bf16 on GPUs. A Markdown report with the
loss curve is written into the output directory.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).with_name("demo_data")
NAME = ["小黄", "Xiao Huang"]
AUTHOR = ["魔搭", "ModelScope"]
QUESTIONS = ["who are you?", "你是谁？"]


class Step:
    """One printed, timed shell command; its output is shown live and kept for the report."""

    def __init__(self, report: list[str]):
        self.report = report
        self.index = 0

    def run(self, title: str, argv: list[str], env: dict | None = None, stdin: str | None = None) -> str:
        self.index += 1
        # shown as the user would type it: `megatune ...` rather than `python -m megatune.cli.main ...`
        shown = " ".join(shlex.quote(a) for a in (["megatune", *argv[3:]] if argv[1:3] == ["-m", MAIN] else argv))
        prefix = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        command = f"{prefix} {shown}".strip()
        print(f"\n=== [{self.index}] {title}\n$ {command}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(
            argv, env={**os.environ, **(env or {})}, input=stdin, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        seconds = time.perf_counter() - start
        print(proc.stdout, end="", flush=True)
        if proc.returncode != 0:
            raise SystemExit(f"megatune demo: error: step {self.index} ({title}) failed with exit code "
                             f"{proc.returncode}; its output is above")
        print(f"--- done in {seconds:.1f}s", flush=True)
        self.report += [f"## {self.index}. {title} ({seconds:.1f} s)", "", "```", command, "```", ""]
        return proc.stdout


MAIN = "megatune.cli.main"


def megatune(*args: str) -> list[str]:
    return [sys.executable, "-m", MAIN, *args]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megatune demo", description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", "--output-dir", default="demo_output")
    p.add_argument("--arch", default="qwen2", help="tiny architecture: llama, llama3, mistral, qwen2, qwen3")
    p.add_argument("--num_train_epochs", "--num-train-epochs", default="3")
    p.add_argument("--overwrite", choices=["true", "false"], default="true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from megatune.convert.testing import make_tiny_model

    out = Path(args.output_dir).resolve()
    if out.exists():
        if args.overwrite != "true":
            print(f"megatune demo: error: {out} exists; pass --overwrite true or another --output_dir", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    out.mkdir(parents=True)
    report = ["# megatune demo report", ""]
    step = Step(report)

    # Wider than the unit-test models so that it can memorise its new identity in a few CPU minutes.
    hf = make_tiny_model(args.arch, out / f"tiny-{args.arch}", hidden_size=128, intermediate_size=256,
                         num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, seed=0)
    print(f"=== [0] built-in tiny {args.arch} model (random weights, real tokenizer) -> {hf}")
    model_type = {"qwen2": "qwen2-0.5b-instruct", "qwen3": "qwen3-8b", "mistral": "mistral-7b-instruct-v0.3"}.get(
        args.arch, "llama3-8b-instruct")
    mega = out / f"{model_type}-tp2-pp1"
    step.run("HF -> Megatron (tp2)", megatune(
        "export", "--model_type", model_type, "--model_id_or_path", str(hf), "--to_megatron", "true",
        "--tp", "2", "--dtype", "fp32", "--megatron_output_dir", str(mega)))

    nproc = _processes()
    step.run(f"supervised fine-tuning with Megatron-Core, {'TP2 (from the checkpoint)' if nproc == 2 else 'TP1'} "
             f"in {nproc} process(es)", megatune(
        "sft", "--resume_from_checkpoint", str(mega),
        "--dataset", f"{DATA / 'sft' / 'alpaca_en_short.jsonl'}#50", "self-cognition#500",
        "--max_length", "128", "--learning_rate", "2e-3", "--min_lr", "2e-4", "--warmup_ratio", "0.05",
        "--batch_size", "4", "--gradient_accumulation_steps", "1", "--num_train_epochs", args.num_train_epochs,
        "--eval_steps", "50", "--save_steps", "1000", "--logging_steps", "10", "--dataset_test_ratio", "0.01",
        "--output_dir", str(out / "output"), "--model_name", *NAME, "--model_author", *AUTHOR,
        "--train_backend", "megatron", *([] if nproc == 2 else ["--tp", "1"])), env={"NPROC_PER_NODE": str(nproc)})
    run_dir = max((out / "output" / mega.name).glob("v*-*"), key=lambda p: p.stat().st_mtime)

    step.run("Megatron -> HF", megatune("export", "--ckpt_dir", str(run_dir), "--to_hf", "true"))
    hf_out = run_dir / f"{model_type}-hf"

    chat = step.run("chat (the REPL, driven through stdin)", megatune(
        "infer", "--ckpt_dir", str(hf_out), "--max_new_tokens", "48"),
        stdin=f"{QUESTIONS[0]}\nclear\n{QUESTIONS[1]}\nexit\n")
    answers = {q: _answer_after(chat, q) for q in QUESTIONS}

    table = step.run("benchmarks on built-in slices", megatune(
        "eval", "--ckpt_dir", str(hf_out), "--eval_dataset", "ceval", "mmlu", "gsm8k", "arc",
        "--eval_backend", "Native", "--eval_data_dir", str(DATA), "--eval_limit", "5", "--max_new_tokens", "64",
        "--eval_output_dir", str(out / "eval")))

    report += ["## Chat answers", ""] + [f"- **{q}** {a}" for q, a in answers.items()] + [""]
    summary = [line for line in table.splitlines() if line.startswith(("+", "|"))]
    report += ["## Evaluation (built-in 5-row slices: a smoke test, not a benchmark)", "", "```", *summary, "```", ""]
    report += _loss_summary(run_dir)
    for png in sorted(run_dir.rglob("*.png")):
        shutil.copy(png, out / png.name)
        report += [f"![{png.stem}]({png.name})", ""]
    (out / "report.md").write_text("\n".join(report), encoding="utf-8")
    print("\n=== chat answers")
    for q, a in answers.items():
        print(f"<<< {q}\n{a}")
    print(f"\nreport: {out / 'report.md'}")
    return 0


def _processes() -> int:
    """Two processes (TP2, as exported) on CPU or with >= 2 GPUs; one GPU trains alone (resharded to TP1 in memory)."""
    import torch

    return 1 if torch.cuda.is_available() and torch.cuda.device_count() < 2 else 2


def _loss_summary(run_dir: Path) -> list[str]:
    import json

    rows = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    if not losses:
        return []
    return ["## Training", "", f"{len(losses)} logged steps; loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
            f"run directory `{run_dir}`", ""]


def _answer_after(transcript: str, question: str) -> str:
    """The model's reply to `question` in a REPL transcript (text between the question and the next prompt)."""
    _, _, rest = transcript.partition(question)
    return rest.split("<<<")[0].strip()


if __name__ == "__main__":
    sys.exit(main())
