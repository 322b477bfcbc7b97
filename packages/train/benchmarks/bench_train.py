"""HF Trainer-style loop vs megatune's real training step, same shape, same GPU: tokens/s, MFU, peak memory.

    python packages/train/benchmarks/bench_train.py [--model qwen2-1.5b --seq 4096 --mbs 2] [--multi dp4,tp2]
    python packages/train/benchmarks/bench_train.py --seq 32768 --mbs 1 --recompute full --hf compile+ckpt  # long S
    python packages/train/benchmarks/bench_train.py --cpu-smoke      # tiny fp32 run of the megatune side on CPU

The peers run in the same process before megatune's launches (`--hf`, default `eager,compile`: HF's recipe eager and
compiled whole by torch.compile, hf_baseline.py); ratios are computed against the strongest peer of the run, and a
peer that runs out of memory is reported as OOM. `--recompute selective|full` sets megatron-core's activation
recompute for the megatune side (the HF side's counterpart is the `+ckpt` variants: gradient checkpointing).

The megatune side is what `megatune sft` runs per iteration: build_model (bf16 params, native spec), runtime's
wrap_model (Float16Module + megatron-core DDP) and optim.build_optimizer (fp32 main params, distributed optimizer,
fused AdamW, foreach clipping kernels), steps.make_forward_step + steps.train_step (forward_backward_func, per-token
loss, clip, step, LR schedule). Every megatune measurement runs under torchrun in a subprocess (nproc 1, 2 or 4), so
each gets a clean process group. `--multi dp4` adds data parallelism on 4 GPUs (scaling vs 4x the 1-GPU figure),
with overlap_grad_reduce off and on (runtime's default with DP); `tp2` the Qwen2-7B shape at TP2 + sequence
parallelism on 2 GPUs. `--ablate` adds megatron-core's stock optimizer fallbacks on 1 GPU (what fused AdamW and the
foreach kernels buy) and TP2 with 4 micro-batches per step. The first variant of each launch is also profiled for
2 steps with torch.profiler (top kernels by CUDA time).
MFU = tokens/s x (6N + 12 L h S) / (GPUs x 989 TFLOP/s), megatune.train.metrics.flops_per_token (as logging.jsonl), for both sides.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import fmt, print_curves, print_rows, profile_steps  # noqa: E402
from hf_baseline import H200_BF16_PEAK, HF_VARIANTS, bench_hf, flops_per_token, qwen2_config  # noqa: E402

SMOKE_CFG = dict(qwen2_config("qwen2-0.5b"), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)


def margs_for(*, bf16: bool, distributed: bool, gbs: int, lr: float = 1e-5):
    """The Megatron-LM arguments optim reads (as argmap.to_megatron would produce them)."""
    from megatune.argmap import MegatronArguments

    return MegatronArguments(
        bf16=bf16, fp16=False, use_distributed_optimizer=distributed, optimizer="adam", lr=lr, min_lr=0.0,
        weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0, global_batch_size=gbs,
        train_iters=10_000, lr_decay_style="constant", lr_warmup_iters=0, loss_scale=None)


def _shifted(tokens: torch.Tensor, device) -> dict:
    """[mbs, seq + 1] tokens -> the micro-batch dict steps.make_forward_step reads (inputs, next-token labels)."""
    mbs, seq = tokens.shape[0], tokens.shape[1] - 1
    return {"tokens": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device),
            "loss_mask": torch.ones(mbs, seq, device=device), "position_ids": torch.arange(seq).expand(mbs, seq).to(device)}


def microbatch(vocab: int, mbs: int, seq: int, seed: int, device) -> dict:
    return _shifted(torch.randint(0, vocab, (mbs, seq + 1), generator=torch.Generator().manual_seed(seed)), device)


def learnable_microbatch(vocab: int, mbs: int, seq: int, seed: int, device) -> dict:
    """Sequences a model can learn, for loss-curve comparisons (`--curve`): random picks from a fixed dictionary of
    512 random 16-token phrases (the same dictionary for every batch), so the loss falls from ln(vocab) towards
    ln(512) / 16 per token as the phrases are memorised."""
    phrases = torch.randint(0, vocab, (512, 16), generator=torch.Generator().manual_seed(1234))
    picks = torch.randint(0, 512, (mbs, (seq + 1) // 16 + 1), generator=torch.Generator().manual_seed(seed))
    return _shifted(phrases[picks].reshape(mbs, -1)[:, :seq + 1], device)


def stock_optimizer(optimizer) -> None:
    """Undo optim.build_optimizer's kernel choices: megatron-core's own fallbacks without TE/apex (torch AdamW with
    foreach kernels, per-tensor Python L2 norm / scale). For the ablation row only."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mc_optimizer

    for g in optimizer.param_groups:
        if "fused" in g:
            g["fused"], g["foreach"] = False, True
    clip_grads.l2_norm_impl = utils.local_multi_tensor_l2_norm
    clip_grads.multi_tensor_scale_impl = mc_optimizer.multi_tensor_scale_impl = utils.local_multi_tensor_scale


