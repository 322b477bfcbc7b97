"""The swift -> Megatron argument table, read in both directions.

`TABLE` has one `Rule` per Megatron argument: which swift fields it reads, how (`forward`), how to read it back
(`backward`, None when the value cannot be inverted on its own), and a one-line description. `to_megatron` applies
every forward rule; `from_megatron` applies every backward rule; README.md's table and `--help` are generated from
it. Nothing else knows the mapping.

Batch and iteration arithmetic (as the ms-swift seed, with one correction):
    dp                = world_size / (tp x pp)                      # the seed wrote world_size; with TP/PP only
                                                                   # the data-parallel ranks see distinct samples
    global_batch_size = batch_size x gradient_accumulation_steps x dp
    train_iters       = max_steps if max_steps > 0 else ceil(train_len x num_train_epochs / global_batch_size)
    eval_iters        = ceil(val_len / global_batch_size)
    lr_warmup_iters   = warmup_steps if > 0 else ceil(train_iters x warmup_ratio), then at most train_iters - 1
                        (Megatron asserts warmup < decay iterations) and 0 for the warmup-less 'constant' scheduler
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from .errors import ArgumentError
from .megatron import (
    LR_SCHEDULERS_BACK,
    NO_WARMUP_SCHEDULERS,
    OPTIMIZERS_BACK,
    MegatronArguments,
    megatron_lr_decay_style,
    megatron_optimizer,
)
from .sft import SftArguments

DEFAULT_GLOBAL_BATCH = 16  # swift: gradient_accumulation_steps = ceil(16 / batch_size / world_size)
# warmup_stable_decay: HF needs num_decay_steps (no swift flag for it); the last 10% of training decays (cosine, HF's
# default decay_type). Megatron asserts a WSD decay length is given.
WSD_DECAY_FRACTION = 0.1
INITIAL_LOSS_SCALE = 2.0**16  # fp16 dynamic scaling starts where HF's GradScaler does (Megatron-LM: 2**32)
TRANSFORMER_IMPLS = {"native": "local", "te": "transformer_engine"}  # ours -> Megatron-LM's (and its state-dict names)


class BatchSizes(NamedTuple):
    """The batch arithmetic that depends on the cluster but not on the data."""

    world_size: int
    data_parallel_size: int
    gradient_accumulation_steps: int
    global_batch_size: int


class Derived(NamedTuple):
    """The counts that depend on the cluster and the data, not only on the arguments; `load`/`save`: the checkpoint
    paths a launcher resolved (the source actually found, the run directory), None: the arguments' own."""

    world_size: int
    data_parallel_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    train_iters: int
    eval_iters: int
    lr_warmup_iters: int
    load: str | None = None
    save: str | None = None


def with_parallel_defaults(sft: SftArguments, tp: int | None = None, pp: int | None = None) -> SftArguments:
    """`sft` with tp/pp left unset (None) filled: from `tp`/`pp` (e.g. the checkpoint's), else 1."""
    if sft.tp is not None and sft.pp is not None:
        return sft
    return dataclasses.replace(sft, tp=sft.tp or tp or 1, pp=sft.pp or pp or 1)


def default_checkpoint(sft: SftArguments) -> str | None:
    """swift's default `--resume_from_checkpoint`: '{model_type}-tp{tp}-pp{pp}' (None without --model_type)."""
    if not sft.model_type:
        return None
    return f"{sft.model_type}-tp{sft.tp or 1}-pp{sft.pp or 1}"


def batch_sizes(sft: SftArguments, *, world_size: int) -> BatchSizes:
    """Data-parallel size, gradient accumulation and global batch for `sft` on `world_size` processes."""
    sft = with_parallel_defaults(sft)
    if world_size < 1:
        raise ArgumentError("world size", f"must be >= 1, got {world_size}", "check NPROC_PER_NODE x NNODES")
    if world_size % (sft.tp * sft.pp):
        raise ArgumentError("--tp/--pp", f"tp x pp = {sft.tp} x {sft.pp} = {sft.tp * sft.pp} does not divide the "
                            f"world size {world_size}", "choose tp and pp whose product divides NPROC_PER_NODE x NNODES")
    dp = world_size // (sft.tp * sft.pp)
    per_step = sft.batch_size * dp
    if sft.global_batch_size is not None:
        if sft.global_batch_size % per_step:
            raise ArgumentError("--global_batch_size", f"{sft.global_batch_size} is not a multiple of batch_size x "
                                f"data-parallel size = {sft.batch_size} x {dp} = {per_step}",
                                f"use a multiple of {per_step}, or set --gradient_accumulation_steps instead")
        gas = sft.global_batch_size // per_step
        if sft.gradient_accumulation_steps is not None and sft.gradient_accumulation_steps != gas:
            raise ArgumentError("--global_batch_size", f"{sft.global_batch_size} needs gradient_accumulation_steps "
                                f"{gas}, but --gradient_accumulation_steps is {sft.gradient_accumulation_steps}",
                                "give only one of the two")
    elif sft.gradient_accumulation_steps is not None:
        gas = sft.gradient_accumulation_steps
    else:
        gas = math.ceil(DEFAULT_GLOBAL_BATCH / per_step)
    return BatchSizes(world_size, dp, gas, per_step * gas)


