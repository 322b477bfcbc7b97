"""The device policy: every CPU-vs-GPU, precision and kernel choice of a run, decided once, in one place.

`resolve_policy(request, machine, dp)` is a pure function of what the arguments ask for (`Request.from_args(sft)`),
the machine and the data-parallel size, so the production choices are unit-testable on a CPU box
(`Machine(cuda=True, gpus=2)`). Modules read the installed
policy (`active()`), or take one as an argument; none of them passes a `cpu=` flag around.

The choices, and why (figures in BENCHMARKS.md, "Training (GPU)"):
- GPU: NCCL; bf16 (swift's AUTO) or fp16 with fp32 master weights; megatron-core's distributed optimizer when asked
  (the default); the gradient reduce(-scatter) overlapped with the backward pass when DP > 1 (Megatron-LM's
  `--overlap-grad-reduce`); torch's fused AdamW kernel (+16% step rate over megatron-core's fallbacks without
  TE/apex); compiled RMSNorm/RoPE/SwiGLU; the vocab-parallel cross entropy of fused.py (no fp32 logits copy).
- CPU (tier-2 tests, CUDA-less machines): gloo with cpu_mode's patches; fp32 only (megatron-core's bf16/fp16
  optimizer wrappers and its distributed optimizer check CUDA tensor types; gloo has no reduce_scatter), each
  fallback reported once in `notes`; eager kernels (the same arithmetic as the compiled ones); CPU initialisation.
- Layer spec: `native` unless `--transformer_impl te` asks for Transformer Engine. Chosen by measurement, not by
  importability: on an H200 the native spec measured faster than megatron-core's local spec (13.8k -> 41k tokens/s)
  and as fast as TE's (38.8k vs 39.2k, same run, TE 2.20) while it also runs packed rows, LoRA and MoE. `te` is
  refused where it cannot work (no CUDA, not installed, packed rows); FP8 (`--fp8_format`) needs it.
- Attention (`--use_flash_attn`): unset = SDPA with cuDNN's kernel first, then flash, memory-efficient, math (torch's
  own pick turned to its flash kernel, 1.8x slower in the backward pass, once TE was imported); true = flash only;
  false = no flash kernels (memory-efficient or math SDPA). Packed rows use flex_attention on GPU unless flash is
  switched off; flex needs one static length, hence `fixed_packed_length`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Literal

import torch
from megatune.train.errors import TrainError

Precision = Literal["bf16", "fp16", "fp32"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Machine:
    """What the policy needs to know about this host."""

    cuda: bool
    gpus: int = 0

    @classmethod
    def detect(cls) -> Machine:
        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, gpus=torch.cuda.device_count() if cuda else 0)


@dataclasses.dataclass(frozen=True)
class Fp8:
    """FP8 training through Transformer Engine (Megatron-LM's --fp8-format / --fp8-recipe / --fp8-amax-*)."""

    format: Literal["e4m3", "hybrid"] = "hybrid"
    recipe: str = "delayed"
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"

    def transformer_fields(self) -> dict:
        """megatron-core TransformerConfig fields (its TE layers then run their GEMMs in FP8)."""
        return {"fp8": self.format, "fp8_recipe": self.recipe, "fp8_amax_history_len": self.amax_history_len,
                "fp8_amax_compute_algo": self.amax_compute_algo}


@dataclasses.dataclass(frozen=True)
class DevicePolicy:
    device_type: Literal["cuda", "cpu"]
    backend: Literal["nccl", "gloo"]
    precision: Precision
    distributed_optimizer: bool
    overlap_grad_reduce: bool
    fused_adamw: bool
    layer_spec: Literal["native", "te"]
    attention: Literal["auto", "flash", "no_flash"]
    fused_loss: bool
    compiled_kernels: bool
    cpu_init: bool
    fp8: Fp8 | None = None  # FP8 GEMMs (TE spec only); batches then pad to a multiple of 16 tokens
    notes: tuple[str, ...] = ()  # fallbacks the user should hear about (printed once, by rank 0)

    @property
    def params_dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    @property
    def device(self) -> torch.device:
        """cuda:<current> (after init_distributed set it) or cpu."""
        if self.device_type == "cpu":
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())

    @property
    def flex_documents(self) -> bool:
        """Packed rows' document masks through flex_attention (block-sparse, compiled) instead of a bool mask."""
        return self.device_type == "cuda" and self.layer_spec == "native" and self.attention != "no_flash"

    @property
    def fixed_packed_length(self) -> bool:
        """flex_attention is compiled for static shapes: every packed batch gets one length."""
        return self.flex_documents

    def attention_kernels(self):
        """Context manager choosing SDPA's kernels: 'auto' = cuDNN's first on GPU, torch's own choice on CPU."""
        if self.attention == "auto" and self.device_type == "cpu":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if self.attention == "auto":  # cuDNN first: torch's own pick turned to its slower flash kernel once TE loaded
            return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                SDPBackend.MATH], set_priority=True)
        if self.attention == "flash":
            return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION])
        return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@dataclasses.dataclass(frozen=True)
