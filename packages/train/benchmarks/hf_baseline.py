"""The baseline users run today: a HF transformers causal LM trained the way HF Trainer does on one GPU.

fp32 master weights with bf16 autocast, SDPA attention, fused AdamW, no gradient checkpointing: the same
recipe as `Trainer(bf16=True, optim="adamw_torch_fused")`. Random weights and random tokens of a fixed shape
so both sides of the comparison do exactly the same arithmetic.
"""

from __future__ import annotations

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


def bench_hf(cfg: dict, *, seq_len: int, micro_batch: int, steps: int, warmup: int) -> dict:
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).cuda()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, cfg["vocab_size"], (steps + warmup, micro_batch, seq_len), device="cuda", generator=gen)
    torch.cuda.reset_peak_memory_stats()
    losses = []
    for i in range(steps + warmup):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens[i], labels=tokens[i]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tps = steps * micro_batch * seq_len / seconds
    result = {
        "name": "HF transformers (fp32 master, bf16 autocast, SDPA, fused AdamW)",
        "tokens_per_s": tps,
        "mfu": tps * flops_per_token(cfg, seq_len) / H200_BF16_PEAK,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
        "losses": losses,
    }
    del model, opt
    torch.cuda.empty_cache()
    return result
