"""Megatron-LM's training arguments (the subset megatune sets) and the swift/HF -> Megatron name vocabularies.

Field names are Megatron-LM's argparse `dest` names (`megatron/training/arguments.py`), so a checkpoint's saved
`args` Namespace reads straight into `MegatronArguments.from_namespace`. Defaults are Megatron-LM's own defaults
(what you get when the flag is not passed); `to_megatron` always fills every field.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ArgumentError

# swift/HF `optim` names -> Megatron `--optimizer`. Megatron's 'adam' applies decoupled weight decay (AdamW).
# 8-bit / paged / adafactor / lion variants have no Megatron counterpart and are rejected.
OPTIMIZERS: dict[str, str] = {
    "adamw_torch": "adam", "adamw_torch_fused": "adam", "adamw_hf": "adam", "adamw_apex_fused": "adam",
    "adamw": "adam", "adam": "adam", "sgd": "sgd",
}
OPTIMIZERS_BACK: dict[str, str] = {"adam": "adamw_torch", "sgd": "sgd"}

# swift/HF `lr_scheduler_type` -> Megatron `--lr-decay-style` (choices: constant, linear, cosine,
# inverse-square-root, WSD). HF 'constant' has no warmup, so it also forces lr_warmup_iters to 0.
LR_SCHEDULERS: dict[str, str] = {
    "linear": "linear", "cosine": "cosine", "cosine_with_min_lr": "cosine", "constant": "constant",
    "constant_with_warmup": "constant", "inverse_sqrt": "inverse-square-root", "warmup_stable_decay": "WSD",
}
LR_SCHEDULERS_BACK: dict[str, str] = {
    "linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup",
    "inverse-square-root": "inverse_sqrt", "WSD": "warmup_stable_decay",
}
NO_WARMUP_SCHEDULERS = frozenset({"constant"})


def megatron_optimizer(optim: str, where: str = "--optim") -> str:
    try:
        return OPTIMIZERS[optim]
    except KeyError:
        raise ArgumentError(where, f"Megatron has no optimizer matching {optim!r}",
                            f"use one of {', '.join(OPTIMIZERS)}") from None


def megatron_lr_decay_style(scheduler: str, where: str = "--lr_scheduler_type") -> str:
    try:
        return LR_SCHEDULERS[scheduler]
    except KeyError:
        raise ArgumentError(where, f"Megatron has no lr decay style matching {scheduler!r}",
                            f"use one of {', '.join(LR_SCHEDULERS)}") from None


@dataclass
class MegatronArguments:
    """What megatune passes to Megatron-LM / megatron-core training. Defaults: Megatron-LM's."""

    # parallelism
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    data_parallel_size: int = 1  # derived by Megatron from world_size / (tp x pp); kept for readers of checkpoints
    world_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # mixture of experts
    expert_model_parallel_size: int = 1
    moe_router_topk: int | None = 2
    moe_aux_loss_coeff: float | None = 0.0
    moe_z_loss_coeff: float | None = None
    moe_grouped_gemm: bool = False
    moe_token_dispatcher_type: str = "allgather"
    # precision
    fp16: bool = False
    bf16: bool = False
    apply_query_key_layer_scaling: bool = False
    # optimizer
    optimizer: str = "adam"
    lr: float | None = None
    min_lr: float = 0.0
    lr_decay_style: str = "linear"
    lr_decay_iters: int | None = None
    lr_warmup_iters: int = 0
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_warmup_init: float = 0.0
    lr_wsd_decay_iters: int | None = None
    lr_wsd_decay_style: str = "exponential"
    loss_scale: float | None = None  # None: dynamic (fp16)
    initial_loss_scale: float = 4294967296.0
    # batches and iterations
    micro_batch_size: int | None = None
    global_batch_size: int | None = None
    train_iters: int | None = None
    eval_iters: int = 100
    eval_interval: int = 1000
    log_interval: int = 100
    save_interval: int | None = None
    seq_length: int | None = None
    num_workers: int = 2
    seed: int = 1234
    # model execution
    use_flash_attn: bool | None = False  # None: let megatune's layer spec decide (swift's "auto")
    transformer_impl: str = "transformer_engine"  # or "local"
    recompute_granularity: str | None = None
    fp8: str | None = None  # Megatron-LM's --fp8-format lands in args.fp8
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    # checkpoints and logs
    load: str | None = None
    save: str | None = None
    tensorboard_dir: str | None = None
    no_save_optim: bool = False
    no_save_rng: bool = False
    ckpt_format: str = "torch_dist"  # or "torch" (legacy rank files)
    async_save: bool = False

    @classmethod
    def from_namespace(cls, args: argparse.Namespace | Mapping[str, Any]) -> MegatronArguments:
        """From a checkpoint's saved `args` (Megatron-LM Namespace) or a dict; unknown names are ignored."""
        values = dict(args) if isinstance(args, Mapping) else vars(args)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def as_namespace(self) -> argparse.Namespace:
        return argparse.Namespace(**dataclasses.asdict(self))

    def to_argv(self) -> list[str]:
        """Megatron-LM command-line flags (`--tensor-model-parallel-size 2 ...`); False/None are left out."""
        argv: list[str] = []
        for name, value in dataclasses.asdict(self).items():
            if name in ("world_size", "data_parallel_size") or value is None or value is False:
                continue
            argv.append("--" + name.replace("_", "-"))
            if value is not True:
                argv.append(str(value))
        return argv
