"""Throughput numbers for logging.jsonl: tokens/s, model FLOPs utilisation (MFU), memory.

MFU = achieved model FLOPs / device peak, with training FLOPs per token = 6N + 12·L·h·S (N matmul parameters counted
from the model's family row, for MoE the top-k routed experts only; L layers,
h hidden size, S sequence length; the second term is attention's QK^T and AV, forward + backward, PaLM appendix B).
The peak is the dense bf16/fp16 tensor-core figure of the GPU model (fp32 runs use the TF32 figure). On CPU there is
no meaningful peak, so `mfu` is null there and `tflops` (achieved, per process) is still reported.
"""

from __future__ import annotations

import math
import resource
import sys
from typing import Any

import torch
from megatune.convert.families import FAMILIES, Shape, shape_of
from megatune.convert.plan import stage_entries

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


def _shape(hf_config: dict) -> Shape:
    """The family row's view of an HF config; a config naming no architecture is read by its model_type (Llama
    when that names none either)."""
    if not hf_config.get("architectures"):
        fam = next((f for f in FAMILIES.values() if f.model_type == hf_config.get("model_type")),
                   FAMILIES["LlamaForCausalLM"])
        hf_config = {**hf_config, "architectures": [fam.hf_class]}
    return shape_of(hf_config)


def count_parameters(hf_config: dict, *, active: bool = False) -> int:
    """Parameters of the model from its family row (embeddings and output layer included). active=True counts, of
    the routed experts, only the top-k that each token passes through."""
    shape = _shape(hf_config)
    dense = experts = 0
    for e in stage_entries(shape, [shape.layers], 0):
        n = sum(math.prod(d) for d in e.hf_shapes)
        if e.param.expert:
            experts += n
        else:
            dense += n
    return dense + (experts * shape.topk // shape.experts if active and shape.experts else experts)


def matmul_parameters(hf_config: dict) -> int:
    """N of the FLOPs formula: parameters that take part in a matmul per token (for MoE: the top-k experts only).
    The input embedding is a lookup, so an untied model's embedding does not count; the output projection (tied or
    not) does, as in Megatron-LM."""
    shape = _shape(hf_config)
    lookup = 0 if shape.tied else shape.vocab * shape.hidden
    return count_parameters(hf_config, active=True) - lookup


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
