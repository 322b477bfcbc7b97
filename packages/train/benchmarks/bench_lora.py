"""LoRA under Megatron vs full fine-tuning vs HF transformers + peft: tokens/s and peak memory, same GPU, one run.

    python packages/train/benchmarks/bench_lora.py                       # Qwen2-7B shape, 1 GPU, S=4096, r=8, ALL
    python packages/train/benchmarks/bench_lora.py --model qwen2-72b --tp 2 --layers 40   # 2 GPUs, TP2 + SP, LoRA only
    python packages/train/benchmarks/bench_lora.py --cpu-smoke           # tiny fp32 run of all three on CPU

Rows (random weights, fresh random tokens every step, the same shape and rank/targets on every side):
- megatune LoRA: what `megatune sft --sft_type lora` runs per iteration: build_model (bf16 params, native spec),
  lora.apply_lora (r, alpha 32, dropout 0.05, ALL linears), runtime.wrap_model (Float16Module + megatron-core DDP,
  fp32 gradient buffers for the adapters only), optim.build_optimizer (fp32 main params of the adapters,
  distributed optimizer, fused AdamW), steps.train_step; lora.check_optimizer asserts the optimizer holds only the
  adapters.
- megatune full: the same step without adapters (all parameters trained). On one H200 the 7B shape needs about
  18 bytes/parameter of weights, gradients and Adam state (~137 GB) before activations, so it may not fit: the row
  then reports OOM and the device memory as a lower bound for the memory ratio.
- HF + peft: the same model from transformers in bf16 (a frozen base needs no fp32 master copy), peft LoRA with the
  same r/alpha/dropout/targets (adapters kept in fp32 by peft), bf16 autocast, SDPA, fused AdamW on the adapters --
  peft's recommended recipe; `--hf-grad-ckpt` adds gradient checkpointing if activations do not fit.
Each megatune row runs under torchrun in a subprocess (a clean process group, nproc = tp).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import top_kernels  # noqa: E402
from bench_train import SMOKE_CFG, margs_for, microbatch  # noqa: E402
from hf_baseline import qwen2_config, time_steps  # noqa: E402

HF_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # = ALL
QWEN2_72B = dict(qwen2_config("qwen2-7b"), hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8, vocab_size=152064)


def model_config(name: str, layers: int | None) -> dict:
    cfg = dict(QWEN2_72B) if name == "qwen2-72b" else qwen2_config(name)
    return dict(cfg, num_hidden_layers=layers) if layers else cfg


def _peak_gb(gpu: bool) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0


def bench_megatune(cfg: dict, *, tp: int, seq: int, mbs: int, steps_n: int, warmup: int, lora_rank: int | None,
                   recompute: str | None, dropout: float = 0.05, profile: bool = False) -> dict:
    """One megatune variant in this process (a torchrun rank): LoRA when lora_rank is set, else full fine-tuning."""
    from megatune.train import lora, optim, runtime, steps
    from megatune.train.distributed import init_distributed
    from megatune.train.model import build_model
    from megatune.train.policy import Machine, Request, resolve_policy

    gpu = torch.cuda.is_available()
    name = f"megatune {f'LoRA r={lora_rank} ALL' if lora_rank else 'full'} tp{tp}" + (
        f" recompute={recompute}" if recompute else "")
    dist = init_distributed(tp, 1, seed=0)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    try:
        chunks = build_model(cfg, tp=tp, pp=1, params_dtype=torch.bfloat16 if gpu else torch.float32,
                             sequence_parallel=tp > 1, seq_length=seq, spec="native", recompute_granularity=recompute)
        trainable = None
        if lora_rank:
            trainable = lora.apply_lora(chunks, lora.LoraConfig(rank=lora_rank, alpha=32.0, dropout=dropout,
                                                                targets=("ALL",)))
        margs = margs_for(bf16=gpu, distributed=gpu, gbs=mbs * dist.dp)
        policy = resolve_policy(Request(precision="bf16" if gpu else "fp32", distributed_optimizer=gpu),
                                Machine.detect(), dist.dp)
        model = runtime.wrap_model(chunks, policy)
        optimizer = optim.build_optimizer(model, margs, policy)
        if lora_rank:
            lora.check_optimizer(optimizer, model)
        scheduler = optim.build_scheduler(optimizer, margs)
        forward_step = steps.make_forward_step(lambda batch: {"attention_mask": None})
        batches = [[microbatch(cfg["vocab_size"], mbs, seq, 1000 * i + dist.dp_rank, dist.device)]
                   for i in range(warmup + steps_n)]
        losses = []

        def step(batch):
            out = steps.train_step(model, optimizer, scheduler, batch, forward_step, increment=mbs * dist.dp,
                                   device=dist.device)
            losses.append(out["loss"])

        for i, batch in enumerate(batches):
            if i == warmup:
                if gpu:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            step(batch)
        if gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        kernels = None
        if profile and gpu:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step(batches[0])
                torch.cuda.synchronize()
            kernels = top_kernels(prof, 12)
    except torch.OutOfMemoryError as e:
        return {"name": name, "gpus": dist.world_size, "oom": str(e).splitlines()[0][:160],
                "device_gb": torch.cuda.get_device_properties(0).total_memory / 2**30 if gpu else 0.0}
    result = {"name": name, "gpus": dist.world_size, "tokens_per_s": steps_n * mbs * dist.dp * seq / seconds,
              "peak_mem_gb": _peak_gb(gpu), "losses": losses, "step_s": seconds / steps_n,
              "trainable_per_rank": trainable, "top_kernels": kernels}
    model = optimizer = scheduler = chunks = None  # free the GPU memory before the next variant
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return result


def bench_hf_peft(cfg: dict, *, seq: int, mbs: int, steps_n: int, warmup: int, rank: int, grad_ckpt: bool,
                  dropout: float = 0.05) -> dict:
    """transformers + peft on one device (bf16 base, fp32 adapters, bf16 autocast, SDPA, fused AdamW)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    torch.manual_seed(0)
    config = Qwen2Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = "sdpa"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    with torch.device(device):  # random init on the GPU: seconds, not minutes of CPU init for 7B
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if gpu else torch.float32)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=32, lora_dropout=dropout, target_modules=list(HF_NAMES),
                                             task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    timed = time_steps(model, params, vocab=cfg["vocab_size"], seq=seq, mbs=mbs, steps=steps_n, warmup=warmup,
                       autocast=gpu, lr=1e-4)
    result = {"name": f"HF + peft LoRA r={rank} ALL" + (" grad-ckpt" if grad_ckpt else ""), "gpus": 1,
              "tokens_per_s": timed["tokens_per_s"], "peak_mem_gb": _peak_gb(gpu), "losses": timed["losses"],
              "trainable_per_rank": sum(p.numel() for p in params)}
    del model, params
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return result


