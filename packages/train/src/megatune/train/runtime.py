"""Build a training run from SftArguments in named steps; each reads the plan (plan.py) and the device policy
(policy.py) and hands the next step what it needs:

    parallel   source, parallel sizes and device policy resolved; process groups initialised
    data       tokenizer, datasets, the training iterator (its batch sizes need no data), validation iterators
    plan       resolve_plan, once: iterations from the data's size, paths (rank 0 picks the run dir, broadcasts)
    model      GPTModel chunks with the source weights, wrapped in megatron-core DDP
    optimizer  megatron-core optimizer + LR schedule
    restore    a continued run's states (model, optimizer, scheduler, data position, RNG) from its checkpoint

Order matters and is the same on every rank (each step is deterministic, so all ranks fail or succeed together
and nobody is left waiting in a collective).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from megatune.train.errors import TrainError
from megatune.train.plan import Parallel, Source, TrainingPlan
from megatune.train.policy import DevicePolicy

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Data:
    config: Any  # data.DataConfig
    train: Any  # data.BatchIterator: the training batches, resumable (state_dict / load_state_dict)
    make_val: Callable[[], Any] | None  # a fresh validation iterator per evaluation, None without validation data
    stats: dict
    train_rows: int
    train_units: int  # what an iteration consumes: train_rows, or the packed rows with --packing
    val_rows: int


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # missing/corrupt tokenizer files: one line with the directory
        first = str(e).splitlines()[0] if str(e) else ""
        raise TrainError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {first}); the directory must hold "
                         f"tokenizer.json / tokenizer_config.json") from None


def build_data(sft, tokenizer):
    from megatune.train.data import DataConfig, DataError, build_datasets

    cfg = DataConfig(dataset=list(sft.dataset), val_dataset=list(sft.val_dataset),
                     dataset_test_ratio=sft.dataset_test_ratio,
                     max_length=sft.max_length if sft.max_length > 0 else 1 << 20,
                     truncation_strategy=sft.truncation_strategy, packing=sft.packing,
                     skip_bad_rows=sft.skip_bad_rows, model_name=sft.model_name or None,
                     model_author=sft.model_author or None, system=sft.system, seed=sft.seed,
                     num_proc=sft.dataset_num_proc)
    try:
        train, val, stats = build_datasets(cfg, tokenizer)
    except DataError as e:
        raise TrainError(str(e)) from None
    if len(train) == 0:
        raise TrainError("the training set is empty after filtering; raise --max_length or check --dataset")
    return cfg, train, val, stats


def batch_iterator(dataset, *, mbs: int, num_micro_batches: int, dist, seed: int, cfg, pad_id: int,
                   policy: DevicePolicy, epochs=None):
    from megatune.train.data import BatchIterator

    # sequence parallelism splits the sequence over TP ranks: lengths must divide by tp; FP8 GEMMs want 16 tokens
    align = 16 if policy.fp8 is not None else 8
    multiple = align * dist.tp // math.gcd(align, dist.tp)
    fixed = None
    if cfg.packing and policy.fixed_packed_length:
        # flex_attention is compiled for static shapes: one length for every packed batch (packed rows are nearly
        # full anyway), a whole number of its 128-token blocks
        block = 128 * dist.tp // math.gcd(128, dist.tp)
        fixed = -(-cfg.max_length // block) * block
    try:
        return BatchIterator(dataset, micro_batch_size=mbs, num_micro_batches=num_micro_batches,
                             dp_rank=dist.dp_rank, dp_size=dist.dp, seed=seed, pad_to_multiple_of=multiple,
                             fixed_length=fixed, packing=cfg.packing, max_length=cfg.max_length,
                             pad_token_id=pad_id, epochs=epochs)
    except ValueError as e:
        raise TrainError(str(e)) from None


def pick_run_dir(sft, source: Source, dist) -> Path:
    """Rank 0 creates output/{name}/v{N}-{time} (for this run alone) and checks it is writable; every rank gets the
    same answer."""
    from megatune.train.rundir import create_run_dir

    answer: list[Any] = [None, None]
    if dist.rank == 0:
        run_dir, reason = create_run_dir(sft.output_dir, source.name)
        answer = [str(run_dir), reason]
    if dist.world_size > 1:
        torch.distributed.broadcast_object_list(answer, src=0)
    if answer[1]:
        raise TrainError(f"--output_dir: {answer[1]}; pass a writable --output_dir")
    return Path(answer[0])


def wrap_model(chunks: list, policy: DevicePolicy) -> list:
    """megatron-core DDP over each chunk (Float16Module first for bf16/fp16, as Megatron-LM does).

    With `policy.overlap_grad_reduce` the gradient reduce(-scatter) overlaps the backward pass (buckets are reduced
    as soon as their gradients are complete; Megatron-LM's `--overlap-grad-reduce`); micro-batches before the last
    skip the reduction (`no_sync`), as Megatron-LM wires it."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    config = chunks[0].config
    # mean over the loss tokens of the whole global batch: see steps.py
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    if policy.precision != "fp32":
        chunks = [Float16Module(config, c) for c in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=policy.overlap_grad_reduce, average_in_collective=False,
        use_distributed_optimizer=policy.distributed_optimizer)
    model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
             for i, c in enumerate(chunks)]
    config.no_sync_func = config.grad_sync_func = None
    if policy.overlap_grad_reduce:
        one = len(model) == 1
        config.no_sync_func = model[0].no_sync if one else [m.no_sync for m in model]
        # pipeline stages start their reduce when their last backward is done, not at the end of the schedule
        config.grad_sync_func = model[0].start_grad_sync if one else [m.start_grad_sync for m in model]
    return model


