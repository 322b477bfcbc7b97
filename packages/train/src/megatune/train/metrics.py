"""Throughput numbers for logging.jsonl: tokens/s, model FLOPs utilisation (MFU), memory.

MFU = achieved model FLOPs / device peak, with training FLOPs per token = 6N + 12·L·h·S (N matmul parameters, L layers,
h hidden size, S sequence length; the second term is attention's QK^T and AV, forward + backward, PaLM appendix B).
The peak is the dense bf16/fp16 tensor-core figure of the GPU model (fp32 runs use the TF32 figure). On CPU there is
no meaningful peak, so `mfu` is null there and `tflops` (achieved, per process) is still reported.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch

# dense (no sparsity) peak TFLOP/s per device: (bf16/fp16, tf32)
_PEAK_TFLOPS = {
    "H200": (989.4, 494.7),
    "H100": (989.4, 494.7),  # SXM; PCIe is lower (756) — matched below by name
    "H100 PCIE": (756.0, 378.0),
    "H800": (989.4, 494.7),
    "H20": (148.0, 74.0),
    "A100": (312.0, 156.0),
    "A800": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "A10": (125.0, 62.5),
    "V100": (125.0, 15.7),
}


def count_parameters(hf_config: dict) -> int:
    """Parameters of a Llama-style decoder from its HF config (embeddings and output layer included)."""
    h = int(hf_config["hidden_size"])
    layers = int(hf_config["num_hidden_layers"])
    heads = int(hf_config["num_attention_heads"])
    kv = int(hf_config.get("num_key_value_heads") or heads)
    head_dim = int(hf_config.get("head_dim") or h // heads)
    ffn = int(hf_config["intermediate_size"])
    vocab = int(hf_config["vocab_size"])
    qkv = h * (heads + 2 * kv) * head_dim
    if hf_config.get("attention_bias") or hf_config.get("model_type") == "qwen2":
        qkv += (heads + 2 * kv) * head_dim
    per_layer = qkv + heads * head_dim * h + 3 * h * ffn + 2 * h
    if hf_config.get("model_type") == "qwen3":  # q/k RMSNorm
        per_layer += 2 * head_dim
    embeddings = vocab * h * (1 if hf_config.get("tie_word_embeddings") else 2)
    return layers * per_layer + embeddings + h


def matmul_parameters(hf_config: dict) -> int:
    """N of the FLOPs formula: parameters that take part in a matmul per token. The input embedding is a lookup,
    so an untied model's embedding does not count; the output projection (tied or not) does, as in Megatron-LM."""
    lookup = 0 if hf_config.get("tie_word_embeddings") else int(hf_config["vocab_size"]) * int(hf_config["hidden_size"])
    return count_parameters(hf_config) - lookup


def flops_per_token(hf_config: dict, seq_length: int) -> float:
    """Training FLOPs per token: 6N + 12·L·h·S, N = matmul_parameters."""
    n = matmul_parameters(hf_config)
    return 6.0 * n + 12.0 * int(hf_config["num_hidden_layers"]) * int(hf_config["hidden_size"]) * seq_length


def device_peak_flops(dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of this process's GPU for `dtype`, or None (CPU, unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().upper()
    best = None
    for key, value in _PEAK_TFLOPS.items():
        if key in name and (best is None or len(key) > len(best[0])):  # longest match: "H100 PCIE" over "H100"
            best = (key, value)
    if best is None:
        return None
    half, tf32 = best[1]
    return (half if dtype in (torch.bfloat16, torch.float16) else tf32) * 1e12


def memory_gib() -> float:
    """Peak memory of this process in GiB: CUDA max allocated on GPU, max RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def throughput(*, tokens: int, seconds: float, world_size: int, flops_token: float,
               peak: float | None) -> dict[str, Any]:
    """tokens/s for the whole job, achieved TFLOP/s per process, and MFU (None without a known peak)."""
    seconds = max(seconds, 1e-9)
    tps = tokens / seconds
    per_device = tps * flops_token / max(world_size, 1)
    return {
        "tokens_per_sec": round(tps, 2),
        "tflops": round(per_device / 1e12, 6),
        "mfu": None if peak is None else round(per_device / peak, 6),
    }
