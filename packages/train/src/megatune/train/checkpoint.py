"""Load pretrained weights into GPTModel chunks; save and resume Megatron-LM legacy training checkpoints.

Layout: megatune.convert.ckpt_layout (file names, rank naming, atomic writes; DESIGN.md "Checkpoint formats"),
readable by Megatron-LM `--load` and by `megatune export --to_hf`. Each rank file holds model, checkpoint_version
3.0, iteration, args, optimizer, opt_param_scheduler, rng_state, extra and its own rank record; the directory also
gets megatune.json (tp/pp/layers/vocab padding/naming of THIS run) and the tokenizer and config files.

An iteration is written into a staging sibling (ckpt_layout.iteration_temp) and swapped into place by rank 0 after
a barrier, then the metadata files are replaced atomically and the tracker file last, so a crash never leaves a
half-written iteration or a damaged megatune.json behind the tracker. Only data-parallel rank 0 of each (tp, pp)
coordinate writes (the non-distributed optimizer's state is replicated over DP). Everything is read back through
ckpt_layout's allow-listed `torch.load(weights_only=True)`, megatron-core's distributed-optimizer shard included.
"""

from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatune.convert import ckpt_layout
from megatune.train import cpu_mode
from megatune.train.errors import TrainError

log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 3.0


def _torch_load(path: Path, rank: dict | None = None) -> dict:
    """The rank file through convert's allow-listed loader (ckpt_layout.safe_load), its recorded rank checked."""
    from megatune.convert.errors import ConvertError

    try:
        return ckpt_layout.load_rank_file(path, mmap=False, rank=rank)
    except ConvertError as e:
        raise TrainError(str(e)) from None


def _coords() -> tuple[int, int, int, int]:
    return (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank())


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _single(model_chunks) -> torch.nn.Module:
    if len(model_chunks) != 1:
        raise TrainError(f"{len(model_chunks)} model chunks: virtual pipeline stages are not supported; build "
                         f"the model with build_model (one chunk per rank)")
    return model_chunks[0]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # megatron-core DDP / Float16Module wrap the GPTModel as .module
        model = model.module
    return model


def _model_state(model) -> dict[str, torch.Tensor]:
    """GPTModel state dict without `_extra_state` entries (TE's fp8 metadata; empty for our spec)."""
    return {k: v for k, v in _unwrap(model).state_dict().items() if not k.endswith("_extra_state")}


def _naming(model) -> str:
    return "te" if getattr(_unwrap(model), "megatune_spec", "native") == "te" else "local"


def layers_per_stage(model) -> list[int]:
    """Layer count of every PP stage for this model's config (gathered from the config, not communicated)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    cfg = _unwrap(model).config
    return [get_num_layers_to_build(cfg, pp_rank=r) for r in range(cfg.pipeline_model_parallel_size)]


def _load_into(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load (names and shapes), ignoring `_extra_state`; one clear line on the first problem."""
    expected = _model_state(model)
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise TrainError(f"{source}: state-dict names do not match the model (missing {missing[:3]}"
                         f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                         f"{'...' if len(unexpected) > 3 else ''}); check tp/pp/layer-spec naming of the checkpoint")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise TrainError(f"{source}: tensor {k} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(expected[k].shape)}; the checkpoint was made for another tp or config")
    _unwrap(model).load_state_dict(state, strict=False)


def _source_kind(source_dir: Path) -> str:
    if ckpt_layout.is_megatron_dir(source_dir):
        return "megatron"
    if (source_dir / "config.json").is_file() and any(source_dir.glob("*.safetensors")):
        return "hf"
    raise TrainError(f"{source_dir}: not an HF model (config.json + *.safetensors) nor a Megatron checkpoint "
                     f"({ckpt_layout.TRACKER}); pass --model_id_or_path / --resume_from_checkpoint "
                     f"pointing at one")


def load_pretrained(model_chunks, source_dir, *, iteration: int | str | None = None) -> dict:
    """Load weights for this rank from an HF directory (sharded on the fly) or a Megatron legacy directory
    (resharded in memory when its tp/pp differ). Returns {"kind": "hf"|"megatron", "iteration": ...}."""
    from megatune.convert import api
    from megatune.convert.errors import ConvertError

    model = _single(model_chunks)
    source_dir = Path(source_dir)
    kind = _source_kind(source_dir)
    tp, pp, tp_rank, pp_rank = _coords()
    dtype = next(_unwrap(model).parameters()).dtype
    try:
        if kind == "hf":
            state = api.hf_to_megatron_rank(source_dir, tp=tp, pp=pp, tp_rank=tp_rank, pp_rank=pp_rank,
                                            naming=_naming(model), dtype=dtype,
                                            layers_per_stage=layers_per_stage(model))
            iteration = None
        else:
            meta = api.read_meta(source_dir)
            if meta.get("naming", "local") != _naming(model):
                raise TrainError(f"{source_dir}: checkpoint uses {meta.get('naming')!r} layer names but the model "
                                 f"was built with the {_naming(model)!r} spec; build with the matching spec "
                                 f"(spec='te' needs transformer-engine) or re-convert from HF")
            iteration = api.read_latest(source_dir) if iteration is None else iteration
            state = api.load_megatron_rank(source_dir, tp=tp, pp=pp, tp_rank=tp_rank, pp_rank=pp_rank,
                                           iteration=iteration)
    except ConvertError as e:
        raise TrainError(str(e)) from None
    _load_into(model, state, str(source_dir))
    return {"kind": kind, "iteration": iteration}


