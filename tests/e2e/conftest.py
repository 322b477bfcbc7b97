import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_DATA = REPO / "src" / "megatune" / "cli" / "demo_data"


def megatune(*args: str, env: dict | None = None, stdin: str | None = None, cwd: Path | None = None,
             check: bool = True, timeout: float = 1200) -> subprocess.CompletedProcess:
    """Run `megatune ...` exactly as a user would (a fresh process), return the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "megatune.cli.main", *args], env=full_env, input=stdin, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"megatune {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def sft_file() -> Path:
    """The real Alpaca demo data when ../shared/data is present, else the built-in slice of it."""
    real = SHARED_DATA / "sft" / "alpaca_en_demo.json"
    return real if real.exists() else DEMO_DATA / "sft" / "alpaca_en_short.jsonl"


@pytest.fixture(scope="session")
def eval_data() -> Path:
    return SHARED_DATA if (SHARED_DATA / "mmlu").exists() else DEMO_DATA


NAME = ["小黄", "Xiao Huang"]  # the self-cognition identity the workflows teach
AUTHOR = ["魔搭", "ModelScope"]
QUESTIONS = "who are you?\nclear\n你是谁？\nexit\n"  # the chat the workflows replay through `infer`


def tiny_hf(kind: str, work: Path, **shape) -> Path:
    """A tiny random HF dir of `kind` (make_tiny_model) under `work`, 128 wide with 4 heads / 2 KV heads and 2
    layers unless `shape` says otherwise."""
    from megatune.convert.testing import make_tiny_model

    dims = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, **shape}
    return make_tiny_model(kind, work / f"tiny-{kind.replace('_', '-')}", **dims)


def seed_sft(work: Path, megatron_dir: Path, sft_file: Path, *flags: str, nproc: int) -> tuple[Path, str]:
    """The seed's `sft` (Alpaca + self-cognition, the new identity, `--train_backend megatron`) from an exported
    Megatron dir in `nproc` local processes, with the run's own `flags` (learning rate, epochs, ...); returns its
    one run dir and its output."""
    out = megatune(
        "sft", "--resume_from_checkpoint", str(megatron_dir), "--dataset", f"{sft_file}#40", "self-cognition#500",
        "--max_length", "2048", "--batch_size", "2", "--eval_steps", "100", "--save_steps", "150",
        "--output_dir", "output", "--model_name", *NAME, "--model_author", *AUTHOR, "--train_backend", "megatron",
        *flags, env={"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(nproc))), "NPROC_PER_NODE": str(nproc)},
        cwd=work).stdout
    runs = sorted((work / "output" / megatron_dir.name).glob("v*-*"))
    assert len(runs) == 1, f"expected one run dir, found {runs}"
    return runs[0], out


def chat(work: Path, ckpt_dir: Path) -> str:
    """`infer` on `ckpt_dir` answering QUESTIONS (40 new tokens each); its output."""
    return megatune("infer", "--ckpt_dir", str(ckpt_dir), "--max_new_tokens", "40", stdin=QUESTIONS, cwd=work).stdout
