"""torch_dist checkpoints on 2 GPUs, Qwen2-1.5B shape (random weights), bf16 and the distributed optimizer:

    python packages/train/benchmarks/bench_torch_dist.py [--steps 20] [--save-at 10] [--keep DIR]
    python packages/train/benchmarks/bench_torch_dist.py --cpu-smoke   # the tiny model on CPU (gloo): the script runs

1. sync: `megatune sft` at DP2 (tp1) with --ckpt_format torch_dist, saving at --save-at and at the end; the time each
   save blocks training is measured around trainer.save (CUDA synchronised), the time until it is published too;
2. async: the same with --async_save true (training goes on while the tensors are written);
3. resume: the sync run's tracker rewound to --save-at, resumed at TP2 (2 GPUs, dp1): model, distributed-optimizer
   state (fully_reshardable), scheduler and data position resharded; its losses against the uninterrupted run's
   (bf16 at another TP sums in another order, hence RESUME_TOLERANCE).
Each run is a `torchrun --nproc-per-node 2` subprocess of this file (`--worker`), which builds the run as
`megatune sft` does (runtime.build_run) and times the saves. The checkout's sources go on PYTHONPATH (gpu_check.env).
Prints a Markdown summary for BENCHMARKS.md; exits 0 when the resumed losses match.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import ROOT, env  # noqa: E402
from hf_baseline import qwen2_config  # noqa: E402

RESUME_TOLERANCE = 2e-2  # bf16, TP1 -> TP2: the same weights, another reduction order


def sft_argv(model_dir: Path, out: Path, steps: int, save_at: int, **extra) -> list[str]:
    flags = {"model_id_or_path": str(model_dir), "dataset": "self-cognition#400", "model_name": ["小黄", "Xiao Huang"],
             "model_author": ["魔搭", "ModelScope"], "max_length": 1024, "batch_size": 1, "global_batch_size": 8,
             "max_steps": steps, "save_steps": save_at, "logging_steps": 1, "eval_steps": 10_000,
             "dataset_test_ratio": 0.0, "learning_rate": 1e-5, "dtype": "bf16", "use_distributed_optimizer": "true",
             "ckpt_format": "torch_dist", "output_dir": str(out), "seed": 7, **extra}
    argv = []
    for key, value in flags.items():
        argv += [f"--{key}", *(value if isinstance(value, list) else [str(value)])]
    return argv


def worker(result: str, argv: list[str]) -> None:
    """One rank of a run: build it as `megatune sft` does, time every save, write the result (rank 0)."""
    import torch
    from megatune.argmap import parse_sft_args
    from megatune.train import distributed, runtime, trainer

    run, info = runtime.build_run(parse_sft_args(argv), progress=False)
    saves, published = [], {}
    real_save, fmt = trainer.save, run.checkpoint
    real_publish = fmt._publish

    def timed_save(run, iteration):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        real_save(run, iteration)
        torch.cuda.synchronize()
        saves.append({"iteration": iteration, "t0": t0, "blocking_s": round(time.perf_counter() - t0, 2)})

    def timed_publish(iteration, meta):
        real_publish(iteration, meta)
        published[int(iteration)] = time.perf_counter()

    trainer.save, fmt._publish = timed_save, timed_publish
    try:
        out = trainer.train(run)
    finally:
        run.logger.close()
    for s in saves:
        s["published_after_s"] = round(published.get(s["iteration"], float("nan")) - s.pop("t0"), 2)
    if info and torch.distributed.get_rank() == 0:
        Path(result).write_text(json.dumps({"losses": out["losses"], "saves": saves, "info": info}))
    distributed.destroy()


def launch(argv: list[str], result: Path, log: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           "--worker", str(result), "--", *argv]
    print("$ " + " ".join(cmd), flush=True)
    with log.open("w") as fh:
        code = subprocess.run(cmd, cwd=ROOT, env=env(), stdout=fh, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"bench_torch_dist: run failed (exit {code}); see {log}:\n{log.read_text()[-4000:]}")
    return json.loads(result.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--save-at", type=int, default=10)
    p.add_argument("--keep", help="work directory to keep (default: a temporary one, removed)")
    p.add_argument("--cpu-smoke", action="store_true", help="the tiny model, 4 steps, on CPU: checks the script only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.worker:
        worker(args.worker, rest[1:] if rest[:1] == ["--"] else rest)
        return 0
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_torch_dist_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        from megatune.convert.testing import make_tiny_model

        model = work / ("tiny-qwen2" if args.cpu_smoke else "qwen2-1.5b-shape")
        if args.cpu_smoke:
            args.steps, args.save_at = 4, 2
            make_tiny_model("qwen2", model)
        elif not (model / "config.json").is_file():
            cfg = qwen2_config("qwen2-1.5b")
            make_tiny_model("qwen2", model, dtype="bfloat16",
                            **{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
        runs = {}
        for name, extra in (("sync", {}), ("async", {"async_save": "true"})):
            runs[name] = launch(sft_argv(model, work / name, args.steps, args.save_at, **extra),
                                work / f"{name}.json", work / f"{name}.log")
        run_dir = Path(runs["sync"]["info"]["run_dir"])
        from megatune.convert import ckpt_layout

        ckpt_layout.write_latest(run_dir, args.save_at)
        runs["resumed"] = launch(sft_argv(model, work / "resumed", args.steps, args.save_at, tp=2,
                                          resume_from_checkpoint=str(run_dir)),
                                 work / "resumed.json", work / "resumed.log")
        want, got = runs["sync"]["losses"][args.save_at:], runs["resumed"]["losses"]
        diff = max(abs(a - b) for a, b in zip(want, got)) if got else float("inf")
        ok = len(got) == args.steps - args.save_at and diff <= RESUME_TOLERANCE
        print("\n| run | layout | save (iteration) | blocks training | published after |\n|---|---|---|---|---|")
        for name in ("sync", "async"):
            i = runs[name]["info"]
            for s in runs[name]["saves"]:
                print(f"| {name} | tp{i['tp']} pp{i['pp']} dp{i['dp']} | {s['iteration']} | {s['blocking_s']} s | "
                      f"{s['published_after_s']} s |")
        i = runs["resumed"]["info"]
        print(f"\nresumed at tp{i['tp']} pp{i['pp']} dp{i['dp']} from iteration {i['start_iteration']}: max |loss diff| "
              f"{diff:.2e} over {len(got)} iterations (tolerance {RESUME_TOLERANCE}) -> {'PASS' if ok else 'FAIL'}")
        print(f"sync losses {[round(x, 4) for x in want]}\nresumed     {[round(x, 4) for x in got]}")
        print(f"async vs sync losses: max |diff| "
              f"{max(abs(a - b) for a, b in zip(runs['async']['losses'], runs['sync']['losses'])):.2e}")
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
