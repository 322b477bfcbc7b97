"""Optimizer and learning-rate schedule: megatron-core's, configured from the plan's Megatron-LM arguments and its
device policy.

We use `get_megatron_optimizer` (Adam; fp32 main params + grads when the model is bf16/fp16; grad-norm clipping
across TP/PP) and `OptimizerParamScheduler` exactly as Megatron-LM's `training.py` does, including its unit for
scheduler steps (samples, i.e. iterations x global batch size), so a scheduler state saved by us reads like one
saved by Megatron-LM. Hyperparameters come from `MegatronArguments` (every name read here is one of its fields,
filled by argmap's table); what the device allows (precision, distributed optimizer, fused AdamW) comes from the
`DevicePolicy`. Weight decay is constant over training (megatune has no weight-decay increment schedule).
"""

from __future__ import annotations

from megatune.argmap import MegatronArguments
from megatune.train.errors import TrainError
from megatune.train.policy import DevicePolicy

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")


def optimizer_config(args: MegatronArguments, policy: DevicePolicy):
    """An OptimizerConfig from the Megatron-LM arguments and the device policy."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer=args.optimizer, lr=float(args.lr), min_lr=float(args.min_lr), weight_decay=float(args.weight_decay),
        adam_beta1=float(args.adam_beta1), adam_beta2=float(args.adam_beta2), adam_eps=float(args.adam_eps),
        clip_grad=float(args.clip_grad), bf16=policy.precision == "bf16", fp16=policy.precision == "fp16",
        params_dtype=policy.params_dtype, loss_scale=args.loss_scale, initial_loss_scale=float(args.initial_loss_scale),
        use_distributed_optimizer=policy.distributed_optimizer)


def build_optimizer(model_chunks: list, args: MegatronArguments, policy: DevicePolicy):
    """megatron-core's optimizer over the DDP-wrapped model chunks, with torch's fast kernels where megatron-core
    falls back to slow ones without TE/apex: foreach L2 norm / scale for clipping, fused AdamW per the policy."""
    from megatron.core.optimizer import get_megatron_optimizer
    from megatune.train import fused

    fused.install_multi_tensor_ops()
    optimizer = get_megatron_optimizer(optimizer_config(args, policy), model_chunks)
    if policy.fused_adamw:
        fused.use_fused_adamw(optimizer, devices=(policy.device_type,))
    return optimizer


def scheduler_steps(args: MegatronArguments) -> dict[str, int]:
    """Warmup / decay / weight-decay-increment lengths in samples, as Megatron-LM computes them."""
    gbs, train_iters = int(args.global_batch_size), int(args.train_iters)
    decay = max(int(args.lr_decay_iters or train_iters), 1) * gbs
    # OptimizerParamScheduler asserts warmup < decay; a 100% warmup on a 3-step run would trip it
    return {"lr_warmup_steps": min(int(args.lr_warmup_iters) * gbs, decay - 1), "lr_decay_steps": decay,
            "wd_incr_steps": max(train_iters, 1) * gbs}


def build_scheduler(optimizer, args: MegatronArguments):
    """OptimizerParamScheduler stepped by `scheduler_increment(args)` after every optimizer step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if args.lr_decay_style not in DECAY_STYLES:
        raise TrainError(f"--lr_decay_style {args.lr_decay_style!r} is not one of {', '.join(DECAY_STYLES)}")
    steps = scheduler_steps(args)
    wsd = args.lr_wsd_decay_iters
    return OptimizerParamScheduler(
        optimizer, init_lr=float(args.lr_warmup_init), max_lr=float(args.lr), min_lr=float(args.min_lr),
        lr_warmup_steps=steps["lr_warmup_steps"], lr_decay_steps=steps["lr_decay_steps"],
        lr_decay_style=args.lr_decay_style, start_wd=float(args.weight_decay), end_wd=float(args.weight_decay),
        wd_incr_steps=steps["wd_incr_steps"], wd_incr_style="constant",
        # a resumed run keeps the schedule it was saved with, as Megatron-LM does by default
        use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False,
        wsd_decay_steps=None if wsd is None else int(wsd) * int(args.global_batch_size),
        lr_wsd_decay_style=args.lr_wsd_decay_style)


def scheduler_increment(args: MegatronArguments) -> int:
    """Samples per optimizer step: Megatron-LM's unit for OptimizerParamScheduler.step()."""
    return int(args.global_batch_size)


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