class Request:
    """What the arguments ask of the device (swift's defaults)."""

    precision: Precision = "bf16"
    distributed_optimizer: bool = True
    use_flash_attn: bool | None = None
    transformer_impl: Literal["native", "te"] = "native"
    packing: bool = False
    adam: bool = True
    fp8: Fp8 | None = None

    @classmethod
    def from_args(cls, sft) -> Request:
        """From SftArguments (precision already resolved from --dtype/--bf16/--fp16 by argmap)."""
        fp8 = None if sft.fp8_format is None else Fp8(sft.fp8_format, sft.fp8_recipe, sft.fp8_amax_history_len,
                                                       sft.fp8_amax_compute_algo)
        return cls(precision="fp16" if sft.fp16 else "bf16" if sft.bf16 else "fp32",
                   distributed_optimizer=bool(sft.use_distributed_optimizer), use_flash_attn=sft.use_flash_attn,
                   transformer_impl=sft.transformer_impl, packing=bool(sft.packing), adam=sft.optim != "sgd", fp8=fp8)


def te_import_error() -> str | None:
    """Why `import transformer_engine` fails here, in one line (None when it imports). A broken install (missing
    torch extension, wrong CUDA) counts as absent, and the error says which it is."""
    try:
        import transformer_engine  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure to import is reported, never raised
        return " ".join(f"{type(e).__name__}: {e}".split())[:300]
    return None


def _te_importable() -> bool:
    return te_import_error() is None


def _layer_spec(req: Request, machine: Machine) -> str:
    if req.fp8 is not None and req.transformer_impl != "te":
        raise TrainError(f"--fp8_format {req.fp8.format}: FP8 runs through Transformer Engine's layers; add "
                         f"--transformer_impl te (TE installed, Hopper-or-newer GPU) or leave --fp8_format unset")
    if req.fp8 is not None and req.precision == "fp32":
        raise TrainError(f"--fp8_format {req.fp8.format} with fp32: FP8 needs bf16 or fp16 master precision; pass "
                         f"--dtype bf16 (the default) or --bf16 true")
    if req.transformer_impl != "te":
        return "native"
    if not machine.cuda:
        raise TrainError("--transformer_impl te: Transformer Engine needs a CUDA GPU; use --transformer_impl native "
                         "on this machine")
    if req.packing:
        raise TrainError("--transformer_impl te with --packing true: the TE spec has no document masks for packed "
                         "rows; use --transformer_impl native (the default) or --packing false")
    if req.use_flash_attn is not None:
        raise TrainError("--use_flash_attn selects the native spec's SDPA kernels; with --transformer_impl te leave it "
                         "unset and choose TE's backend with NVTE_FLASH_ATTN / NVTE_FUSED_ATTN")
    if not _te_importable():
        raise TrainError(f"--transformer_impl te: transformer_engine is not importable ({te_import_error()}); pip "
                         f"install transformer-engine[pytorch], or use --transformer_impl native (the default)")
    return "te"


def resolve_policy(req: Request, machine: Machine, dp: int) -> DevicePolicy:
    """The policy for `req` on `machine` with `dp` data-parallel ranks (TrainErrors for refusals)."""
    precision = req.precision
    spec = _layer_spec(req, machine)
    attention = {None: "auto", True: "flash", False: "no_flash"}[req.use_flash_attn]
    if machine.cuda:
        return DevicePolicy(
            device_type="cuda", backend="nccl", precision=precision, distributed_optimizer=req.distributed_optimizer,
            overlap_grad_reduce=dp > 1, fused_adamw=req.adam, layer_spec=spec, attention=attention, fused_loss=True,
            compiled_kernels=spec == "native", cpu_init=False, fp8=req.fp8)
    if attention == "flash":
        raise TrainError("--use_flash_attn true: flash attention kernels need a CUDA GPU; leave --use_flash_attn unset "
                         "(or false) on this machine")
    notes = []
    if precision != "fp32":
        notes.append(f"megatune sft: CPU mode trains in fp32 (megatron-core's {precision} optimizer needs CUDA); "
                     f"ignoring --{precision} true")
    if req.distributed_optimizer:
        notes.append("megatune sft: the distributed optimizer needs CUDA (reduce_scatter, CUDA tensors); CPU mode uses "
                     "the replicated optimizer instead (same results, more memory per rank)")
    return DevicePolicy(
        device_type="cpu", backend="gloo", precision="fp32", distributed_optimizer=False, overlap_grad_reduce=False,
        fused_adamw=False, layer_spec=spec, attention=attention, fused_loss=False, compiled_kernels=False,
        cpu_init=True, notes=tuple(notes))


def default_policy(machine: Machine | None = None) -> DevicePolicy:
    """The policy for code that builds models without a plan (tests, benchmarks): bf16 on GPU, fp32 on CPU,
    one data-parallel rank, the native spec."""
    machine = machine or Machine.detect()
    return dataclasses.replace(resolve_policy(Request(), machine, dp=1), notes=())


_ACTIVE: DevicePolicy | None = None


def install(policy: DevicePolicy) -> DevicePolicy:
    """Make `policy` the process's policy; on CPU this patches megatron-core (cpu_mode) first."""
    global _ACTIVE
    if policy.device_type == "cpu":
        from megatune.train import cpu_mode

        cpu_mode.enable()
    elif not torch.cuda.is_available():
        raise TrainError("a CUDA device policy was installed on a machine without CUDA; resolve the policy with "
                         "Machine.detect()")
    _ACTIVE = policy
    return policy


def active() -> DevicePolicy:
    """The installed policy; the first call without one installs `default_policy()`."""
    return _ACTIVE if _ACTIVE is not None else install(default_policy())