def worker(spec: dict) -> None:
    from megatune.train.distributed import destroy

    result = bench_megatune(spec["cfg"], tp=spec["tp"], seq=spec["seq"], mbs=spec["mbs"], steps_n=spec["steps"],
                            warmup=spec["warmup"], lora_rank=spec["lora_rank"], recompute=spec["recompute"],
                            dropout=spec.get("dropout", 0.05), profile=spec.get("profile", False))
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["out"]).write_text(json.dumps(result))
    destroy()


def launch(spec: dict, out_dir: Path, name: str, timeout: int) -> dict | None:
    spec = dict(spec, out=str(Path(tempfile.mkdtemp()) / f"{name}.json"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec['tp']}", __file__,
           "--worker", json.dumps(spec)]
    print(f"[bench] {name}: torchrun --nproc_per_node={spec['tp']}", flush=True)
    try:
        proc = subprocess.run(cmd, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except subprocess.TimeoutExpired:
        print(f"[bench] {name}: timed out after {timeout}s", flush=True)
        return None
    (out_dir / f"{name}.log").write_text(proc.stdout)
    if proc.returncode != 0 or not Path(spec["out"]).is_file():
        print(f"[bench] {name}: FAILED rc={proc.returncode}\n" + proc.stdout[-3000:], flush=True)
        return None
    return json.loads(Path(spec["out"]).read_text())


def fmt(r: dict) -> str:
    if "oom" in r:
        return f"{r['name'][:48]:48s} {r['gpus']:>4} {'OOM':>10} {'>' + format(r['device_gb'], '.1f'):>9}"
    return f"{r['name'][:48]:48s} {r['gpus']:>4} {r['tokens_per_s']:>10.0f} {r['peak_mem_gb']:>9.1f}"


def summary(rows: dict) -> list[str]:
    lines, lo = [], rows.get("lora")
    full, hf = rows.get("full"), rows.get("hf")
    if lo and full:
        ref = full.get("peak_mem_gb") or full.get("device_gb")
        bound = "<=" if "oom" in full else "="
        lines.append(f"LoRA / full peak memory {bound} {lo['peak_mem_gb'] / ref:.1%} (target <= 40%)"
                     + (" (full fine-tuning OOM: ratio against the device memory, an upper bound)" if "oom" in full
                        else ""))
    if lo and hf and "oom" not in hf:
        lines.append(f"megatune LoRA / HF + peft tokens/s = {lo['tokens_per_s'] / hf['tokens_per_s']:.2f}x "
                     f"(target >= 1.2x); memory {lo['peak_mem_gb']:.1f} vs {hf['peak_mem_gb']:.1f} GB")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2-7b", choices=["qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "qwen2-72b"])
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size = GPUs (TP > 1: LoRA row only)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--skip-full", action="store_true")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--hf-grad-ckpt", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--timeout", type=int, default=300, help="seconds per torchrun launch")
    p.add_argument("--dropout", type=float, default=0.05, help="lora_dropout on both sides")
    p.add_argument("--profile", action="store_true", help="top CUDA kernels of one megatune LoRA step")
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))
    recompute = None if a.recompute == "none" else a.recompute
    if a.cpu_smoke:
        cfg = dict(SMOKE_CFG)
        rows = {"lora": bench_megatune(cfg, tp=1, seq=32, mbs=2, steps_n=2, warmup=1, lora_rank=4, recompute=None),
                "full": bench_megatune(cfg, tp=1, seq=32, mbs=2, steps_n=2, warmup=1, lora_rank=None, recompute=None),
                "hf": bench_hf_peft(cfg, seq=32, mbs=2, steps_n=2, warmup=1, rank=4, grad_ckpt=False)}
        for r in rows.values():
            print(fmt(r), r.get("trainable_per_rank"), r["losses"])
        return None
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model_config(a.model, a.layers)
    date, gpu = time.strftime("%Y-%m-%d"), torch.cuda.get_device_name(0)
    print(f"[bench] {date} {gpu} x{torch.cuda.device_count()} torch {torch.__version__} model {a.model} "
          f"layers {cfg['num_hidden_layers']} tp {a.tp} S={a.seq} mbs={a.mbs} r={a.rank} steps={a.steps}", flush=True)
    spec = {"cfg": cfg, "tp": a.tp, "seq": a.seq, "mbs": a.mbs, "steps": a.steps, "warmup": a.warmup,
            "recompute": recompute}
    rows = {}
    rows["lora"] = launch(dict(spec, lora_rank=a.rank, dropout=a.dropout, profile=a.profile), out, "megatune_lora",
                          a.timeout)
    if not a.skip_full:
        rows["full"] = launch(dict(spec, lora_rank=None), out, "megatune_full", a.timeout)
    if not a.skip_hf and a.tp == 1:
        try:
            rows["hf"] = bench_hf_peft(cfg, seq=a.seq, mbs=a.mbs, steps_n=a.steps, warmup=a.warmup, rank=a.rank,
                                       grad_ckpt=a.hf_grad_ckpt, dropout=a.dropout)
        except torch.OutOfMemoryError as e:
            rows["hf"] = {"name": "HF + peft", "gpus": 1, "oom": str(e).splitlines()[0][:160],
                          "device_gb": torch.cuda.get_device_properties(0).total_memory / 2**30}
    rows = {k: v for k, v in rows.items() if v}
    (out / "bench_lora.json").write_text(json.dumps({"date": date, "gpu": gpu, "args": vars(a), "rows": rows},
                                                    indent=1))
    print(f"\n{'run':48s} {'gpus':>4} {'tokens/s':>10} {'peak GB':>9}")
    for r in rows.values():
        print(fmt(r))
    for line in summary(rows):
        print(line)
    for name, ms, count in (rows.get("lora") or {}).get("top_kernels") or []:
        print(f"  {ms:9.1f} ms {count:6d}  {name[:100]}")
    return None


if __name__ == "__main__":
    main()