# megatron-core + TE as Megatron-LM's pretrain_gpt runs it without apex (`--transformer-impl transformer_engine`
# with its fusion flags on; gradient-accumulation fusion needs apex for the output layer, so it stays off there)
MCORE_TE_FUSIONS = {"apply_rope_fusion": True, "bias_activation_fusion": True, "cross_entropy_loss_fusion": True,
                    "cross_entropy_fusion_impl": "te"}


def te_wgrad_into_main_grad(model_chunks) -> int:
    """Let every TE linear's weight-gradient GEMM accumulate into megatron-core DDP's fp32 main_grad (TE's
    fuse_wgrad_accumulation: no bf16 wgrad + `add_`). For the variant that measures it; returns how many modules."""
    import transformer_engine.pytorch as te

    n = 0
    for chunk in model_chunks:
        for m in chunk.modules():
            if isinstance(m, (te.Linear, te.LayerNormLinear, te.LayerNormMLP)) and hasattr(m, "fuse_wgrad_accumulation"):
                m.fuse_wgrad_accumulation = True
                n += 1
    return n


def bench_megatune(cfg: dict, *, tp: int, seq: int, mbs: int, steps_n: int, warmup: int, profile: bool,
                   overlap: bool | None = None, stock: bool = False, accum: int = 1, ep: int = 1,
                   recompute: str | None = None, spec: str | None = None, recipe: str = "megatune",
                   fp8: str | None = None, wgrad_fusion: bool = False, te_fusions: bool | None = None,
                   learnable: bool = False, lr: float = 1e-5, local_dispatch: bool | None = None) -> dict:
    """megatune's real training step: `accum` micro-batches of `mbs` sequences per DP rank and optimizer step.
    overlap: the device policy's overlap_grad_reduce (None = its default); stock: stock_optimizer(); recompute:
    megatron-core's recompute_granularity (None, 'selective', 'full'); spec: the layer spec ('native' | 'te',
    None = the policy's); recipe 'mcore-te': the megatron-core + TE peer (TE spec with MCORE_TE_FUSIONS, megatron-
    core's own optimizer and loss, none of megatune's kernels); fp8: TE FP8 recipe ('tensorwise', 'delayed', ...,
    hybrid format, TE spec); wgrad_fusion: te_wgrad_into_main_grad; te_fusions: False builds the TE spec without
    the fused RoPE / SwiGLU that build_model gives it (what it ran before they were added); learnable:
    learnable_microbatch data (loss curves), at learning rate `lr`; local_dispatch: an MoE cfg's layers dispatch
    through moe_dispatch.LocalTokenDispatcher (True) or megatron-core's dispatcher (False); None = build_model's
    default (MoESettings.local_dispatch)."""
    import dataclasses

    from megatron.core import parallel_state as ps
    from megatune.train import optim, runtime, steps
    from megatune.train.distributed import init_distributed
    from megatune.train.model import build_model
    from megatune.train.policy import Fp8, Machine, Request, install, resolve_policy

    gpu = torch.cuda.is_available()
    peer = recipe == "mcore-te"
    if peer or fp8 or wgrad_fusion or te_fusions is not None:
        spec = "te"
    dist = init_distributed(tp, 1, ep=ep, seed=0)  # ep > 1: an MoE cfg's experts over ep ranks (bench_moe.py)
    # the policy `megatune sft --transformer_impl SPEC [--fp8_format hybrid --fp8_recipe FP8]` resolves, installed
    # for build_model as the sft runtime installs it
    policy = resolve_policy(Request(precision="bf16" if gpu else "fp32", distributed_optimizer=gpu,
                                    transformer_impl=spec or "native", fp8=Fp8("hybrid", fp8) if fp8 else None),
                            Machine.detect(), dist.dp)
    if overlap is not None:
        policy = dataclasses.replace(policy, overlap_grad_reduce=overlap)
    install(policy)
    overrides = dict(MCORE_TE_FUSIONS) if peer else {}
    if te_fusions is False:
        overrides.update(apply_rope_fusion=False, bias_activation_fusion=False)
    if local_dispatch is not None:
        from megatune.train.moe import MoESettings

        overrides["moe"] = MoESettings(ep=ep, local_dispatch=local_dispatch)
    chunks = build_model(cfg, tp=tp, pp=1, params_dtype=torch.bfloat16 if gpu else torch.float32,
                         sequence_parallel=tp > 1, seq_length=seq, recompute_granularity=recompute, **overrides)
    if peer:
        for c in chunks:
            c.megatune_fused_loss = False  # GPTModel's own loss (cross_entropy_loss_fusion, TE's kernel)
    gbs = mbs * dist.dp * accum
    margs = margs_for(bf16=gpu, distributed=gpu, gbs=gbs, lr=lr)
    model = runtime.wrap_model(chunks, policy)
    if wgrad_fusion:
        print(f"[bench] wgrad into main_grad: {te_wgrad_into_main_grad(chunks)} TE modules", flush=True)
    if peer:
        from megatron.core.optimizer import get_megatron_optimizer

        optimizer = get_megatron_optimizer(optim.optimizer_config(margs, policy), model)  # TE FusedAdam
    else:
        optimizer = optim.build_optimizer(model, margs, policy)
    scheduler = optim.build_scheduler(optimizer, margs)
    forward_step = steps.make_forward_step(lambda batch: {"attention_mask": None})
    if stock:
        stock_optimizer(optimizer)
    ddp_overlap = bool(model[0].ddp_config.overlap_grad_reduce)
    # fresh random tokens every step, as the HF side: a falling loss here would mean leakage, not learning
    make = learnable_microbatch if learnable else microbatch
    batches = [[make(cfg["vocab_size"], mbs, seq, 1000 * i + 10 * j + ps.get_data_parallel_rank(), dist.device)
                for j in range(accum)] for i in range(warmup + steps_n + 2)]
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    losses = []
    live = {"model": model, "optimizer": optimizer, "scheduler": scheduler}

    def step(i):
        out = steps.train_step(live["model"], live["optimizer"], live["scheduler"], batches[i % len(batches)],
                               forward_step, increment=gbs, device=dist.device)
        losses.append(out["loss"])

    for i in range(warmup):
        step(i)
    if gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps_n):
        step(i)
    if gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tps = steps_n * gbs * seq / seconds
    gpus = dist.world_size
    kind = {"mcore-te": "megatron-core + TE"}.get(recipe, "megatune" + (f" {spec}" if spec else ""))
    name = (kind + (f" fp8 {fp8}" if fp8 else "") + (" wgrad->main_grad" if wgrad_fusion else "")
            + (" unfused rope/swiglu" if te_fusions is False else "")
            + {True: " local dispatch", False: " mcore dispatch"}.get(local_dispatch, "")
            + f" tp{tp} dp{dist.dp}" + (f" ep{ep}" if ep > 1 else "") + f" mbs{mbs}"
            + (f" x{accum} accum" if accum > 1 else "")
            + ((" overlap" if ddp_overlap else " no-overlap") if dist.dp > 1 else "")
            + (" stock optimizer" if stock else "") + (f" recompute {recompute}" if recompute else ""))
    result = {"name": name, "peer": peer, "gpus": gpus, "tokens_per_s": tps,
              "mfu": tps * flops_per_token(cfg, seq) / (gpus * H200_BF16_PEAK),
              "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0, "losses": losses,
              "step_s": seconds / steps_n}
    if profile and gpu:
        result.update(profile_steps(lambda: [step(warmup + steps_n + i) for i in range(2)], result["step_s"]))
    live.clear()
    del model, optimizer, scheduler, chunks
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return result