def derive(sft: SftArguments, *, world_size: int, train_len: int, val_len: int) -> Derived:
    """Batch sizes and iteration counts for `sft` on `world_size` processes with the given dataset sizes
    (`train_len`: rows, or packed rows with --packing)."""
    if train_len < 0 or val_len < 0:
        raise ArgumentError("dataset", f"negative length (train {train_len}, val {val_len})", "report this as a bug")
    sizes = batch_sizes(sft, world_size=world_size)
    gbs = sizes.global_batch_size
    if sft.max_steps > 0:
        train_iters = sft.max_steps
    elif train_len == 0:
        raise ArgumentError("--dataset", "the training set is empty", "check --dataset (and #N sample counts)")
    else:
        train_iters = math.ceil(train_len * sft.num_train_epochs / gbs)
    eval_iters = math.ceil(val_len / gbs)
    if sft.lr_scheduler_type in NO_WARMUP_SCHEDULERS:
        warmup = 0
    elif sft.warmup_steps > 0:
        warmup = sft.warmup_steps
    else:
        warmup = math.ceil(train_iters * sft.warmup_ratio)
    warmup = max(0, min(warmup, train_iters - 1))
    return Derived(*sizes, train_iters, eval_iters, warmup)


@dataclass(frozen=True)
class Rule:
    """One Megatron argument: the swift fields it comes from and the transforms both ways."""

    sft: tuple[str, ...]
    megatron: str
    forward: Callable[[SftArguments, Derived], Any]
    backward: Callable[[Mapping[str, Any]], dict[str, Any]] | None
    rule: str


def same(name: str) -> Rule:
    return Rule((name,), name, lambda s, d: getattr(s, name), lambda m: {name: m[name]}, "same")


def renamed(sft: str, meg: str) -> Rule:
    return Rule((sft,), meg, lambda s, d: getattr(s, sft), lambda m: {sft: m[meg]}, "renamed")


def _from_derived(key: str) -> Callable[[SftArguments, Derived], Any]:
    return lambda s, d: getattr(d, key)