# ------------------------------------------------------------------------------------------------ RNG state
def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    np_state = (name, keys.tolist(), int(pos), int(has_gauss), float(cached))  # np.random.set_state accepts this
    state = {"random_rng_state": random.getstate(), "np_rng_state": np_state,
             "torch_rng_state": torch.get_rng_state(),
             "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
             "megatune_device": "cpu" if cpu_mode.is_cpu_mode() else "cuda"}
    if not cpu_mode.is_cpu_mode():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    here = "cpu" if cpu_mode.is_cpu_mode() else "cuda"
    saved = state.get("megatune_device", "cuda" if "cuda_rng_state" in state else "cpu")
    if saved != here:  # CPU and CUDA generator states have different formats
        log.warning("checkpoint RNG state was saved on %s, running on %s: device RNG streams not restored", saved, here)
        return
    if "cuda_rng_state" in state:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


# ------------------------------------------------------------------------------------------------ save / load
def run_meta(meta: dict, model_chunks) -> dict:
    """megatune.json for this run: the source's meta (or {"hf_config": ...}) with tp/pp/layers/vocab/naming/dtype
    taken from the live model, so `megatune export --to_hf` reads the shards exactly as they were written."""
    from megatune.convert.layout import padded_vocab_size

    model = _unwrap(_single(model_chunks))
    tp, pp, _, _ = _coords()
    hf = dict(meta["hf_config"])
    divisible = meta.get("make_vocab_size_divisible_by", 128)
    vocab = int(hf["vocab_size"])
    tied = bool(model.share_embeddings_and_output_weights)
    return {**meta, "format_version": meta.get("format_version", 1),
            "model_type": meta.get("model_type") or hf.get("model_type"),
            "architecture": meta.get("architecture") or (hf.get("architectures") or [None])[0],
            "hf_config": hf, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "tp": tp,
            "pp": pp, "layers_per_stage": layers_per_stage(model), "vocab_size": vocab,
            "padded_vocab_size": padded_vocab_size(vocab, divisible, tp), "make_vocab_size_divisible_by": divisible,
            "naming": _naming(model), "tied_embeddings": tied}


DISTRIB_OPTIM_FILE = ckpt_layout.DISTRIB_OPTIM  # kept for importers (runtime)


@contextlib.contextmanager
def _adam_steps_hidden(optimizer):
    """Hide torch AdamW's per-parameter `state["step"]` while megatron-core fills the distributed optimizer's state
    from distrib_optim.pt. Its loader (0.16, without TE/apex) copies every key of the live state from the file,
    which holds only param / exp_avg / exp_avg_sq (KeyError: 'step'); the step itself was already restored by
    load_state_dict from the param groups."""
    from megatune.train.fused import torch_optimizers

    hidden = [(st, st.pop("step")) for opt in torch_optimizers(optimizer) for st in opt.state.values() if "step" in st]
    try:
        yield
    finally:
        for st, step in hidden:
            st["step"] = step


