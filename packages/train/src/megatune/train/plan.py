"""The training plan: resolved once from the arguments, the source checkpoint's metadata, the world size and the
machine; read-only (frozen) afterwards. Every later step reads it; none re-derives a size or a path.

    source   = resolve_source(sft)                         where the weights come from, and what kind they are
    parallel = resolve_parallel(sft, source, world_size)    tp / pp / dp / ep / sp, checked against the model
    policy   = resolve_policy(Request.from_args(sft), machine, parallel.dp)       policy.py
    batches  = batch_sizes(sft, parallel)                   micro-batch, accumulation, global batch (no data needed)
    ... data is built (packing fixes the number of training rows), rank 0 picks the run directory ...
    plan     = resolve_plan(sft, source, parallel, policy, train_rows=..., val_rows=..., run_dir=...)

Sources of weights (ms-swift's Megatron workflow):
- `--resume_from_checkpoint DIR`, a converted Megatron checkpoint: weights to start from (any tp/pp, resharded in
  memory), iteration 0, a new run dir `output/{basename DIR}/v{N}-{time}`;
- the same flag on a previous megatune run dir whose checkpoint holds optimizer state: the run continues
  (iteration, optimizer, scheduler, RNG, data position) in a new version dir next to the old one;
- unset: swift's default '{model_type}-tp{tp}-pp{pp}' (argmap's `default_checkpoint`) when that directory exists,
  else `--model_id_or_path HF_DIR` (or a cached hub id): HF weights sharded on the fly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from megatune.argmap import BatchSizes, MegatronArguments, SftArguments, batch_sizes, default_checkpoint, to_megatron
from megatune.train.errors import TrainError
from megatune.train.policy import DevicePolicy


@dataclasses.dataclass(frozen=True)
class Source:
    path: Path
    kind: Literal["hf", "megatron", "run"]  # "run": a megatune run dir to continue
    name: str  # the run dir's parent folder name under --output_dir
    meta: dict  # megatune.json (or {"hf_config": config.json, "model_type": ...} for HF); treat as read-only

    @property
    def hf_config(self) -> dict:
        return self.meta["hf_config"]


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


def resolve_source(sft: SftArguments) -> Source:
    from megatune.convert import api
    from megatune.convert.ckpt_layout import TRACKER, is_megatron_dir
    from megatune.convert.errors import ConvertError
    from megatune.convert.registry import resolve_weights

    given = sft.resume_from_checkpoint
    default = default_checkpoint(sft)
    path = given or default
    if path and Path(path).expanduser().is_dir():
        d = Path(path).expanduser().resolve()
        if not is_megatron_dir(d):
            raise TrainError(f"--resume_from_checkpoint {path}: no {TRACKER}, not a Megatron checkpoint; convert one "
                             f"with `megatune export --to_megatron true` or pass --model_id_or_path for HF weights")
        try:
            meta = api.read_meta(d)
        except ConvertError as e:
            raise TrainError(str(e)) from None
        if _is_run_dir(d):
            return Source(d, "run", d.parent.name, meta)
        return Source(d, "megatron", d.name, meta)
    if given or (default and not sft.model_id_or_path):
        raise TrainError(f"--resume_from_checkpoint {path}: no such directory; convert the HF model first "
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


@dataclasses.dataclass(frozen=True)
class Parallel:
    world_size: int
    tp: int
    pp: int
    dp: int
    ep: int = 1  # expert parallelism (carved out of dp, as megatron-core does); MoE plugs in here
    sp: bool = False  # sequence parallelism, effective only with tp > 1


def check_model_split(hf_config: dict, tp: int, pp: int, where: str = "config.json") -> None:
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


def resolve_parallel(sft: SftArguments, source: Source, world_size: int) -> Parallel:
    """Unset --tp/--pp follow the checkpoint (swift: `--resume_from_checkpoint ...-tp2-pp1` on 4 GPUs = TP2 x DP2)."""
    from megatune.train import moe

    tp, pp = sft.tp or source.meta.get("tp") or 1, sft.pp or source.meta.get("pp") or 1
    ep = sft.expert_model_parallel_size or source.meta.get("ep") or 1
    if world_size % (tp * pp):
        raise TrainError(f"--tp {tp} x --pp {pp} = {tp * pp} does not divide the world size {world_size}; launch a "
                         f"multiple of {tp * pp} processes (NPROC_PER_NODE x NNODES)")
    check_model_split(source.hf_config, tp, pp, where=f"{source.path}/config.json")
    where = f"{source.path}/config.json"
    shape = moe.moe_shape(source.hf_config, where)
    settings = dataclasses.replace(moe.MoESettings.from_args(_moe_args(sft)), ep=ep)
    moe.check_expert_parallel(shape, settings, tp=tp, pp=pp, world_size=world_size, where=where)
    from megatune.convert.torch_dist import is_torch_dist

    saved = (source.meta.get("tp"), source.meta.get("pp"), source.meta.get("ep", 1))
    if source.kind == "run" and saved != (tp, pp, ep) and not is_torch_dist(source.path):  # torch_dist reshards
        raise TrainError(f"{source.path}: run saved with tp={saved[0]} pp={saved[1]} ep={saved[2]}, this run has "
                         f"tp={tp} pp={pp} ep={ep}; optimizer state cannot be resharded: pass --tp {saved[0]} "
                         f"--pp {saved[1]} --expert_model_parallel_size {saved[2]} to continue it, "
                         f"or export it (`megatune export --ckpt_dir DIR --to_hf true`) and start from "
                         f"--model_id_or_path DIR/{source.meta.get('model_type')}-hf")
    if source.kind == "run" and (saved[2] > 1) != (ep > 1) and is_torch_dist(source.path):
        # megatron-core keeps expert parameters in an optimizer of their own only when ep > 1
        raise TrainError(f"{source.path}: run saved with ep={saved[2]}, this run has ep={ep}; optimizer state of a "
                         f"run with expert parallelism (separate expert optimizer) and one without cannot be loaded "
                         f"into each other: pass --expert_model_parallel_size {'2 or more' if saved[2] > 1 else 1}, "
                         f"or start from its weights (`megatune export --ckpt_dir DIR --to_hf true`)")
    # megatron-core's MoELayer refuses to train with tp > 1 without sequence parallelism: MoE turns it on
    return Parallel(world_size=world_size, tp=tp, pp=pp, dp=world_size // (tp * pp), ep=ep,
                    sp=(bool(sft.sequence_parallel) or shape is not None) and tp > 1)


def _moe_args(sft: SftArguments) -> dict:
    """The MoE flags under their Megatron-LM names (moe.MoESettings.from_args reads them)."""
    return {"expert_model_parallel_size": sft.expert_model_parallel_size, "moe_router_topk": sft.moe_router_topk,
            "moe_aux_loss_coeff": sft.moe_aux_loss_coeff, "moe_z_loss_coeff": sft.moe_z_loss_coeff,
            "moe_grouped_gemm": sft.moe_grouped_gemm, "moe_token_dispatcher_type": sft.moe_token_dispatcher_type}


def refuse_unsupported(sft: SftArguments) -> None:
    """Flags that are accepted by the parser (swift's vocabulary) but cannot be honoured: one ArgumentError (a
    usage error, checked before any process is launched) each."""
    from megatune.argmap import ArgumentError

    if sft.dataloader_num_workers > 1:
        raise ArgumentError("--dataloader_num_workers", f"{sft.dataloader_num_workers}: megatune builds batches from "
                            "pre-tokenized rows in the training process, with no worker processes", "pass 0 or 1")


def _as_run(sft: SftArguments, parallel: Parallel, policy: DevicePolicy, hf_config: dict) -> SftArguments:
    """The arguments as they will run (tp/pp/sp resolved, precision and optimizer after the device policy, MoE
    top-k / aux coefficient from the HF config when unset), the input of argmap's translation. Never stored: the plan
    keeps the user's arguments and the translation."""
    from megatune.train import moe

    if moe.moe_shape(hf_config) is not None:
        resolved = moe.MoESettings.from_args(_moe_args(sft)).resolve(hf_config)
        sft = dataclasses.replace(sft, moe_router_topk=resolved.topk, moe_aux_loss_coeff=resolved.aux_coeff)
    return dataclasses.replace(
        sft, tp=parallel.tp, pp=parallel.pp, expert_model_parallel_size=parallel.ep, sequence_parallel=parallel.sp,
        bf16=policy.precision == "bf16", fp16=policy.precision == "fp16",
        use_distributed_optimizer=policy.distributed_optimizer, transformer_impl=policy.layer_spec)


