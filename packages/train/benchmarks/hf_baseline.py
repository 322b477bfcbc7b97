"""The baseline users run today: a HF transformers causal LM trained the way HF Trainer does on one GPU.

fp32 master weights with bf16 autocast, SDPA attention, fused AdamW: the same recipe as
`Trainer(bf16=True, optim="adamw_torch_fused")`, optionally with `torch_compile=True` (the model compiled whole by
torch.compile, default inductor backend: HF's strongest configuration on the Qwen2-1.5B shape) and
`gradient_checkpointing=True` (non-reentrant, for long sequences). Random weights and random tokens of a fixed
shape so both sides of the comparison do exactly the same arithmetic.
"""

from __future__ import annotations

import gc
import time

import torch
from megatune.train.metrics import flops_per_token  # the same 6N + 12·L·h·S that logging.jsonl reports

H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s, vendor datasheet; MFU is reported against this figure


def qwen2_config(name: str) -> dict:
    """Qwen2 shapes from the public config.json files (vocab 151936)."""
    shapes = {
        "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                           num_key_value_heads=2, tie_word_embeddings=True),
        "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, tie_word_embeddings=False),
        "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, tie_word_embeddings=True),
    }
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
            "hidden_act": "silu", **shapes[name]}


def time_steps(forward, params: list, *, vocab: int, seq: int, mbs: int, steps: int, warmup: int, autocast: bool,
               lr: float, accum: int = 1, **model_kwargs) -> dict:
    """HF Trainer's step on fresh random tokens, `warmup` untimed steps then `steps` timed ones: `accum`
    micro-batches of `mbs` sequences each forward with labels (under bf16 autocast when `autocast`) and backward
    (loss / accum, as Trainer's gradient_accumulation_steps), then clip to 1.0, AdamW (fused on GPU), zero_grad.
    `params`: what the optimizer updates (the trainable ones). Returns {"tokens_per_s", "losses"} (mean loss of
    each step's micro-batches)."""
    device = params[0].device
    gpu = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1, fused=gpu)
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, vocab, (steps + warmup, accum, mbs, seq), device=device, generator=gen)
    losses, start = [], time.perf_counter()
    for i in range(steps + warmup):
        if i == warmup:
            if gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
        step_loss = 0.0
        for micro in tokens[i]:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = forward(input_ids=micro, labels=micro, **model_kwargs).loss / accum
            loss.backward()
            step_loss += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(step_loss))
    if gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del opt
    return {"tokens_per_s": steps * accum * mbs * seq / seconds, "losses": losses}


HF_VARIANTS = {"eager": "HF eager", "compile": "HF + torch.compile", "eager+ckpt": "HF eager + grad ckpt",
               "compile+ckpt": "HF + torch.compile + grad ckpt"}


def bench_hf(cfg: dict, *, seq_len: int, micro_batch: int, steps: int, warmup: int, variant: str = "eager") -> dict:
    """variant: eager | compile (torch.compile of the whole model), +ckpt adds gradient checkpointing. A variant that
    runs out of GPU memory is returned as a row with "oom": True (tokens/s 0)."""
    if variant not in HF_VARIANTS:
        raise SystemExit(f"hf_baseline: error: HF variant {variant!r}: use one of {', '.join(HF_VARIANTS)}")
    name = HF_VARIANTS[variant]
    try:
        return _bench_hf(cfg, seq_len=seq_len, micro_batch=micro_batch, steps=steps, warmup=warmup, name=name,
                         compiled=variant.startswith("compile"), checkpointing=variant.endswith("+ckpt"))
    except torch.OutOfMemoryError:
        pass
    torch._dynamo.reset()
    gc.collect()  # the failed attempt's tensors, freed with its traceback
    torch.cuda.empty_cache()
    return {"name": name, "oom": True, "tokens_per_s": 0.0, "mfu": 0.0,
            "peak_mem_gb": torch.cuda.get_device_properties(0).total_memory / 2**30, "losses": []}


def _bench_hf(cfg: dict, *, seq_len: int, micro_batch: int, steps: int, warmup: int, name: str, compiled: bool,
              checkpointing: bool) -> dict:
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).cuda()
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    forward = torch.compile(model) if compiled else model  # the first (warm-up) steps pay for compilation
    torch.cuda.reset_peak_memory_stats()
    timed = time_steps(forward, list(model.parameters()), vocab=cfg["vocab_size"], seq=seq_len, mbs=micro_batch,
                       steps=steps, warmup=warmup, autocast=True, lr=1e-5)
    tps = timed["tokens_per_s"]
    result = {
        "name": name,
        "tokens_per_s": tps,
        "mfu": tps * flops_per_token(cfg, seq_len) / H200_BF16_PEAK,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
        "losses": timed["losses"],
    }
    del forward, model
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return result