def is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def save_checkpoint(ckpt_dir, iteration: int, model_chunks, *, optimizer=None, scheduler=None, extra: dict | None = None,
                    meta: dict, save_optim: bool = True, save_rng: bool = True, tokenizer_dir=None) -> Path:
    """Write iteration `iteration` (all ranks call this). Returns DIR/iter_%07d.

    `meta`: the source's megatune.json, or {"hf_config": <config.json dict>, "model_type": ...} when training
    started from an HF directory; tp/pp/layers/vocab/naming/dtype are filled from the live model (run_meta).
    `extra`: plain python values only (resume data position etc.). `tokenizer_dir`: where tokenizer/config files
    are copied from (the HF source directory), so `megatune export --to_hf` needs nothing else."""
    from megatune.convert import api

    model = _single(model_chunks)
    ckpt_dir = Path(ckpt_dir)
    tp, pp, tp_rank, pp_rank = _coords()
    tmp = ckpt_layout.iteration_temp(ckpt_dir, iteration)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    full_meta = run_meta(meta, model_chunks)
    if rank0:
        ckpt_layout.begin_iteration_temp(ckpt_dir, iteration)  # also clears stale leftovers of crashed saves
    _barrier()
    if parallel_state.get_data_parallel_rank() == 0:
        state = {"model": _model_state(model), "checkpoint_version": CHECKPOINT_VERSION, "iteration": int(iteration),
                 "args": api.megatron_args_namespace(full_meta, iteration=int(iteration)),
                 "extra": dict(extra or {}), ckpt_layout.RANK_KEY: ckpt_layout.rank_record(tp, tp_rank, pp, pp_rank)}
        if optimizer is not None and save_optim:
            state["optimizer"] = optimizer.state_dict()
        if scheduler is not None and save_optim:
            state["opt_param_scheduler"] = scheduler.state_dict()
        if save_rng:
            state["rng_state"] = [_rng_state()]
        rank_path = api.rank_file(ckpt_dir, iteration, tp_rank, pp_rank, pp)  # DIR/iter_X/mp_rank_../file
        path = tmp / rank_path.parent.name / rank_path.name
        path.parent.mkdir(parents=True, exist_ok=True)
        ckpt_layout.torch_save_atomic(state, path)
    _barrier()
    if optimizer is not None and save_optim and is_distributed_optimizer(optimizer):
        # Its fp32 master weights and Adam moments are sharded over DP and live outside state_dict(); like
        # Megatron-LM, gather them to DP rank 0 (a collective: every DP rank calls) into distrib_optim.pt.
        rank_path = api.rank_file(ckpt_dir, iteration, tp_rank, pp_rank, pp)
        shard = tmp / rank_path.parent.name / ckpt_layout.DISTRIB_OPTIM
        optimizer.save_parameter_state(str(shard))
        if shard.is_file():  # written by DP rank 0 only
            ckpt_layout.fsync_file(shard)
        _barrier()
    final = ckpt_dir / ckpt_layout.iteration_dir(iteration)
    if rank0:
        ckpt_layout.publish_iteration(ckpt_dir, iteration)  # atomic exchange when re-saving an iteration
        api.write_meta(ckpt_dir, full_meta)  # every file: temp sibling + fsync + rename
        if tokenizer_dir is not None:
            ckpt_layout.copy_aux_files(tokenizer_dir, ckpt_dir)
        api.write_latest(ckpt_dir, int(iteration))
    _barrier()
    return final


def load_checkpoint(ckpt_dir, model_chunks, optimizer=None, scheduler=None, *, iteration: int | None = None,
                    load_optim: bool = True, load_rng: bool = True) -> dict:
    """Resume: model (+ optimizer, scheduler, RNG when saved). Returns {"iteration", "extra", "meta"}."""
    from megatune.convert import api
    from megatune.convert.errors import ConvertError

    model = _single(model_chunks)
    ckpt_dir = Path(ckpt_dir)
    try:
        meta = api.read_meta(ckpt_dir)
        iteration = api.read_latest(ckpt_dir) if iteration is None else iteration
    except ConvertError as e:
        raise TrainError(str(e)) from None
    tp, pp, tp_rank, pp_rank = _coords()
    if (meta["tp"], meta["pp"]) != (tp, pp):
        if load_optim and optimizer is not None:
            raise TrainError(f"{ckpt_dir}: saved with tp={meta['tp']} pp={meta['pp']}, running tp={tp} pp={pp}; "
                             f"optimizer state cannot be resharded: resume with the same tp/pp, or load weights only "
                             f"(load_optim=False / --no_load_optim)")
        load_pretrained(model_chunks, ckpt_dir, iteration=iteration)
        return {"iteration": iteration, "extra": {}, "meta": meta}
    state = _torch_load(api.rank_file(ckpt_dir, iteration, tp_rank, pp_rank, pp),
                        ckpt_layout.rank_record(tp, tp_rank, pp, pp_rank))
    _load_into(model, state["model"], str(api.rank_file(ckpt_dir, iteration, tp_rank, pp_rank, pp)))
    if load_optim and optimizer is not None:
        if "optimizer" not in state:
            raise TrainError(f"{ckpt_dir}: iteration {iteration} has no optimizer state (saved with save_optim=False "
                             f"or converted from HF); load with load_optim=False")
        from megatune.train.fused import torch_optimizers, use_fused_adamw

        fused_kernel = any(g.get("fused") for opt in torch_optimizers(optimizer) for g in opt.param_groups)
        optimizer.load_state_dict(state["optimizer"])
        if is_distributed_optimizer(optimizer):
            # load_state_dict only allocated the sharded master weights / moments; fill them (collective over DP)
            with _adam_steps_hidden(optimizer):  # megatron-core's load_parameter_state, but allow-listed loading
                ckpt_layout.load_distributed_optimizer_state(
                    optimizer, ckpt_layout.distrib_optim_file(ckpt_dir, iteration, tp_rank, pp_rank, pp))
        if fused_kernel:  # load_state_dict restored the saved groups' kernel flags: keep this optimizer's choice
            use_fused_adamw(optimizer, devices=("cuda", "cpu"))
    if load_optim and scheduler is not None and "opt_param_scheduler" in state:
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if load_rng and "rng_state" in state:
        _set_rng_state(state["rng_state"][0])
    return {"iteration": state.get("iteration", iteration), "extra": state.get("extra", {}), "meta": meta}
