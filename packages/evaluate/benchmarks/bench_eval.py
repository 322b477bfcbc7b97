"""Loglikelihood throughput of the pt engine vs a naive one-request-per-forward loop, on a tiny random model.

    python packages/evaluate/benchmarks/bench_eval.py [--arch qwen2] [--questions 100] [--batch_size 16]
    nox -s bench_eval

Workload: the first `--questions` MMLU test questions (4 one-letter continuations each, lm-evaluation-harness
format) and as many ARC-Challenge questions (4 answer-text continuations each), read from ../shared/data or
$MEGATUNE_EVAL_DATA. The naive loop is what a plain harness does at batch size 1: for every request one forward
pass over context+continuation with full (T, V) logits. Both must agree on every score (checked), so the
speed-up is free. Prints a Markdown block to paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from megatune.evaluate.engine import split_context
from megatune.evaluate.pt_engine import PtEngine
from megatune.evaluate.tasks import arc, mmlu

DEFAULT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"


def workload(data_dir: Path, n: int) -> list[tuple[str, str]]:
    requests = []
    for task in (mmlu, arc):
        examples = [ex for rows in task.load(data_dir).values() for ex in rows if not ex.defect][:n]
        requests += [(task.ll_context(ex), c) for ex in examples for c in task.ll_continuations(ex)]
    return requests


@torch.inference_mode()
def naive(engine: PtEngine, requests: list[tuple[str, str]]) -> list[float]:
    out = []
    for context, continuation in requests:
        context, continuation = split_context(context, continuation)
        whole, ctx = engine.encode(context + continuation), engine.encode(context)
        whole = whole[-(engine.max_length + 1):]
        n_cont = len(whole) - len(ctx) if len(whole) > len(ctx) else 1
        logits = engine.model(input_ids=torch.tensor([whole[:-1]], device=engine.device)).logits[0]  # (T, V)
        logprobs = torch.log_softmax(logits.float(), -1)[-n_cont:]
        out.append(logprobs.gather(-1, torch.tensor(whole[-n_cont:], device=engine.device)[:, None]).sum().item())
    return out


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="qwen2")
    p.add_argument("--questions", type=int, default=100, help="questions per dataset (x4 requests)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 (both methods use it)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--data_dir", default=os.environ.get("MEGATUNE_EVAL_DATA") or str(DEFAULT_DATA))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (Path(args.data_dir) / "mmlu").is_dir():
        print(f"bench_eval: error: no benchmark data at {args.data_dir}; pass --data_dir", file=sys.stderr)
        return 2

    from megatune.convert.testing import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(args.arch, Path(tmp) / args.arch, seed=0, dtype="float32")
        engine = PtEngine(model_dir, dtype=args.dtype, batch_size=args.batch_size)
        requests = workload(Path(args.data_dir), args.questions)
        engine.loglikelihood(requests[:8])  # warm-up: first-call allocations and kernel selection
        naive(engine, requests[:8])
        t_naive, ref = timed(naive, engine, requests)
        t_engine, got = timed(engine.loglikelihood, requests)
    diff = max(abs(a - b[0]) for a, b in zip(ref, got))
    assert diff < (1e-3 if args.dtype == "float32" else 0.5), f"engine and naive loop disagree by {diff}"
    n = len(requests)
    tokens = sum(len(engine.encode(c + x)) for c, x in requests) / n
    print(f"""
### pt engine loglikelihood vs naive loop ({time.strftime('%Y-%m-%d %H:%M')})

- machine: {platform.machine()}, {os.cpu_count()} cores ({platform.processor() or platform.platform()}), \
torch {torch.__version__}, {torch.get_num_threads()} threads, device {engine.device}
- command: `python packages/evaluate/benchmarks/bench_eval.py --arch {args.arch} --questions {args.questions} \
--batch_size {args.batch_size} --dtype {args.dtype}{f' --threads {args.threads}' if args.threads else ''}`
- workload: {n} requests ({args.questions} MMLU + {args.questions} ARC-Challenge questions x 4 choices), \
mean {tokens:.0f} tokens each; tiny {args.arch} (hidden 64, 4 layers, {args.dtype})

| method | seconds | items/s | speed-up |
|---|---|---|---|
| naive: one request per forward, full logits | {t_naive:.2f} | {n / t_naive:.1f} | 1.0x |
| pt engine: sorted, left-padded batches of {args.batch_size}, shared inputs once, last-token logits | \
{t_engine:.2f} | {n / t_engine:.1f} | {t_naive / t_engine:.1f}x |

max |logprob difference| between the two: {diff:.2e}
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