def resolve_batches(sft: SftArguments, parallel: Parallel) -> BatchSizes:
    """Micro-batch, accumulation and global batch: what the data iterator needs before the data's size is known."""
    return batch_sizes(dataclasses.replace(sft, tp=parallel.tp, pp=parallel.pp), world_size=parallel.world_size)


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    args: SftArguments  # as the user gave them (args.json)
    source: Source
    parallel: Parallel
    policy: DevicePolicy
    megatron: MegatronArguments  # hyperparameters, batch arithmetic, iterations and paths in Megatron-LM's names
    run_dir: Path

    @property
    def micro_batch_size(self) -> int:
        return int(self.megatron.micro_batch_size)

    @property
    def global_batch_size(self) -> int:
        return int(self.megatron.global_batch_size)

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.parallel.dp)

    @property
    def train_iters(self) -> int:
        return int(self.megatron.train_iters)

    def describe(self) -> dict:
        """The resolved parts args.json records next to the arguments."""
        return {"source": {"path": str(self.source.path), "kind": self.source.kind},
                "parallel": dataclasses.asdict(self.parallel),
                "policy": {k: v for k, v in dataclasses.asdict(self.policy).items() if k != "notes"}}


def resolve_plan(sft: SftArguments, source: Source, parallel: Parallel, policy: DevicePolicy, *, train_rows: int,
                 val_rows: int, run_dir: Path) -> TrainingPlan:
    """The plan, once: `train_rows` counts packed rows with --packing (what an iteration consumes). A batch size
    that does not divide raises argmap's ArgumentError (a usage error)."""
    megatron = to_megatron(_as_run(sft, parallel, policy, source.hf_config), world_size=parallel.world_size,
                           train_len=train_rows, val_len=val_rows, load=str(source.path), save=str(run_dir))
    return TrainingPlan(args=sft, source=source, parallel=parallel, policy=policy, megatron=megatron,
                        run_dir=Path(run_dir))
