"""The GPU check (`nox -s gpu`, or directly on a GPU machine without nox or network):

    python packages/train/benchmarks/gpu_check.py [--steps 20] [--skip-pytest] [--keep DIR]

1. `pytest -m gpu` over every package's test files that carry the marker (tests needing more GPUs than there are
   skip with a reason);
2. a short `megatune sft` through the real command line in the production configuration on the tiny model: bf16,
   the distributed optimizer, the overlapped gradient reduce (DP > 1: NPROC_PER_NODE = the visible GPUs when there
   are at least 2), fused AdamW, a save half way and at the end; then the tracker is rewound to the half-way save
   and the run is resumed from it: the resumed iterations must repeat the first run's losses (GPU kernels are not
   bit-reproducible across runs, hence a tolerance) and the device policy recorded in args.json must be the
   production one.

The sources of this checkout are put on PYTHONPATH, so nothing needs installing beyond the dependencies (torch,
megatron-core, transformers, datasets, ...). Prints a Markdown summary for BENCHMARKS.md; exits 0 when all passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SOURCES = [ROOT / "src", *sorted(ROOT.glob("packages/*/src"))]
RESUME_TOLERANCE = 2e-3  # as test_gpu_train: the same step on the same state, recomputed by GPU kernels


def env(**extra: str) -> dict:
    paths = [str(p) for p in SOURCES] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    base = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "NNODES", "RANK", "WORLD_SIZE",
                                                              "LOCAL_RANK")}
    return {**base, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1", **extra}


def gpu_test_files() -> list[str]:
    files = sorted(ROOT.glob("packages/*/tests/test_*.py"))
    return [str(p.relative_to(ROOT)) for p in files if "mark.gpu" in p.read_text(encoding="utf-8")]


def run_pytest() -> tuple[bool, str]:
    files = gpu_test_files()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-rA", "-q", "-p", "no:cacheprovider", *files]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(proc.stdout, flush=True)
    summary = next((line for line in reversed(proc.stdout.splitlines())
                    if re.search(r"\d+ (passed|failed|skipped|error)", line)), "no pytest summary line")
    return proc.returncode == 0, f"`pytest -m gpu` ({len(files)} files): {summary.strip('= ')} ({time.time() - t0:.0f} s)"


def sft(model: Path, out: Path, gpus: int, steps: int, *extra: str) -> tuple[int, str]:
    argv = [sys.executable, "-m", "megatune.cli.main", "sft", "--model_id_or_path", str(model),
            "--dataset", "self-cognition#400", "--model_name", "小黄", "Xiao Huang", "--model_author", "魔搭",
            "ModelScope", "--max_length", "128", "--dtype", "bf16", "--learning_rate", "3e-4", "--batch_size", "2",
            "--global_batch_size", str(4 * max(gpus, 1)), "--max_steps", str(steps), "--save_steps", str(steps // 2),
            "--eval_steps", "1000", "--logging_steps", "1", "--dataset_test_ratio", "0", "--output_dir", str(out),
            "--seed", "7", *extra]
    launch = {"NPROC_PER_NODE": str(gpus)} if gpus >= 2 else {}
    print("$ " + " ".join(f"{k}={v}" for k, v in launch.items()) + " " + " ".join(argv[2:]), flush=True)
    proc = subprocess.run(argv, cwd=out.parent, env=env(**launch), text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    print(proc.stdout[-4000:], flush=True)
    return proc.returncode, proc.stdout


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines() if line.strip()]
    return {r["global_step"]: r["loss"] for r in rows if "loss" in r}


def check_sft(work: Path, gpus: int, steps: int) -> tuple[list[str], list[str]]:
    """(what was measured, what failed)."""
    from megatune.convert.testing import make_tiny_model

    model = make_tiny_model("qwen2", work / "tiny-qwen2", seed=0)
    out = work / "output"
    dp = max(gpus, 1)
    failures: list[str] = []
    lines: list[str] = []
    t0 = time.time()
    code, _ = sft(model, out, gpus, steps)
    first_s = time.time() - t0
    runs = sorted((out / model.name).glob("v*-*"))
    if code != 0 or len(runs) != 1:
        return [], [f"production `megatune sft` failed: exit code {code}"]
    first = runs[0]
    args = json.loads((first / "args.json").read_text())
    policy = args["policy"]
    want = {"device_type": "cuda", "precision": "bf16", "distributed_optimizer": True, "fused_adamw": True,
            "overlap_grad_reduce": dp > 1, "layer_spec": "native", "compiled_kernels": True, "fused_loss": True}
    wrong = {k: policy.get(k) for k, v in want.items() if policy.get(k) != v}
    if wrong:
        failures.append(f"device policy is not the production one: {wrong}")
    half = steps // 2
    shards = list(first.glob(f"iter_{half:07d}/*/distrib_optim.pt"))
    if not shards:
        failures.append(f"no distrib_optim.pt under {first}/iter_{half:07d}: the distributed optimizer did not save")
    base = losses(first)
    if not (len(base) == steps and base[steps] < base[1]):
        failures.append(f"first run: {len(base)} logged steps, loss {base.get(1)} -> {base.get(steps)} (not falling)")
    (first / "latest_checkpointed_iteration.txt").write_text(f"{half}\n")  # as if the last save never happened
    t0 = time.time()
    code, _ = sft(model, out, gpus, steps, "--resume_from_checkpoint", str(first))
    resume_s = time.time() - t0
    second = [p for p in sorted((out / model.name).glob("v*-*")) if p != first]
    if code != 0 or len(second) != 1:
        return [], failures + [f"resumed `megatune sft` failed: exit code {code}"]
    again = losses(second[0])
    diff = max((abs(again[s] - base[s]) for s in again), default=float("inf"))
    if sorted(again) != list(range(half + 1, steps + 1)) or diff > RESUME_TOLERANCE:
        failures.append(f"resume from iteration {half}: steps {sorted(again)}, max |loss diff| {diff:.2e} "
                        f"(tolerance {RESUME_TOLERANCE})")
    lines.append(f"production `megatune sft` ({'NPROC_PER_NODE=' + str(gpus) if gpus >= 2 else '1 process'}, "
                 f"DP{dp}, bf16, distributed optimizer, overlap {'on' if dp > 1 else 'off (DP1)'}, fused AdamW): "
                 f"{steps} steps in {first_s:.0f} s, loss {base.get(1, float('nan')):.4f} -> "
                 f"{base.get(steps, float('nan')):.4f}; saved at {half} and {steps}")
    lines.append(f"resume from the iteration-{half} save ({resume_s:.0f} s): iterations {half + 1}-{steps} differ "
                 f"from the uninterrupted run by at most {diff:.2e} (tolerance {RESUME_TOLERANCE})")
    return lines, failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="iterations of the production run (saved at half)")
    p.add_argument("--skip-pytest", action="store_true", help="only the production `megatune sft`")
    p.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it")
    args = p.parse_args(argv)
    sys.path[:0] = [str(s) for s in SOURCES]
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: error: no CUDA GPU visible; run this on the GPU machine", file=sys.stderr)
        return 1
    gpus = torch.cuda.device_count()
    print(f"gpu_check: {gpus} x {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    results: list[tuple[bool, str]] = []
    if not args.skip_pytest:
        results.append(run_pytest())
    work = args.keep or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        lines, failures = check_sft(work, gpus, args.steps)
        results += [(True, line) for line in lines] + [(False, line) for line in failures]
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n### GPU check, {gpus} x {torch.cuda.get_device_name()}, torch {torch.__version__}, {stamp}\n")
    for ok, line in results:
        print(f"- {'pass' if ok else '**FAIL**'}: {line}")
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
