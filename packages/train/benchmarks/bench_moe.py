"""MoE training throughput: a Qwen3-30B-A3B-shaped model, HF transformers vs megatune, same shape, same GPUs.

    python packages/train/benchmarks/bench_moe.py [--layers 6 --seq 4096 --mbs 1] [--multi ep2 --ep2-layers 12]
    python packages/train/benchmarks/bench_moe.py --accum 8 --multi ''   # 8 micro-batches per step, both sides
    python packages/train/benchmarks/bench_moe.py --cpu-smoke      # tiny fp32 MoE run of the megatune side on CPU

Shape: Qwen3-30B-A3B's config.json (hidden 2048, 32 heads / 4 KV heads of 128, 128 experts, top-8 renormalised,
expert ffn 768, vocab 151936) with `--layers` of its 48 decoder layers, so that full fine-tuning fits: about 6 on one
H200, 12 with expert parallelism 2 on two. Random weights, random tokens, bf16.

HF side (hf_baseline's recipe: what HF Trainer runs on one GPU, fused AdamW, SDPA, no gradient checkpointing), in
the variants `--hf` lists: `default` = fp32 master weights + bf16 autocast with transformers' default experts
implementation (reported as it resolves it); `bf16-grouped_mm` = bf16 weights with the grouped_mm experts (its
fastest MoE option; pure bf16 AdamW, so less precise than either other row); `eager` = the per-expert loop.
megatune side: bench_train.bench_megatune (what `megatune sft` runs per iteration: native spec, grouped-GEMM experts,
moe_dispatch's local dispatcher (megatron-core's alltoall in the comparison row), HF's load-balancing loss,
distributed optimizer, fused AdamW) under torchrun.
MFU counts the active parameters (top-8 experts): metrics.flops_per_token, the same as logging.jsonl.
Targets (issue 13): >= 2x the fastest HF row in tokens/s on 1 GPU; MFU >= 30%; EP2 on two GPUs >= 85% of the
1-GPU MFU (equivalently of twice its per-layer token rate).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import fmt, print_rows  # noqa: E402
from bench_train import bench_megatune, launch  # noqa: E402
from hf_baseline import H200_BF16_PEAK, flops_per_token, time_steps  # noqa: E402


def qwen3_moe_config(layers: int) -> dict:
    """Qwen/Qwen3-30B-A3B config.json with `layers` decoder layers."""
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
            "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": layers, "num_attention_heads": 32,
            "num_key_value_heads": 4, "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
            "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.001,
            "use_sliding_window": False, "sliding_window": None}


def bench_hf_moe(cfg: dict, variant: str, *, seq: int, mbs: int, steps: int, warmup: int, accum: int = 1) -> dict:
    """One HF variant (module docstring); loss includes router_aux_loss_coef x aux (output_router_logits)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3_moe", **{k: v for k, v in cfg.items() if k != "model_type"})
    config._attn_implementation = "sdpa"
    impl = {"default": None, "bf16-grouped_mm": "grouped_mm", "eager": "eager"}[variant]
    bf16 = variant.startswith("bf16")
    kwargs = {} if impl is None else {"experts_implementation": impl}
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if bf16 else torch.float32, **kwargs).cuda()
    resolved = getattr(model.config, "_experts_implementation", None)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    timed = time_steps(model, list(model.parameters()), vocab=cfg["vocab_size"], seq=seq, mbs=mbs, steps=steps,
                       warmup=warmup, autocast=not bf16, lr=1e-5, accum=accum, output_router_logits=True)
    tps = timed["tokens_per_s"]
    name = f"HF {variant} (experts: {resolved})" + (f" x{accum} accum" if accum > 1 else "")
    row = {"name": name, "gpus": 1, "tokens_per_s": tps,
           "mfu": tps * flops_per_token(cfg, seq) / H200_BF16_PEAK,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30, "losses": timed["losses"]}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6, help="decoder layers on one GPU")
    p.add_argument("--ep2-layers", type=int, default=12, help="decoder layers of the EP2 run on two GPUs")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--accum", type=int, default=1,
                   help="micro-batches per optimizer step, on both sides (SFT runs accumulate: global batch > 1)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--multi", default="ep2", help="comma list: ep2 (two GPUs, expert parallelism 2), or ''")
    p.add_argument("--hf", default="default,bf16-grouped_mm", help="HF variants: default, bf16-grouped_mm, eager")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--timeout", type=int, default=500, help="seconds per torchrun launch")
    p.add_argument("--cpu-smoke", action="store_true")
    a = p.parse_args()
    if a.cpu_smoke:
        cfg = dict(qwen3_moe_config(2), hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, vocab_size=1024)
        r = bench_megatune(cfg, tp=1, seq=32, mbs=2, steps_n=2, warmup=1, profile=False)
        print(fmt(r), r["losses"])
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    date, gpu, n_gpu = time.strftime("%Y-%m-%d"), torch.cuda.get_device_name(0), torch.cuda.device_count()
    print(f"[bench] {date} {gpu} x{n_gpu} torch {torch.__version__} Qwen3-30B-A3B shape, {a.layers} layers "
          f"(EP2: {a.ep2_layers}), S={a.seq} mbs={a.mbs} accum={a.accum} steps={a.steps} warmup={a.warmup}", flush=True)
    cfg = qwen3_moe_config(a.layers)
    rows: list[dict] = []
    for variant in [v for v in a.hf.split(",") if v]:
        try:
            rows.append(bench_hf_moe(cfg, variant, seq=a.seq, mbs=a.mbs, steps=a.steps, warmup=a.warmup,
                                     accum=a.accum))
            print("[bench] " + fmt(rows[-1]), flush=True)
        except Exception as e:  # noqa: BLE001 - an HF variant that cannot run (OOM, unsupported kernel) is reported
            print(f"[bench] HF {variant}: failed at {a.layers} layers: {type(e).__name__}: {str(e)[:300]}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    hf_rows = list(rows)
    spec = {"cfg": cfg, "tp": 1, "seq": a.seq, "mbs": a.mbs, "steps": a.steps, "warmup": a.warmup,
            # moe_dispatch's dispatcher (no host sync) at 1 and --accum micro-batches, then megatron-core's at
            # --accum, each profiled. megatron-core's goes last: a model that ran it is never freed (its dispatcher
            # keeps `probs`, a tensor of the last micro-batch's autograd graph, whose DDP hooks refer back to the model: a
            # cycle through C++ that gc cannot break), so a later variant in the same process would start with
            # the earlier model's memory still allocated.
            "variants": [{"accum": n, "local_dispatch": True} for n in sorted({1, a.accum})]
            + [{"accum": a.accum, "local_dispatch": False}], "profile": "all"}
    one = launch(1, spec, out, "megatune_moe_1gpu", a.timeout)
    rows += one
    at_accum = [r for r in one if not r.get("error") and (a.accum == 1 or f"x{a.accum} accum" in r["name"])]
    one = sorted(at_accum, key=lambda r: r["tokens_per_s"])[-1:]  # the fastest at --accum (HF ran the same)
    ep2 = []
    if "ep2" in a.multi.split(",") and n_gpu >= 2:
        ep2_spec = dict(spec, cfg=qwen3_moe_config(a.ep2_layers), variants=[{"ep": 2, "accum": a.accum}])
        ep2 = launch(2, ep2_spec, out, "megatune_moe_ep2", a.timeout)
        rows += ep2
    (out / "bench_moe.json").write_text(json.dumps({"date": date, "gpu": gpu, "args": vars(a), "rows": rows},
                                                   indent=1))
    print_rows(rows)
    if one:
        m = one[0]
        if hf_rows:
            best = max(hf_rows, key=lambda r: r["tokens_per_s"])
            print(f"megatune / fastest HF ({best['name']}) tokens/s = {m['tokens_per_s'] / best['tokens_per_s']:.2f}x "
                  f"(target >= 2), MFU {100 * m['mfu']:.1f}% (target >= 30)")
        for r in ep2:
            print(f"EP2 on 2 GPUs ({a.ep2_layers} layers): MFU {100 * r['mfu']:.1f}% = "
                  f"{r['mfu'] / m['mfu']:.1%} of the 1-GPU MFU (target >= 85%)")
        print(f"first/last loss megatune {m['losses'][0]:.3f}/{m['losses'][-1]:.3f}")


if __name__ == "__main__":
    main()
