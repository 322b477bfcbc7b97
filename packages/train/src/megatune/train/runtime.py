"""Build a training run from SftArguments: processes, source weights, data, model, optimizer, run dir.

Order matters and is the same on every rank (each step is deterministic, so all ranks fail or succeed together
and nobody is left waiting in a collective): CPU mode -> process groups -> source checkpoint -> tokenizer + data
-> Megatron arguments -> run dir (rank 0 picks it, broadcasts) -> model (+ weights) -> DDP -> optimizer ->
scheduler -> resume state.

Where the weights come from (ms-swift's Megatron workflow):
- `--resume_from_checkpoint DIR`, a converted Megatron checkpoint: weights to start from (any tp/pp, resharded in
  memory), iteration 0, a new run dir `output/{basename DIR}/v{N}-{time}`;
- the same flag on a previous megatune run dir whose checkpoint holds optimizer state: the run continues
  (iteration, optimizer, scheduler, RNG, data position) in a new version dir next to the old one;
- `--model_id_or_path HF_DIR` (or a cached hub id): HF weights sharded on the fly.

Precision on CPU: fp32 only (megatron-core's bf16/fp16 optimizer wrappers need CUDA); `--bf16 true`, which is
also swift's default (dtype AUTO), falls back to fp32 with a warning rather than failing every CPU command line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from megatune.train.errors import TrainError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Source:
    path: Path
    kind: str  # "hf" | "megatron" (weights only) | "run" (a megatune run dir to continue)
    name: str  # the run dir's parent folder name under --output_dir
    meta: dict  # megatune.json (or {"hf_config": config.json} for HF)


def _is_run_dir(d: Path) -> bool:
    """A megatune run dir whose checkpoint carries optimizer/scheduler/data state (not --save_only_model)."""
    from megatune.convert.ckpt_layout import is_megatron_dir

    args = d / "args.json"
    if not (args.is_file() and is_megatron_dir(d)):
        return False
    try:
        return not json.loads(args.read_text()).get("save_only_model", False)
    except (OSError, ValueError):
        return False


def resolve_source(sft) -> Source:
    from megatune.convert import api
    from megatune.convert.ckpt_layout import TRACKER, is_megatron_dir
    from megatune.convert.errors import ConvertError
    from megatune.convert.registry import resolve_weights

    resume = sft.resume_from_checkpoint
    defaulted = bool(sft.model_type) and resume == f"{sft.model_type}-tp{sft.tp or 1}-pp{sft.pp or 1}"
    if resume and Path(resume).expanduser().is_dir():
        d = Path(resume).expanduser().resolve()
        if not is_megatron_dir(d):
            raise TrainError(f"--resume_from_checkpoint {resume}: no {TRACKER}, not a Megatron "
                             f"checkpoint; convert one with `megatune export --to_megatron true` or pass "
                             f"--model_id_or_path for HF weights")
        try:
            meta = api.read_meta(d)
        except ConvertError as e:
            raise TrainError(str(e)) from None
        if _is_run_dir(d):
            return Source(d, "run", d.parent.name, meta)
        return Source(d, "megatron", d.name, meta)
    if resume and not (defaulted and sft.model_id_or_path):
        raise TrainError(f"--resume_from_checkpoint {resume}: no such directory; convert the HF model first "
                         f"(`megatune export --model_type {sft.model_type or 'T'} --to_megatron true --tp {sft.tp or 1} "
                         f"--pp {sft.pp or 1}`) or pass --model_id_or_path HF_DIR")
    if not sft.model_id_or_path and not sft.model_type:
        raise TrainError("no weights to train: pass --resume_from_checkpoint MEGATRON_DIR or --model_id_or_path HF_DIR")
    try:
        d = resolve_weights(sft.model_type, sft.model_id_or_path).resolve()
    except ConvertError as e:
        raise TrainError(str(e)) from None
    hf_config = json.loads((d / "config.json").read_text())
    return Source(d, "hf", d.name, {"hf_config": hf_config, "model_type": sft.model_type or hf_config.get("model_type")})


def check_parallel(hf_config: dict, tp: int, pp: int, where: str = "config.json") -> None:
    """The converter's tp constraints (megatron-core's asserts) plus pp <= layers, as one-line TrainErrors."""
    from megatune.convert.arch import check_parallel as check_tp
    from megatune.convert.arch import shape_of
    from megatune.convert.errors import ConvertError

    try:
        check_tp(shape_of(hf_config), tp, where)
    except ConvertError as e:
        raise TrainError(f"--tp {tp}: {e}") from None
    layers = int(hf_config["num_hidden_layers"])
    if pp > layers:
        raise TrainError(f"--pp {pp} is more than the model's {layers} layers; choose pp <= {layers}")


def cpu_precision(sft, cpu: bool) -> None:
    """On CPU, bf16/fp16 fall back to fp32 (see module docstring)."""
    if cpu and (sft.bf16 or sft.fp16):
        log.warning("megatune sft: CPU mode trains in fp32 (megatron-core's %s optimizer needs CUDA); "
                    "ignoring --%s true", "bf16" if sft.bf16 else "fp16", "bf16" if sft.bf16 else "fp16")
        sft.bf16 = sft.fp16 = False


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # missing/corrupt tokenizer files: one line with the directory
        raise TrainError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         f"the directory must hold tokenizer.json / tokenizer_config.json") from None


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


def batch_iterator(dataset, *, mbs: int, num_micro_batches: int, dist, seed: int, cfg, pad_id: int, epochs=None):
    from megatune.train.data import BatchIterator

    # sequence parallelism splits the sequence over TP ranks: lengths must divide by tp
    multiple = 8 * dist.tp // math.gcd(8, dist.tp)
    fixed = None
    if cfg.packing and dist.device.type == "cuda":
        # packed rows go through flex_attention, compiled for static shapes: one length for every batch (packed
        # rows are nearly full anyway), a whole number of its 128-token blocks
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
    """Rank 0 picks output/{name}/v{N}-{time} and checks it is writable; every rank gets the same answer."""
    from megatune.train.rundir import check_writable, next_version_dir

    answer: list[Any] = [None, None]
    if dist.rank == 0:
        run_dir = next_version_dir(sft.output_dir, source.name)
        answer = [str(run_dir), check_writable(run_dir)]
    if dist.world_size > 1:
        torch.distributed.broadcast_object_list(answer, src=0)
    if answer[1]:
        raise TrainError(f"--output_dir: {answer[1]}; pass a writable --output_dir")
    return Path(answer[0])


def wrap_model(chunks: list, margs, *, cpu: bool, overlap_grad_reduce: bool | None = None) -> list:
    """megatron-core DDP over each chunk (Float16Module first for bf16/fp16, as Megatron-LM does).

    With data parallelism on GPU the gradient reduce(-scatter) overlaps the backward pass by default (buckets are
    reduced as soon as their gradients are complete; Megatron-LM's `--overlap-grad-reduce`, on in Megatron-Bridge's
    recipes): `None` means on when DP > 1 and not in CPU mode. Micro-batches before the last skip the reduction
    (`no_sync`), as Megatron-LM wires it."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    config = chunks[0].config
    # mean over the loss tokens of the whole global batch: see steps.py
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce is None:
        overlap_grad_reduce = not cpu and ps.get_data_parallel_world_size() > 1
    if margs.bf16 or margs.fp16:
        chunks = [Float16Module(config, c) for c in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce, average_in_collective=False,
        use_distributed_optimizer=bool(margs.use_distributed_optimizer) and not cpu)
    model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
             for i, c in enumerate(chunks)]
    config.no_sync_func = config.grad_sync_func = None
    if overlap_grad_reduce:
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