def worker(spec: dict) -> None:
    """One torchrun rank: run the requested megatune variants, rank 0 writes the results to spec['out']."""
    from megatune.train.distributed import destroy

    results = []
    for i, variant in enumerate(spec["variants"]):
        try:
            results.append(bench_megatune(spec["cfg"], tp=spec["tp"], seq=spec["seq"], mbs=spec["mbs"],
                                          steps_n=spec["steps"], warmup=spec["warmup"],
                                          profile=spec["profile"] == "all" or (spec["profile"] and i == 0),
                                          **variant))
        except Exception as e:  # noqa: BLE001 - one failing variant (OOM, a missing kernel) must not lose the rest
            import traceback

            traceback.print_exc()
            results.append({"name": f"{variant}", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            destroy()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if int(os.environ.get("RANK", "0")) == 0:  # after each variant: a later crash keeps the earlier rows
            Path(spec["out"]).write_text(json.dumps(results))
    destroy()


def launch(n: int, spec: dict, out_dir: Path, name: str, timeout: int) -> list[dict]:
    spec = dict(spec, out=str(Path(tempfile.mkdtemp()) / f"{name}.json"))  # $OUT keeps logs only
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
           "--worker", json.dumps(spec)]
    print(f"[bench] {name}: torchrun --nproc_per_node={n}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except subprocess.TimeoutExpired as e:
        (out_dir / f"{name}.log").write_text(e.output or "" if isinstance(e.output, str) else "")
        print(f"[bench] {name}: timed out after {timeout}s", flush=True)
        return []
    (out_dir / f"{name}.log").write_text(proc.stdout)
    if proc.returncode != 0:
        print(f"[bench] {name}: FAILED rc={proc.returncode}\n" + proc.stdout[-4000:], flush=True)
        return []
    print(f"[bench] {name}: done in {time.perf_counter() - t0:.0f}s", flush=True)
    return json.loads(Path(spec["out"]).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2-1.5b")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--multi", default="", help="comma list of dpN (N GPUs), tp2 (Qwen2-7B shape)")
    p.add_argument("--hf", default="eager,compile",
                   help=f"comma list of HF peers run in the same process: {', '.join(HF_VARIANTS)}; '' for none")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none",
                   help="megatron-core activation recompute on the megatune side (long sequences)")
    p.add_argument("--impl", default="native",
                   help="comma list of megatune layer specs to run (native, te: --transformer_impl); with te also "
                        "te-unfused (the TE spec without fused RoPE/SwiGLU) and te-wgrad (TE's wgrad GEMM "
                        "accumulating into the fp32 main_grad)")
    p.add_argument("--mcore-te", choices=["auto", "on", "off"], default="auto",
                   help="the megatron-core + TE peer (auto: when transformer_engine is importable)")
    p.add_argument("--fp8", default="", help="comma list of TE FP8 recipes (tensorwise, delayed, blockwise) to run "
                                              "beside bf16, hybrid format, TE spec")
    p.add_argument("--layers", type=int, default=0,
                   help="build only this many decoder layers of --model (a 7B shape on one GPU: same GEMMs per layer)")
    p.add_argument("--curve", type=int, default=0,
                   help="loss curves instead of speed: this many steps of learnable_microbatch data at lr 1e-4 for "
                        "every variant (no HF peers, no profile); prints each curve's distance to the first variant's")
    p.add_argument("--profile", choices=["first", "all", "none"], default="first",
                   help="torch.profiler top kernels for the first variant of each launch, every variant, or none")
    p.add_argument("--ablate", action="store_true",
                   help="also run the 1-GPU megatune step with megatron-core's stock optimizer fallbacks, and the "
                        "TP2 shape with 4-micro-batch gradient accumulation")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--timeout", type=int, default=240, help="seconds per torchrun launch")
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))
    if a.cpu_smoke:
        r = bench_megatune(SMOKE_CFG, tp=1, seq=32, mbs=2, steps_n=2, warmup=1, profile=False, accum=2)
        print(fmt(r), r["losses"])
        return None
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = qwen2_config(a.model)
    if a.layers:
        cfg["num_hidden_layers"] = a.layers
    impls = {"native": {}, "te": {"spec": "te"}, "te-unfused": {"te_fusions": False},
             "te-wgrad": {"wgrad_fusion": True}}
    unknown = [i for i in a.impl.split(",") if i and i not in impls]
    if unknown:
        p.error(f"--impl {','.join(unknown)}: not one of {', '.join(impls)}")
    variants = [impls[i] for i in a.impl.split(",") if i]
    if a.ablate:
        variants.append({"stock": True})
    te_present = importlib.util.find_spec("transformer_engine") is not None
    if a.mcore_te == "on" or (a.mcore_te == "auto" and te_present):
        variants.append({"recipe": "mcore-te"})
    variants += [{"fp8": r} for r in a.fp8.split(",") if r]
    spec = {"cfg": cfg, "tp": 1, "seq": a.seq, "mbs": a.mbs, "steps": a.steps, "warmup": a.warmup,
            "variants": variants, "profile": {"first": True, "all": "all", "none": False}[a.profile]}
    if a.curve:
        spec.update(steps=a.curve, warmup=0, profile=False,
                    variants=[dict(v, learnable=True, lr=1e-4) for v in variants if "recipe" not in v])
        a.hf = ""
    if a.recompute != "none":
        spec["variants"] = [dict(v, recompute=a.recompute) for v in spec["variants"]]
    date = time.strftime("%Y-%m-%d")
    gpu = torch.cuda.get_device_name(0)
    print(f"[bench] {date} {gpu} x{torch.cuda.device_count()} torch {torch.__version__} model {a.model} "
          f"S={a.seq} mbs={a.mbs} steps={a.steps} warmup={a.warmup} layers={cfg['num_hidden_layers']} "
          f"TE {'present' if te_present else 'absent'}", flush=True)
    rows = []
    peers = []
    for variant in [v for v in a.hf.split(",") if v]:
        peers.append(bench_hf(cfg, seq_len=a.seq, micro_batch=a.mbs, steps=a.steps, warmup=a.warmup, variant=variant))
        print("[bench] " + fmt(peers[-1]), flush=True)
    rows += peers
    one = launch(1, spec, out, "megatune_1gpu", a.timeout)
    rows += one
    peers += [r for r in one if r.get("peer")]  # megatron-core + TE, run beside megatune's variants
    hf = max((r for r in peers if not r.get("oom")), key=lambda r: r["tokens_per_s"], default=None)
    one = [r for r in one if not r.get("error") and not r.get("peer")]
    multi = [m for m in a.multi.split(",") if m]
    if "tp2" in multi and torch.cuda.device_count() >= 2:
        cfg7 = qwen2_config("qwen2-7b")
        variants = [{}, {"accum": 4}] if a.ablate else [{}]
        rows += launch(2, dict(spec, cfg=cfg7, tp=2, variants=variants), out, "megatune_tp2_qwen2-7b", a.timeout)
    dp, ndp = [], max([int(m[2:]) for m in multi if m.startswith("dp")] or [0])
    if ndp and torch.cuda.device_count() >= ndp:
        dp = launch(ndp, dict(spec, variants=[{"overlap": False}, {"overlap": True}], profile=False), out,
                    f"megatune_dp{ndp}", a.timeout)
        rows += dp
    (out / "bench_train.json").write_text(json.dumps({"date": date, "gpu": gpu, "args": vars(a), "rows": rows},
                                                     indent=1))
    print_rows(rows)
    for m in one if hf else []:
        print(f"{m['name']} / strongest peer ({hf['name']}): tokens/s {m['tokens_per_s'] / hf['tokens_per_s']:.2f}x "
              f"(target >= 1.2), MFU {100 * m['mfu']:.1f}% (target >= 50), memory {m['peak_mem_gb']:.1f} vs "
              f"{hf['peak_mem_gb']:.1f} GB; first/last loss {m['losses'][0]:.3f}/{m['losses'][-1]:.3f} "
              f"(peer {hf['losses'][0]:.3f}/{hf['losses'][-1]:.3f})")
    if a.curve and one:
        print_curves(one)
    for r in dp:
        if one:
            print(f"DP{ndp} scaling ({r['name']}): {r['tokens_per_s'] / (ndp * one[0]['tokens_per_s']):.1%} of "
                  f"linear (target >= 90%)")
    return None


if __name__ == "__main__":
    main()
