"""`SftArguments`: ms-swift's `swift sft` arguments that megatune's Megatron backend uses, with swift's defaults.

Sources for the defaults (cited per field as `[src]`):
- [swift2.5]  ms-swift 2.5 `swift/llm/utils/argument.py`, `SftArguments` (the release that added
              `--train_backend megatron`, `--tp/--pp/--min_lr/--sequence_parallel`);
- [swift2.5*] the value its `__post_init__` resolves for `sft_type=full` / `train_backend=megatron`
              (e.g. learning_rate None -> 1e-5 for full, eval_steps None -> 200 for full,
              min_lr None -> learning_rate x 0.1, resume_from_checkpoint None -> '{model_type}-tp{tp}-pp{pp}',
              which `mapping.default_checkpoint` names: the field itself stays None, i.e. "not given");
- [swift-meg] ms-swift `swift/llm/megatron/argument.py` (`MegatronMixin`) for megatron-only knobs;
- [megatune]  ours, no swift counterpart.
Deliberate differences from swift: `sft_type` defaults to 'full'; 'lora' trains tensor-parallel LoRA adapters (swift
2.5 silently switched lora -> full under the megatron backend), other tuners are errors; `train_backend` defaults to
(and must be) 'megatron';
`truncation_strategy` adds 'right' ('truncation_left' is read as 'left').
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from .cli import arg
from .errors import ArgumentError
from .megatron import megatron_lr_decay_style, megatron_optimizer

# swift's adapter tuners: none of them exists in the Megatron backend
ADAPTER_SFT_TYPES = frozenset({"qlora", "longlora", "adalora", "ia3", "llamapro", "adapter", "vera", "boft",
                               "fourierft", "reft"})
TRUNCATION_ALIASES = {"truncation_left": "left", "ignore": "delete"}
# older / HF spellings accepted as flags (swift 2.x did the same in handle_compatibility)
SFT_ALIASES = {
    "per_device_train_batch_size": "batch_size", "train_type": "sft_type", "preprocess_num_proc": "dataset_num_proc",
    "only_save_model": "save_only_model", "model": "model_id_or_path",
    "lora_dropout_p": "lora_dropout", "target_modules": "lora_target_modules",
}


_f = arg


@dataclass
class SftArguments:
    """`megatune sft` arguments (swift names and defaults; see the module docstring for sources)."""

    # model and checkpoint
    model_type: str | None = _f(None, "model type, e.g. qwen2-7b-instruct [swift2.5]")
    model_id_or_path: str | None = _f(None, "HF model id or local HF directory [swift2.5]")
    resume_from_checkpoint: str | None = _f(
        None, "Megatron checkpoint (or megatune run dir) to start from; unset: '{model_type}-tp{tp}-pp{pp}' when that "
        "directory exists, else the HF weights [swift2.5*]")
    sft_type: str = _f("full", "'full' or 'lora' with the Megatron backend [megatune; swift2.5 default 'lora']")
    train_backend: str = _f("megatron", "only 'megatron' [megatune; swift2.5 default 'transformers']")
    # LoRA (--sft_type lora): adapters on the tensor-parallel linears, see megatune.train.lora
    lora_target_modules: list[str] = _f(["DEFAULT"], "DEFAULT (q/k/v), ALL (every linear), or names: q_proj ... "
                                        "down_proj / linear_qkv ... linear_fc2 [swift2.5]")
    lora_rank: int = _f(8, "[swift2.5]")
    lora_alpha: float = _f(32.0, "scaling = lora_alpha / lora_rank [swift2.5]")
    lora_dropout: float = _f(0.05, "dropout on the adapter input [swift2.5]")
    use_rslora: bool = _f(False, "rank-stabilised LoRA: scaling = lora_alpha / sqrt(lora_rank) [swift2.5]")
    # data
    dataset: list[str] = _f([], "training datasets: [hub::]name[:subset][#N] or a local file [swift2.5]")
    val_dataset: list[str] = _f([], "validation datasets; when given, dataset_test_ratio is 0 [swift2.5]")
    dataset_test_ratio: float = _f(0.01, "fraction of the training data held out for validation [swift2.5]")
    max_length: int = _f(2048, "max tokens per sample, -1: no limit [swift2.5]")
    truncation_strategy: str = _f("delete", "too-long samples: delete | left | right [swift2.5, +right]")
    system: str | None = _f(None, "default system prompt [swift2.5]")
    model_name: list[str] = _f([], "self-cognition name: Chinese English [swift2.5]", max_len=2)
    model_author: list[str] = _f([], "self-cognition author: Chinese English [swift2.5]", max_len=2)
    packing: bool = _f(False, "pack samples into max_length sequences [swift2.5]")
    skip_bad_rows: bool = _f(False, "skip malformed dataset rows (with a count) instead of failing [megatune]")
    dataset_num_proc: int = _f(1, "processes for preprocessing (swift2.5: preprocess_num_proc) [swift2.5]")
    # precision
    dtype: Literal["AUTO", "bf16", "fp16", "fp32"] = _f(
        "AUTO", "training dtype when --fp16/--bf16 are not given; AUTO = bf16 [swift2.5]")
    fp16: bool | None = _f(None, "fp16 mixed precision (resolved from dtype when unset) [swift2.5*]")
    bf16: bool | None = _f(None, "bf16 mixed precision (resolved from dtype when unset) [swift2.5*]")
    # optimizer and schedule
    learning_rate: float | None = _f(None, "peak learning rate; default 1e-5 full, 1e-4 lora [swift2.5*]")
    min_lr: float | None = _f(None, "final learning rate; default learning_rate x 0.1 [swift2.5*]")
    optim: str = _f("adamw_torch", "optimizer: adamw_torch/adamw/adam -> adam, sgd [swift2.5]")
    lr_scheduler_type: str = _f("cosine", "cosine | linear | constant | constant_with_warmup | ... [swift2.5]")
    weight_decay: float = _f(0.1, "[swift2.5]")
    max_grad_norm: float = _f(1.0, "gradient clipping norm [swift2.5]")
    adam_beta1: float = _f(0.9, "[swift2.5]")
    adam_beta2: float = _f(0.95, "[swift2.5]")
    adam_epsilon: float = _f(1e-8, "[swift2.5]")
    warmup_steps: int = _f(0, "warmup iterations; > 0 overrides warmup_ratio [swift2.5]")
    warmup_ratio: float = _f(0.05, "warmup as a fraction of the training iterations [swift2.5]")
    # batches and length of training
    batch_size: int = _f(1, "micro batch size per data-parallel rank [swift2.5]")
    gradient_accumulation_steps: int | None = _f(
        None, "default ceil(16 / batch_size / data-parallel size) [swift2.5*, world size -> DP size]")
    global_batch_size: int | None = _f(
        None, "if set: batch_size x data-parallel size must divide it; sets gradient accumulation [swift-meg]")
    num_train_epochs: int = _f(1, "[swift2.5]")
    max_steps: int = _f(-1, "> 0: train exactly this many iterations, overriding num_train_epochs [swift2.5]")
    # parallelism
    # None = take the checkpoint's (the seed's `--resume_from_checkpoint qwen2-7b-instruct-tp2-pp1` with 4 GPUs
    # trains TP2 x DP2 without repeating --tp 2), else 1
    tp: int | None = _f(None, "tensor parallel size; default the checkpoint's tp, else 1 [swift2.5: 1]")
    pp: int | None = _f(None, "pipeline parallel size; default the checkpoint's pp, else 1 [swift2.5: 1]")
    sequence_parallel: bool = _f(False, "Megatron sequence parallelism (needs tp > 1 to matter) [swift2.5]")
    # mixture of experts (MoE checkpoints only); unset values come from the checkpoint's HF config
    expert_model_parallel_size: int | None = _f(
        None, "expert parallel size: routed experts split over ep ranks carved out of data parallelism; must divide "
        "the expert count, world size a multiple of tp x pp x ep; default the checkpoint's ep, else 1 [swift-meg]",
        aliases=("ep",))
    moe_router_topk: int | None = _f(
        None, "experts per token; default the checkpoint's num_experts_per_tok [swift-meg]")
    moe_aux_loss_coeff: float | None = _f(
        None, "load-balancing loss coefficient (HF's loss over all MoE layers of a micro-batch); default the "
        "checkpoint's router_aux_loss_coef [swift-meg]")
    moe_z_loss_coeff: float | None = _f(None, "router z-loss coefficient; unset: no z-loss [swift-meg]")
    moe_grouped_gemm: bool = _f(
        True, "routed experts as grouped GEMMs (torch grouped_mm on Hopper+, bf16); false: one GEMM per expert "
        "(megatron-core's SequentialMLP); same weights and names either way [swift-meg]")
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = _f(
        "alltoall", "how tokens reach their experts' ranks: alltoall (all-to-all over ep) or allgather [swift-meg]")
    use_distributed_optimizer: bool = _f(True, "shard optimizer state over data-parallel ranks [swift-meg]")
    recompute_granularity: Literal["none", "selective", "full"] = _f(
        "selective", "activation recomputation [swift-meg]")
    use_flash_attn: bool | None = _f(
        None, "attention kernels: unset = cuDNN's first, then flash (GPU), torch's choice on CPU; true = flash "
        "kernels only (needs a GPU); false = no flash kernels (memory-efficient/math SDPA, explicit masks for packed "
        "rows) [swift2.5]")
    transformer_impl: Literal["native", "te"] = _f(
        "native", "layer spec: native (torch SDPA, compiled norm/RoPE/SwiGLU; as fast as te on an H200 and also runs "
        "packing, LoRA and MoE, BENCHMARKS.md) or te (Transformer Engine, must be installed; needed for FP8) "
        "[Megatron-LM --transformer-impl]")
    fp8_format: Literal["e4m3", "hybrid"] | None = _f(
        None, "FP8 training through Transformer Engine (needs --transformer_impl te and a Hopper-or-newer GPU): "
        "hybrid = e4m3 forward, e5m2 gradients; unset = bf16/fp16 [swift-meg] [Megatron-LM --fp8-format]")
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = _f(
        "delayed", "FP8 scaling: delayed (amax history), tensorwise (current scaling), blockwise, mxfp8 (Blackwell) "
        "[swift-meg]")
    fp8_amax_history_len: int = _f(1024, "amax history of the delayed recipe [swift-meg]")
    fp8_amax_compute_algo: Literal["max", "most_recent"] = _f("max", "amax of the history (delayed recipe) [swift-meg]")
    # logging and checkpoints
    seed: int = _f(42, "[swift2.5]")
    output_dir: str = _f("output", "[swift2.5]")
    logging_dir: str | None = _f(None, "tensorboard directory; default {output_dir}/runs [swift2.5*]")
    logging_steps: int = _f(5, "[swift2.5]")
    eval_steps: int = _f(200, "evaluate every N iterations (full sft) [swift2.5*]")
    save_steps: int | None = _f(None, "save every N iterations; default eval_steps [swift2.5*]")
    save_only_model: bool = _f(False, "save weights only, no optimizer / RNG state [swift2.5]")
    ckpt_format: Literal["torch", "torch_dist"] = _f(
        "torch", "checkpoint format: torch (Megatron-LM legacy rank files) or torch_dist (megatron-core distributed "
        "checkpoint: resumable at another tp/pp/dp) [Megatron-LM --ckpt-format]")
    save_safetensors: bool = _f(
        False, "also write every checkpoint as an HF safetensors dir ({checkpoint}/{model_type}-hf), streamed from "
        "the training ranks [swift3]")
    async_save: bool = _f(
        False, "write torch_dist checkpoints in the background while training goes on [Megatron-LM --async-save]")
    dataloader_num_workers: int = _f(
        1, "batches are built from pre-tokenized rows in the training process: 0 and 1 both mean that, more is "
        "refused [swift2.5*]")
    overwrite: bool = _f(False, "replace an existing output directory instead of failing [megatune]")

    def __post_init__(self) -> None:
        self._check_backend()
        if self.learning_rate is None:
            self.learning_rate = 1e-4 if self.sft_type == "lora" else 1e-5
        self._resolve_precision()
        self._check_values()
        if self.min_lr is None:
            self.min_lr = self.learning_rate * 0.1
        if self.save_steps is None:
            self.save_steps = self.eval_steps
        if self.val_dataset:
            self.dataset_test_ratio = 0.0
        self.truncation_strategy = TRUNCATION_ALIASES.get(self.truncation_strategy, self.truncation_strategy)
        for name in ("model_name", "model_author"):
            values = list(getattr(self, name))
            setattr(self, name, values * 2 if len(values) == 1 else values)  # one value: both languages

    def _check_backend(self) -> None:
        if self.train_backend != "megatron":
            raise ArgumentError("--train_backend", f"megatune only has the megatron backend, got "
                                f"{self.train_backend!r}", "pass --train_backend megatron or leave it out")
        if self.sft_type in ADAPTER_SFT_TYPES:
            raise ArgumentError("--sft_type", f"{self.sft_type!r} is not supported by the megatron backend "
                                "(full-parameter training only)",
                                "pass --sft_type full, or use ms-swift's transformers backend for adapters")
        if self.sft_type not in ("full", "lora"):
            raise ArgumentError("--sft_type", f"unknown sft_type {self.sft_type!r}", "pass --sft_type full or lora")

    def _resolve_precision(self) -> None:
        if self.fp16 and self.bf16:
            raise ArgumentError("--fp16/--bf16", "both are true", "choose one: --bf16 true or --fp16 true")
        from_dtype = {"AUTO": "bf16", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[self.dtype]
        explicit = "fp16" if self.fp16 else "bf16" if self.bf16 else None
        if explicit and self.dtype != "AUTO" and self.dtype != explicit:
            raise ArgumentError("--dtype", f"--dtype {self.dtype} contradicts --{explicit} true",
                                "give only one of them")
        if self.fp16 is None and self.bf16 is None:
            self.fp16, self.bf16 = from_dtype == "fp16", from_dtype == "bf16"
        else:
            self.fp16, self.bf16 = bool(self.fp16), bool(self.bf16)

    def _check_values(self) -> None:
        megatron_optimizer(self.optim)
        megatron_lr_decay_style(self.lr_scheduler_type)
        strategy = TRUNCATION_ALIASES.get(self.truncation_strategy, self.truncation_strategy)
        if strategy not in ("delete", "left", "right"):
            raise ArgumentError("--truncation_strategy", f"{self.truncation_strategy!r} is not one of delete, "
                                "left, right", "pick one of those")
        for name in ("model_name", "model_author"):
            values = getattr(self, name)
            if len(values) > 2:
                raise ArgumentError(f"--{name}", f"takes at most 2 values (Chinese, English), got {len(values)}",
                                    f"e.g. --{name} 小黄 'Xiao Huang'; quote names that contain spaces")
        positive = [n for n in ("tp", "pp") if getattr(self, n) is not None] + ["batch_size", "logging_steps", "eval_steps", "num_train_epochs", "dataset_num_proc"]
        positive += [n for n in ("gradient_accumulation_steps", "global_batch_size", "save_steps")
                     if getattr(self, n) is not None]
        for name in positive:
            if getattr(self, name) < 1:
                raise ArgumentError(f"--{name}", f"must be >= 1, got {getattr(self, name)}", "pass a positive integer")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ArgumentError("--warmup_ratio", f"must be in [0, 1], got {self.warmup_ratio}", "e.g. 0.05")
        if not 0.0 <= self.dataset_test_ratio < 1.0:
            raise ArgumentError("--dataset_test_ratio", f"must be in [0, 1), got {self.dataset_test_ratio}", "e.g. 0.01")
        self._check_floats()
        if self.learning_rate <= 0:
            raise ArgumentError("--learning_rate", f"must be > 0, got {self.learning_rate}", "e.g. 1e-5")
        if self.lora_rank < 1 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ArgumentError("--lora_rank/--lora_alpha/--lora_dropout", f"need rank >= 1, alpha > 0, dropout in "
                                f"[0, 1); got {self.lora_rank}, {self.lora_alpha}, {self.lora_dropout}", "e.g. 8, 32, 0.05")
        if self.warmup_steps < 0 or self.dataloader_num_workers < 0:
            raise ArgumentError("--warmup_steps/--dataloader_num_workers", "must be >= 0", "pass 0 or more")
        if self.async_save and self.ckpt_format != "torch_dist":
            raise ArgumentError("--async_save", "needs the torch_dist checkpoint format", "add --ckpt_format torch_dist")


    def _check_floats(self) -> None:
        """Finite values in range: an inf/nan learning rate trains to NaN weights and still reports "done"."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ArgumentError(f"--{f.name}", f"must be a finite number, got {value}", "pass a finite number")
        ranges = {"min_lr": (0.0, None, "e.g. 1e-6"), "weight_decay": (0.0, None, "e.g. 0.1"),
                  "max_grad_norm": (0.0, None, "e.g. 1.0; 0 turns clipping off"), "adam_epsilon": (None, 0.0, "e.g. 1e-8")}
        for name, (at_least, above, example) in ranges.items():
            value = getattr(self, name)
            if value is None:
                continue
            if (at_least is not None and value < at_least) or (above is not None and value <= above):
                bound = f">= {at_least}" if at_least is not None else f"> {above}"
                raise ArgumentError(f"--{name}", f"must be {bound}, got {value}", example)
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ArgumentError(f"--{name}", f"must be in [0, 1), got {getattr(self, name)}", "e.g. 0.9")
