"""Optimizer and learning-rate schedule: megatron-core's, configured from Megatron-LM argument names.

We use `get_megatron_optimizer` (Adam; fp32 main params + grads when the model is bf16/fp16; grad-norm clipping
across TP/PP) and `OptimizerParamScheduler` exactly as Megatron-LM's `training.py` does, including its unit for
scheduler steps (samples, i.e. iterations x global batch size), so a scheduler state saved by us reads like one
saved by Megatron-LM. The distributed optimizer needs reduce_scatter and CUDA tensors, which gloo/CPU lack; in CPU
mode we fall back to the plain optimizer and say so, rather than fail a command line that works on GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")


def _get(args: Any, name: str, default: Any = None) -> Any:
    value = getattr(args, name, default)
    return default if value is None else value


def optimizer_config(args: Any, *, cpu: bool, note: Callable[[str], None] = log.warning):
    """An OptimizerConfig from Megatron-LM names (lr, min_lr, weight_decay, adam_*, clip_grad, bf16, fp16, ...)."""
    from megatron.core.optimizer import OptimizerConfig

    bf16, fp16 = bool(_get(args, "bf16", False)), bool(_get(args, "fp16", False))
    distributed = bool(_get(args, "use_distributed_optimizer", False))
    if cpu and distributed:
        note("megatune sft: the distributed optimizer needs CUDA (reduce_scatter, CUDA tensors); "
             "CPU mode uses the replicated optimizer instead (same results, more memory per rank)")
        distributed = False
    params_dtype = torch.bfloat16 if bf16 else (torch.float16 if fp16 else torch.float32)
    return OptimizerConfig(
        optimizer=_get(args, "optimizer", "adam"),
        lr=float(_get(args, "lr", 1e-5)),
        min_lr=float(_get(args, "min_lr", 0.0)),
        weight_decay=float(_get(args, "weight_decay", 0.1)),
        adam_beta1=float(_get(args, "adam_beta1", 0.9)),
        adam_beta2=float(_get(args, "adam_beta2", 0.95)),
        adam_eps=float(_get(args, "adam_eps", 1e-8)),
        clip_grad=float(_get(args, "clip_grad", 1.0)),
        bf16=bf16,
        fp16=fp16,
        params_dtype=params_dtype,
        loss_scale=getattr(args, "loss_scale", None),  # None: dynamic loss scaling (fp16 only)
        # Megatron-LM starts fp16 dynamic scaling at 2**32 and halves on overflow; HF's GradScaler (what swift users
        # know) starts at 2**16, which wastes ~16 fewer skipped steps at the start of a fine-tune
        initial_loss_scale=float(_get(args, "initial_loss_scale", 2**16)),
        use_distributed_optimizer=distributed,
    )


def build_optimizer(model_chunks: list, args: Any, *, cpu: bool, note: Callable[[str], None] = log.warning):
    """megatron-core's optimizer over the DDP-wrapped model chunks, with torch's fast kernels where megatron-core
    falls back to slow ones without TE/apex: foreach L2 norm / scale for clipping, fused AdamW on CUDA."""
    from megatron.core.optimizer import get_megatron_optimizer
    from megatune.train import fused

    fused.install_multi_tensor_ops()
    optimizer = get_megatron_optimizer(optimizer_config(args, cpu=cpu, note=note), model_chunks)
    if not cpu:
        fused.use_fused_adamw(optimizer)
    return optimizer


def scheduler_steps(args: Any) -> dict[str, int]:
    """Warmup / decay / weight-decay-increment lengths in samples, as Megatron-LM computes them."""
    gbs = int(args.global_batch_size)
    train_iters = int(args.train_iters)
    decay_iters = int(_get(args, "lr_decay_iters", train_iters))
    warmup_iters = _get(args, "lr_warmup_iters", 0)
    fraction = getattr(args, "lr_warmup_fraction", None)
    warmup = int(fraction * decay_iters * gbs) if fraction is not None else int(warmup_iters) * gbs
    decay = max(decay_iters, 1) * gbs
    # OptimizerParamScheduler asserts warmup < decay; a 100% warmup on a 3-step run would trip it
    return {"lr_warmup_steps": min(warmup, decay - 1), "lr_decay_steps": decay, "wd_incr_steps": max(train_iters, 1) * gbs}


def build_scheduler(optimizer, args: Any):
    """OptimizerParamScheduler stepped by `scheduler_increment(args)` after every optimizer step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    style = _get(args, "lr_decay_style", "cosine")
    if style not in DECAY_STYLES:
        from megatune.train.errors import TrainError

        raise TrainError(f"--lr_decay_style {style!r} is not one of {', '.join(DECAY_STYLES)}")
    wd = float(_get(args, "weight_decay", 0.1))
    steps = scheduler_steps(args)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=float(_get(args, "lr_warmup_init", 0.0)),
        max_lr=float(_get(args, "lr", 1e-5)),
        min_lr=float(_get(args, "min_lr", 0.0)),
        lr_warmup_steps=steps["lr_warmup_steps"],
        lr_decay_steps=steps["lr_decay_steps"],
        lr_decay_style=style,
        start_wd=float(_get(args, "start_weight_decay", wd)),
        end_wd=float(_get(args, "end_weight_decay", wd)),
        wd_incr_steps=steps["wd_incr_steps"],
        wd_incr_style=_get(args, "weight_decay_incr_style", "constant"),
        # a resumed run keeps the schedule it was saved with, as Megatron-LM does by default
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
        wsd_decay_steps=getattr(args, "lr_wsd_decay_iters", None) and int(args.lr_wsd_decay_iters) * int(args.global_batch_size),
        lr_wsd_decay_style=getattr(args, "lr_wsd_decay_style", None),
    )


def scheduler_increment(args: Any) -> int:
    """Samples per optimizer step: Megatron-LM's unit for OptimizerParamScheduler.step()."""
    return int(args.global_batch_size)


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