def forward_kwargs_for(packing: bool):
    """GPTModel kwargs per micro-batch: document ids as the attention mask when packed (spec.py's interface)."""
    from megatune.train.spec import document_mask

    if packing:
        return lambda batch: {"attention_mask": document_mask(batch["document_ids"])}
    # unpacked rows are right-padded: plain causal attention never lets a real token see padding
    return lambda batch: {"attention_mask": None}


# ------------------------------------------------------------------------------------------------ the steps
def setup_parallel(sft):
    """Source, parallel sizes, device policy (installed), process groups: (source, parallel, policy, dist)."""
    from megatune.train import distributed
    from megatune.train.plan import refuse_unsupported, resolve_parallel, resolve_source
    from megatune.train.policy import Machine, Request, resolve_policy

    refuse_unsupported(sft)
    source = resolve_source(sft)
    parallel = resolve_parallel(sft, source, int(os.environ.get("WORLD_SIZE", "1")))
    policy = resolve_policy(Request.from_args(sft), Machine.detect(), parallel.dp)
    dist = distributed.init_distributed(parallel.tp, parallel.pp, ep=parallel.ep, seed=sft.seed, policy=policy)
    return source, parallel, policy, dist


def setup_data(sft, source: Source, parallel: Parallel, policy: DevicePolicy, dist) -> Data:
    from megatune.train.plan import resolve_batches

    tokenizer = load_tokenizer(source.path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg, train_ds, val_ds, stats = build_data(sft, tokenizer)
    sizes = resolve_batches(sft, parallel)
    mbs, num_micro = sft.batch_size, sizes.gradient_accumulation_steps
    common = dict(mbs=mbs, dist=dist, seed=sft.seed, cfg=cfg, pad_id=pad_id, policy=policy)
    train = batch_iterator(train_ds, num_micro_batches=num_micro, **common)
    val_micro = min(num_micro, len(val_ds) // (mbs * parallel.dp)) if len(val_ds) else 0
    make_val = None
    if val_micro > 0:
        # the validation set may be smaller than a training global batch: shrink accumulation, keep mbs and DP
        def make_val():
            return batch_iterator(val_ds, num_micro_batches=val_micro, epochs=1, **common)

    return Data(config=cfg, train=train, make_val=make_val, stats=stats, train_rows=len(train_ds),
                train_units=train.num_units, val_rows=len(val_ds))


def setup_plan(sft, source: Source, parallel: Parallel, policy: DevicePolicy, data: Data, dist) -> TrainingPlan:
    from megatune.train.plan import resolve_plan

    run_dir = pick_run_dir(sft, source, dist)
    return resolve_plan(sft, source, parallel, policy, train_rows=data.train_units, val_rows=data.val_rows,
                        run_dir=run_dir)


def setup_model(plan: TrainingPlan, data: Data, lora_run=None) -> tuple[list, list]:
    """(GPTModel chunks with the source's weights, the same wrapped in DDP); with LoRA (lora_checkpoint.LoraRun) the
    base's weights, frozen, with adapters attached before the wrap."""
    from megatune.train import checkpoint, lora, model
    from megatune.train.moe import MoESettings

    source = plan.source
    chunks = model.build_model(source.meta if source.kind != "hf" else source.hf_config, tp=plan.parallel.tp,
                               pp=plan.parallel.pp, params_dtype=plan.policy.params_dtype,
                               sequence_parallel=plan.parallel.sp,
                               recompute_granularity=plan.megatron.recompute_granularity, spec=plan.policy.layer_spec,
                               seq_length=data.config.max_length, moe=MoESettings.from_args(plan.megatron))
    checkpoint.load_pretrained(chunks, lora_run.base_path if lora_run else source.path)
    if lora_run is not None:
        lora.apply_lora(chunks, lora_run.config)
    return chunks, wrap_model(chunks, plan.policy)


def setup_optimizer(plan: TrainingPlan, chunks: list, ddp_chunks: list):
    from megatune.train import optim

    optimizer = optim.build_optimizer(ddp_chunks, plan.megatron, plan.policy)
    scheduler = optim.build_scheduler(optimizer, plan.megatron)
    # the schedules multiply the loss by the fp16 loss scale through this hook (1.0 for bf16/fp32), as Megatron-LM
    chunks[0].config.grad_scale_func = optimizer.scale_loss
    return optimizer, scheduler


def restore(plan: TrainingPlan, states: dict, note: Callable[[str], None]) -> int:
    """A continued run (source kind "run") gets every state back; returns the iteration to start after."""
    from megatune.train.formats import open_format

    if plan.source.kind != "run":
        return 0
    loaded = open_format(plan.source.path).load(states)  # the format on disk (torch_dist: at any layout)
    for line in loaded.notes:
        note(line)
    start = int(loaded.iteration)
    if start >= plan.train_iters:
        raise TrainError(f"{plan.source.path}: already at iteration {start} of {plan.train_iters}; raise --max_steps "
                         f"or --num_train_epochs to train further")
    return start


def build_run(sft, *, progress: bool = True):
    """Everything `trainer.train` needs, for this rank. Returns (Run, info dict for the CLI summary)."""
    from megatune.train import lora, steps
    from megatune.train.formats import open_format
    from megatune.train.lora_checkpoint import LoraModelState, plan_lora
    from megatune.train.rundir import RunLogger
    from megatune.train.states import ModelState, RNGState
    from megatune.train.trainer import Run

    source, parallel, policy, dist = setup_parallel(sft)
    lora_run = plan_lora(sft, source)  # None for --sft_type full
    note = log.warning if dist.rank == 0 else log.debug
    for line in policy.notes:
        note(line)
    data = setup_data(sft, source, parallel, policy, dist)
    plan = setup_plan(sft, source, parallel, policy, data, dist)
    chunks, ddp_chunks = setup_model(plan, data, lora_run)
    optimizer, scheduler = setup_optimizer(plan, chunks, ddp_chunks)
    if lora_run is not None:
        lora.check_optimizer(optimizer, ddp_chunks)  # the adapters, and nothing of the base
    model_state = (LoraModelState if lora_run else ModelState)(ddp_chunks)  # LoRA: only the adapters are saved
    states = {"model": model_state, "optimizer": optimizer, "scheduler": scheduler, "data": data.train,
              "rng": RNGState(policy.device_type)}
    start = restore(plan, states, note)

    meta = {**source.meta, "model_type": source.meta.get("model_type") or source.hf_config.get("model_type")}
    if lora_run is not None:
        meta["lora"] = lora_run.record(source.hf_config)
    saved = {k: states[k] for k in ("model", "data")} if sft.save_only_model else states
    logger = RunLogger(plan.run_dir, total_steps=plan.train_iters, start_step=start,
                       logging_dir=plan.megatron.tensorboard_dir, enabled=dist.rank == 0, progress=progress)
    logger.write_args(sft, plan.megatron, {**plan.describe(), "cpu_mode": policy.device_type == "cpu",
                                           "data": {k: v for k, v in data.stats.items() if isinstance(v, (int, float))},
                                           "start_iteration": start})
    run = Run(plan=plan, model=ddp_chunks, optimizer=optimizer, scheduler=scheduler, train_batches=data.train,
              make_val_batches=data.make_val, forward_step=steps.make_forward_step(forward_kwargs_for(sft.packing)),
              logger=logger, checkpoint=open_format(
                  plan.run_dir, sft.ckpt_format, meta=meta, aux_dir=source.path, async_save=sft.async_save,
                  save_safetensors=sft.save_safetensors),
              save_states=saved, device=dist.device, start_iteration=start, is_rank0=dist.rank == 0)
    info = {"run_dir": str(plan.run_dir), "source": str(source.path), "source_kind": source.kind, "tp": parallel.tp,
            "pp": parallel.pp, "dp": parallel.dp, "train_iters": plan.train_iters, "start_iteration": start,
            "global_batch_size": plan.global_batch_size, "train_rows": data.train_rows, "val_rows": data.val_rows}
    return run, info