def _lacks_distributed_optimizer_state(optimizer, ckpt_dir: Path, dist) -> bool:
    """True when `optimizer` is megatron-core's distributed optimizer and the checkpoint has no `distrib_optim.pt`.

    That optimizer keeps its fp32 master weights and Adam moments outside `state_dict()` (Megatron-LM writes them to
    `distrib_optim.pt`); its `load_state_dict` allocates them uninitialised for `load_parameter_state` to fill. Without
    the file we must not load its state dict at all: we re-derive the master weights from the loaded model weights
    instead, so training continues from the checkpoint's weights and schedule with fresh Adam moments."""
    from megatune.train.checkpoint import is_distributed_optimizer

    if not is_distributed_optimizer(optimizer):
        return False
    from megatune.convert import ckpt_layout

    iteration = ckpt_layout.read_latest(ckpt_dir)
    return not ckpt_layout.distrib_optim_file(ckpt_dir, iteration, dist.tp_rank, dist.pp_rank, dist.pp).is_file()


def build_run(sft, *, progress: bool = True):
    """Everything `trainer.train` needs, for this rank. Returns (Run, info dict for the CLI summary)."""
    from megatune.argmap.mapping import to_megatron, with_parallel_defaults
    from megatune.train import checkpoint, cpu_mode, distributed, model, optim, steps
    from megatune.train.rundir import RunLogger
    from megatune.train.trainer import Run

    cpu = cpu_mode.enable()
    cpu_precision(sft, cpu)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    source = resolve_source(sft)
    # unset --tp/--pp follow the checkpoint (swift: `--resume_from_checkpoint ...-tp2-pp1` on 4 GPUs = TP2 x DP2)
    sft = with_parallel_defaults(sft, source.meta.get("tp"), source.meta.get("pp"))
    if world_size % (sft.tp * sft.pp):
        raise TrainError(f"--tp {sft.tp} x --pp {sft.pp} = {sft.tp * sft.pp} does not divide the world size "
                         f"{world_size}; launch a multiple of {sft.tp * sft.pp} processes (NPROC_PER_NODE x NNODES)")
    hf_config = source.meta["hf_config"]
    check_parallel(hf_config, sft.tp, sft.pp, where=f"{source.path}/config.json")
    saved = (source.meta.get("tp"), source.meta.get("pp"))
    if source.kind == "run" and saved != (sft.tp, sft.pp):
        raise TrainError(f"{source.path}: run saved with tp={saved[0]} pp={saved[1]}, this run has tp={sft.tp} "
                         f"pp={sft.pp}; optimizer state cannot be resharded: pass --tp {saved[0]} --pp {saved[1]} to "
                         f"continue it, or export it (`megatune export --ckpt_dir DIR --to_hf true`) and start from "
                         f"--model_id_or_path DIR/{source.meta.get('model_type')}-hf")
    dist = distributed.init_distributed(sft.tp, sft.pp, seed=sft.seed)

    tokenizer = load_tokenizer(source.path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data_cfg, train_ds, val_ds, stats = build_data(sft, tokenizer)
    margs = to_megatron(sft, world_size=dist.world_size, train_len=len(train_ds), val_len=len(val_ds))
    gbs, mbs = int(margs.global_batch_size), int(margs.micro_batch_size)
    num_micro = gbs // (mbs * dist.dp)
    train_batches = batch_iterator(train_ds, mbs=mbs, num_micro_batches=num_micro, dist=dist, seed=sft.seed,
                                   cfg=data_cfg, pad_id=pad_id)
    if data_cfg.packing and sft.max_steps <= 0:  # iterations count packed rows, not samples
        margs = to_megatron(sft, world_size=dist.world_size, train_len=train_batches.num_units, val_len=len(val_ds))

    make_val = None
    val_micro = min(num_micro, len(val_ds) // (mbs * dist.dp)) if len(val_ds) else 0
    if val_micro > 0:
        # the validation set may be smaller than a training global batch: shrink accumulation, keep mbs and DP
        def make_val():
            return batch_iterator(val_ds, mbs=mbs, num_micro_batches=val_micro, dist=dist, seed=sft.seed,
                                  cfg=data_cfg, pad_id=pad_id, epochs=1)

    run_dir = pick_run_dir(sft, source, dist)
    margs.save, margs.load = str(run_dir), str(source.path)
    margs.tensorboard_dir = sft.logging_dir or str(run_dir / "runs")

    params_dtype = torch.bfloat16 if margs.bf16 else (torch.float16 if margs.fp16 else torch.float32)
    chunks = model.build_model(source.meta if source.kind != "hf" else hf_config, tp=sft.tp, pp=sft.pp,
                               params_dtype=params_dtype, sequence_parallel=sft.sequence_parallel,
                               recompute_granularity=margs.recompute_granularity,
                               spec="native" if data_cfg.packing else "auto", seq_length=data_cfg.max_length)
    checkpoint.load_pretrained(chunks, source.path)
    ddp_chunks = wrap_model(chunks, margs, cpu=cpu)
    note = log.warning if dist.rank == 0 else log.debug
    optimizer = optim.build_optimizer(ddp_chunks, margs, cpu=cpu, note=note)
    scheduler = optim.build_scheduler(optimizer, margs)
    # the schedules multiply the loss by the fp16 loss scale through this hook (1.0 for bf16/fp32), as Megatron-LM
    chunks[0].config.grad_scale_func = optimizer.scale_loss

    start = 0
    if source.kind == "run":
        fresh_moments = _lacks_distributed_optimizer_state(optimizer, source.path, dist)
        state = checkpoint.load_checkpoint(source.path, ddp_chunks, None if fresh_moments else optimizer, scheduler)
        start = int(state["iteration"])
        if fresh_moments:
            optimizer.reload_model_params()
            note(f"megatune sft: {source.path} holds no distributed-optimizer state (distrib_optim.pt); weights, "
                 f"schedule and data position resume exactly, Adam moments restart from zero")
        data_state = state["extra"].get("data_state")
        if data_state is None:
            raise TrainError(f"{source.path}: checkpoint has no data position; it was not written by megatune sft")
        try:
            train_batches.load_state_dict(data_state)
        except ValueError as e:
            raise TrainError(f"{source.path}: {e}") from None
        if start >= int(margs.train_iters):
            raise TrainError(f"{source.path}: already at iteration {start} of {margs.train_iters}; raise --max_steps "
                             f"or --num_train_epochs to train further")

    meta = dict(source.meta)
    meta.setdefault("model_type", hf_config.get("model_type"))

    def save(ckpt_dir, iteration, model_chunks, optimizer, scheduler, extra):
        return checkpoint.save_checkpoint(ckpt_dir, iteration, model_chunks, optimizer=optimizer,
                                          scheduler=scheduler, extra=extra, meta=meta,
                                          save_optim=not sft.save_only_model, save_rng=not sft.save_only_model,
                                          tokenizer_dir=source.path)

    logger = RunLogger(run_dir, total_steps=int(margs.train_iters), start_step=start,
                       logging_dir=margs.tensorboard_dir, enabled=dist.rank == 0, progress=progress)
    logger.write_args(sft, margs, {"source": {"path": str(source.path), "kind": source.kind},
                                   "data": {k: v for k, v in stats.items() if isinstance(v, (int, float))},
                                   "cpu_mode": cpu, "start_iteration": start})
    run = Run(args=margs, model=ddp_chunks, optimizer=optimizer, scheduler=scheduler, train_batches=train_batches,
              make_val_batches=make_val, forward_step=steps.make_forward_step(forward_kwargs_for(data_cfg.packing)),
              logger=logger, save_dir=str(run_dir), save_checkpoint=save, device=dist.device,
              world_size=dist.world_size, hf_config=hf_config, params_dtype=params_dtype, start_iteration=start,
              save_only_model=sft.save_only_model, is_rank0=dist.rank == 0)
    info = {"run_dir": str(run_dir), "source": str(source.path), "source_kind": source.kind, "tp": dist.tp,
            "pp": dist.pp, "dp": dist.dp, "train_iters": int(margs.train_iters), "start_iteration": start,
            "global_batch_size": gbs, "train_rows": len(train_ds), "val_rows": len(val_ds)}
    return run, info