def _gas_back(m: Mapping[str, Any]) -> dict[str, Any]:
    dp = m.get("data_parallel_size") or m["world_size"] // (
        m["tensor_model_parallel_size"] * m["pipeline_model_parallel_size"])
    return {"gradient_accumulation_steps": m["global_batch_size"] // (m["micro_batch_size"] * dp)}


def _wsd_decay_iters(s: SftArguments, d: Derived) -> int | None:
    if megatron_lr_decay_style(s.lr_scheduler_type) != "WSD":
        return None
    return max(1, math.ceil(d.train_iters * WSD_DECAY_FRACTION))


def _scheduler_back(m: Mapping[str, Any]) -> dict[str, Any]:
    style = m["lr_decay_style"]
    if style == "constant" and not m.get("lr_warmup_iters"):
        return {"lr_scheduler_type": "constant"}
    return {"lr_scheduler_type": LR_SCHEDULERS_BACK[style]}  # KeyError (e.g. 'exponential'): skipped


TABLE: tuple[Rule, ...] = (
    Rule(("optim",), "optimizer", lambda s, d: megatron_optimizer(s.optim),
         lambda m: {"optim": OPTIMIZERS_BACK[m["optimizer"]]}, "adamw_torch/adamw/adam... -> adam; sgd -> sgd"),
    Rule(("lr_scheduler_type",), "lr_decay_style", lambda s, d: megatron_lr_decay_style(s.lr_scheduler_type),
         _scheduler_back, "cosine, linear, constant[_with_warmup] -> constant, inverse_sqrt -> inverse-square-root"),
    renamed("learning_rate", "lr"),
    same("min_lr"),
    same("weight_decay"),
    renamed("max_grad_norm", "clip_grad"),
    same("adam_beta1"),
    same("adam_beta2"),
    renamed("adam_epsilon", "adam_eps"),
    same("fp16"),
    Rule(("fp16",), "apply_query_key_layer_scaling", lambda s, d: bool(s.fp16), None, "true with fp16"),
    same("bf16"),
    renamed("tp", "tensor_model_parallel_size"),
    renamed("pp", "pipeline_model_parallel_size"),
    same("sequence_parallel"),
    Rule(("expert_model_parallel_size",), "expert_model_parallel_size", lambda s, d: s.expert_model_parallel_size or 1,
         lambda m: {"expert_model_parallel_size": m["expert_model_parallel_size"]},
         "same; unset: the checkpoint's ep, else 1"),
    Rule(("moe_router_topk",), "moe_router_topk", lambda s, d: s.moe_router_topk,
         lambda m: {"moe_router_topk": m["moe_router_topk"]}, "same; unset: the checkpoint's num_experts_per_tok"),
    Rule(("moe_aux_loss_coeff",), "moe_aux_loss_coeff", lambda s, d: s.moe_aux_loss_coeff,
         lambda m: {"moe_aux_loss_coeff": m["moe_aux_loss_coeff"]},
         "same; unset: the checkpoint's router_aux_loss_coef"),
    same("moe_z_loss_coeff"),
    same("moe_grouped_gemm"),
    same("moe_token_dispatcher_type"),
    same("use_distributed_optimizer"),
    Rule(("recompute_granularity",), "recompute_granularity",
         lambda s, d: None if s.recompute_granularity == "none" else s.recompute_granularity,
         lambda m: {"recompute_granularity": m["recompute_granularity"] or "none"}, "'none' -> None"),
    same("use_flash_attn"),
    Rule(("transformer_impl",), "transformer_impl", lambda s, d: TRANSFORMER_IMPLS[s.transformer_impl],
         lambda m: {"transformer_impl": {v: k for k, v in TRANSFORMER_IMPLS.items()}[m["transformer_impl"]]},
         "native -> local (megatron-core's local names), te -> transformer_engine"),
    Rule(("fp8_format",), "fp8", lambda s, d: s.fp8_format, lambda m: {"fp8_format": m["fp8"]},
         "Megatron-LM's --fp8-format (stored as args.fp8); unset: no FP8"),
    same("fp8_recipe"),
    same("fp8_amax_history_len"),
    same("fp8_amax_compute_algo"),
    same("seed"),
    Rule(("resume_from_checkpoint", "model_type"), "load",
         lambda s, d: d.load or s.resume_from_checkpoint or default_checkpoint(s),
         lambda m: {"resume_from_checkpoint": m["load"]},
         "the checkpoint found; unset: '{model_type}-tp{tp}-pp{pp}'"),
    Rule(("output_dir",), "save", lambda s, d: d.save or s.output_dir, lambda m: {"output_dir": m["save"]},
         "the run dir {output_dir}/{source name}/v{N}-{time} (`megatune sft`)"),
    Rule(("logging_dir", "output_dir"), "tensorboard_dir",
         lambda s, d: s.logging_dir or f"{d.save or s.output_dir}/runs",
         lambda m: {"logging_dir": m["tensorboard_dir"]}, "logging_dir, default {save}/runs"),
    renamed("logging_steps", "log_interval"),
    renamed("eval_steps", "eval_interval"),
    renamed("save_steps", "save_interval"),
    renamed("batch_size", "micro_batch_size"),
    Rule(("batch_size", "gradient_accumulation_steps", "global_batch_size"), "global_batch_size",
         _from_derived("global_batch_size"), _gas_back,
         "batch_size x gradient_accumulation_steps x DP size (DP = world_size / (tp x pp))"),
    renamed("dataloader_num_workers", "num_workers"),
    Rule(("max_length",), "seq_length", lambda s, d: s.max_length if s.max_length > 0 else None,
         lambda m: {"max_length": m["seq_length"] or -1}, "-1 (no limit) -> None"),
    Rule(("num_train_epochs", "max_steps"), "train_iters", _from_derived("train_iters"),
         lambda m: {"max_steps": m["train_iters"]},
         "max_steps if > 0 else ceil(len(train) x num_train_epochs / global_batch_size)"),
    Rule(("num_train_epochs", "max_steps"), "lr_decay_iters", _from_derived("train_iters"), None,
         "= train_iters (decay ends with training, as in HF)"),
    Rule(("val_dataset", "dataset_test_ratio"), "eval_iters", _from_derived("eval_iters"), None,
         "ceil(len(val) / global_batch_size)"),
    Rule(("warmup_steps", "warmup_ratio"), "lr_warmup_init", lambda s, d: 0.0, None,
         "0: warmup starts from lr 0, as in HF"),
    Rule(("lr_scheduler_type",), "lr_wsd_decay_iters", _wsd_decay_iters, None,
         f"warmup_stable_decay: the last {WSD_DECAY_FRACTION:.0%} of train_iters, else None"),
    Rule(("lr_scheduler_type",), "lr_wsd_decay_style", lambda s, d: "cosine", None, "cosine (HF's WSD decay)"),
    Rule(("fp16",), "loss_scale", lambda s, d: None, None, "None: dynamic loss scaling (matters with fp16 only)"),
    Rule(("fp16",), "initial_loss_scale", lambda s, d: INITIAL_LOSS_SCALE, None,
         "2**16, HF GradScaler's start (Megatron-LM's default: 2**32)"),
    Rule(("warmup_steps", "warmup_ratio"), "lr_warmup_iters", _from_derived("lr_warmup_iters"),
         lambda m: {"warmup_steps": m["lr_warmup_iters"], "warmup_ratio": 0.0},
         "warmup_steps if > 0 else ceil(train_iters x warmup_ratio); < train_iters"),
    Rule(("save_only_model",), "no_save_optim", lambda s, d: s.save_only_model,
         lambda m: {"save_only_model": bool(m["no_save_optim"])}, "= save_only_model"),
    Rule(("save_only_model",), "no_save_rng", lambda s, d: s.save_only_model, None, "= save_only_model"),
    same("ckpt_format"),
    same("async_save"),
    Rule((), "world_size", _from_derived("world_size"), None, "the number of processes"),
    Rule(("tp", "pp"), "data_parallel_size", _from_derived("data_parallel_size"), None, "world_size / (tp x pp)"),
)


def to_megatron(sft: SftArguments, *, world_size: int, train_len: int, val_len: int, load: str | None = None,
                save: str | None = None) -> MegatronArguments:
    """Megatron arguments for `sft` on `world_size` processes, `train_len`/`val_len` samples (after packing);
    `load`/`save`: the checkpoint and run directory a launcher resolved (see Derived).

    Raises ArgumentError when tp x pp does not divide world_size, a batch size does not divide, or there is no
    training data and no --max_steps.
    """
    sft = with_parallel_defaults(sft)
    derived = derive(sft, world_size=world_size, train_len=train_len, val_len=val_len)._replace(load=load, save=save)
    return MegatronArguments(**{rule.megatron: rule.forward(sft, derived) for rule in TABLE})


def from_megatron(meg: MegatronArguments | argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """Swift-named values read back from Megatron arguments (e.g. a checkpoint's saved `args`).

    Derived counts come back as their explicit equivalents (train_iters -> max_steps, lr_warmup_iters ->
    warmup_steps with warmup_ratio 0), so `to_megatron(SftArguments(**from_megatron(m)), ...)` reproduces `m`
    for the same world size and validation length. Rules whose inputs are missing are skipped.
    """
    if isinstance(meg, MegatronArguments):
        values: Mapping[str, Any] = dataclasses.asdict(meg)
    elif isinstance(meg, argparse.Namespace):
        values = vars(meg)
    else:
        values = meg
    out: dict[str, Any] = {}
    for rule in TABLE:
        if rule.backward is None:
            continue
        try:
            out.update(rule.backward(values))
        except (KeyError, TypeError, ZeroDivisionError):
            continue  # an older checkpoint without this argument
    return out


def megatron_counterparts() -> dict[str, str]:
    """swift field -> the Megatron arguments it feeds (comma-separated), for --help."""
    out: dict[str, list[str]] = {}
    for rule in TABLE:
        for name in rule.sft:
            out.setdefault(name, []).append(rule.megatron)
    return {name: ", ".join(megs) for name, megs in out.items()}
