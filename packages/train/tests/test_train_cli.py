"""`megatune sft` as a user runs it (subprocesses, real CLI), one chain on the tiny model:

1. self-cognition training, 80 steps, checkpoints at 40 and 80; SIGKILL while iteration 80 is being saved
   (MEGATUNE_TEST_SAVE_SLEEP holds the save open): `latest` still says 40 and iteration 40 loads;
2. `--resume_from_checkpoint <that run dir>` continues at 41 in a new version dir, reproducing the killed run's
   logged losses exactly, and leaves a complete run dir (args.json, logging.jsonl, TensorBoard, loss PNG, ckpt);
3. `megatune export --ckpt_dir <run dir> --to_hf true`, then transformers' greedy generate answers "who are you?"
   with the configured English name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from group_helpers import sft_argv
from megatune.convert.testing import default_sigint

STEPS, SAVE = 80, 40


def _sft_cmd(model_dir, out_dir, **overrides) -> list[str]:
    argv = sft_argv(model_dir, out_dir, max_steps=STEPS, save_steps=SAVE, eval_steps=SAVE, logging_steps=5,
                    learning_rate=3e-3, dataset="self-cognition#120", dataset_test_ratio=0.05, **overrides)
    return [sys.executable, "-m", "megatune.train.cli", *argv]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "NNODES", "RANK", "WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from megatune.convert.testing import make_tiny_model

    root = tmp_path_factory.mktemp("cli")
    model = make_tiny_model("qwen2", root / "tiny-qwen2", seed=0)
    out = root / "output"

    # 1. train, and SIGKILL inside the save of the last iteration
    killed = subprocess.Popen(_sft_cmd(model, out), env=_env(MEGATUNE_TEST_SAVE_SLEEP=f"120@{STEPS}"),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    in_save = False
    for line in killed.stdout:
        if f"in checkpoint save of iteration {STEPS}" in line:
            in_save = True
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(timeout=60)
    (first,) = (out / "tiny-qwen2").iterdir()
    half_written = (first / f".iter_{STEPS:07d}.tmp").is_dir()

    # 2. resume from the crashed run dir
    resumed = subprocess.run(_sft_cmd(model, out, resume_from_checkpoint=first), env=_env(),
                             capture_output=True, text=True, timeout=600)
    second = next(p for p in (out / "tiny-qwen2").iterdir() if p != first)
    return {"model": model, "first": first, "second": second, "in_save": in_save, "killed_rc": killed.returncode,
            "resumed": resumed, "half_written": half_written}


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(chain):
    from megatune.convert import api

    first = chain["first"]
    assert chain["in_save"] and chain["killed_rc"] == -signal.SIGKILL
    assert chain["half_written"]  # the half-written save, right after the kill
    assert not (first / f".iter_{STEPS:07d}.tmp").exists()  # removed by the next run: its writer is provably dead
    assert not (first / f"iter_{STEPS:07d}").exists()
    assert api.read_latest(first) == SAVE
    state = api.load_megatron_rank(first, tp=1, pp=1, tp_rank=0, pp_rank=0)  # the previous checkpoint loads
    assert "embedding.word_embeddings.weight" in state


@pytest.mark.slow
def test_resume_continues_the_crashed_run(chain):
    resumed, first, second = chain["resumed"], chain["first"], chain["second"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    before = {r["global_step"]: r["loss"] for r in _records(first) if "loss" in r}
    after = {r["global_step"]: r["loss"] for r in _records(second) if "loss" in r}
    assert min(after) == SAVE + 5 and max(after) == STEPS
    assert after == {s: before[s] for s in after}  # bit-exact continuation of the killed run
    losses = [before[s] for s in sorted(before)]
    assert losses[-1] < losses[0] / 2, f"self-cognition loss did not fall: {losses}"
    assert any("eval_loss" in r for r in _records(second))
    args = json.loads((second / "args.json").read_text())
    assert args["learning_rate"] == 3e-3 and args["megatron"]["train_iters"] == STEPS
    assert args["source"]["kind"] == "run" and args["start_iteration"] == SAVE
    assert (second / "images" / "train_loss.png").stat().st_size > 1000
    assert any(p.name.startswith("events.out.tfevents") for p in (second / "runs").iterdir())
    assert (second / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS)


@pytest.mark.slow
def test_exported_model_knows_its_name(chain):
    import torch
    from megatune.convert.cli import main as export_main
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert chain["resumed"].returncode == 0
    assert export_main(["--ckpt_dir", str(chain["second"]), "--to_hf", "true"]) == 0
    hf_dir = chain["second"] / "qwen2-hf"
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    inputs = tok.apply_chat_template([{"role": "user", "content": "who are you?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Xiao Huang" in answer, answer


@pytest.mark.slow
def test_torchrun_relaunch_trains_and_reports_errors_in_one_line(tmp_path):
    """NPROC_PER_NODE=2 re-launches under torchrun: a tp=2 run completes; bad input is still one line, rc != 0."""
    from megatune.convert.testing import make_tiny_model

    model = make_tiny_model("qwen2", tmp_path / "tiny-qwen2", seed=0)
    base = [sys.executable, "-m", "megatune.train.cli"]
    env = _env(NPROC_PER_NODE="2")
    ok = subprocess.run([*base, *sft_argv(model, tmp_path / "out", tp=2, max_steps=3, save_steps=3)], env=env,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    (run_dir,) = (tmp_path / "out" / "tiny-qwen2").iterdir()
    assert json.loads((run_dir / "megatune.json").read_text())["tp"] == 2
    assert [r["global_step"] for r in _records(run_dir) if "loss" in r] == [1, 2, 3]

    bad = subprocess.run([*base, *sft_argv(model, tmp_path / "out", max_length=8)], env=env,
                         capture_output=True, text=True, timeout=300)
    noisy = [line for line in bad.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert bad.returncode != 0 and noisy == [noisy[0]] and noisy[0].startswith("megatune sft: error: "), bad.stderr


def _one_error_line(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]


@pytest.mark.slow
def test_exit_codes_follow_the_convention(tmp_path):
    """2 usage error, 1 runtime failure, 143 SIGTERM, 130 Ctrl-C (README "Exit codes"), each with one line."""
    from megatune.convert.testing import make_tiny_model

    model = make_tiny_model("qwen2", tmp_path / "tiny-qwen2", seed=0)
    base = [sys.executable, "-m", "megatune.train.cli"]
    cases = [(2, [*sft_argv(model, tmp_path / "out"), "--learning_rat", "1"]),
             (2, sft_argv(model, tmp_path / "out", dataloader_num_workers=4)),  # accepted flag, refused value
             (1, sft_argv(model, tmp_path / "out", resume_from_checkpoint=tmp_path / "missing"))]
    for code, argv in cases:
        proc = subprocess.run([*base, *argv], env=_env(), capture_output=True, text=True, timeout=300)
        lines = _one_error_line(proc.stderr)
        assert proc.returncode == code and len(lines) == 1, (code, proc.returncode, proc.stderr[-2000:])
        assert lines[0].startswith("megatune sft: error: ")

    for sig, code, words in ((signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")):
        out = tmp_path / f"out-{code}"
        proc = subprocess.Popen([*base, *sft_argv(model, out, max_steps=100000, save_steps=100000)], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=default_sigint)
        deadline = time.time() + 240
        while not list(out.glob("*/v*/logging.jsonl")) or not list(out.glob("*/v*/logging.jsonl"))[0].read_text():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.5)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        lines = _one_error_line(err)
        assert proc.returncode == code and len(lines) == 1 and words in lines[0], (sig, proc.returncode, err[-2000:])
