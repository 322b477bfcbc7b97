"""`megatune export --ckpt_format torch_dist`: HF -> torch_dist (a release checkpoint) and torch_dist -> HF.

One process, no GPU. The names and global shapes of a torch_dist checkpoint are megatron-core's (GPTModel.
sharded_state_dict: layer axis, TP offsets, SwiGLU halves, an expert axis), so they are asked of the model itself:
the GPTModel is built at tp=1, pp=1 on the meta device (no initialisation) and given uninitialised CPU storage; the
HF tensors are loaded into it one at a time through its own `load_state_dict` (convert's names, which modules such
as the grouped MoE experts translate), and its sharded state dict is saved. Back to HF, the checkpoint is loaded
into such a model and its `state_dict()` split into HF tensors by convert's merge rules (QKV by group, [gate; up],
vocab padding): the rows `export --to_hf` uses, hence byte-identical round trips.

Memory: the model's weights once (dist_checkpointing writes a whole state dict at once); the legacy format streams
tensor by tensor instead. Loading goes through torch_dist.safe_loading (no arbitrary unpickling).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from megatune.convert import ckpt_layout
from megatune.convert.errors import ConvertError
from megatune.train.errors import TrainError

RELEASE = ckpt_layout.RELEASE


@contextlib.contextmanager
def _one_process():
    """A single-rank gloo group at tp=pp=1 with a CPU device policy (the export never runs a forward pass)."""
    from megatron.core import parallel_state
    from megatune.train import distributed
    from megatune.train.policy import Machine, Request, install, resolve_policy

    if parallel_state.model_parallel_is_initialized():
        raise TrainError("torch_dist export runs in its own process: call it outside a training job")
    import os

    env = {k: os.environ.pop(k, None) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    try:
        install(resolve_policy(Request(precision="fp32", distributed_optimizer=False), Machine(cuda=False), dp=1))
        distributed.init_distributed(1, 1)
        yield
    finally:
        distributed.destroy()
        os.environ.update({k: v for k, v in env.items() if v is not None})


def meta_model(meta: dict):
    """GPTModel at tp=1, pp=1 on the meta device (megatron-core's explicit `device=current_device()` allocations
    included), with the checkpoint's dtype, layer names and padded vocabulary."""
    from megatune.convert.megatron_io import DTYPES
    from megatune.train import model as model_mod

    real, rope = torch.cuda.current_device, model_mod.rope_inv_freq

    def cpu_rope(*args):  # RoPE frequencies are a small real buffer (megatron-core keeps them on the CPU)
        with torch.device("cpu"):
            return rope(*args)

    torch.cuda.current_device, model_mod.rope_inv_freq = (lambda: torch.device("meta")), cpu_rope
    try:
        with torch.device("meta"):
            [model] = model_mod.build_model(meta, tp=1, pp=1, params_dtype=DTYPES[meta["dtype"]],
                                            spec="te" if meta["naming"] == "te" else "native",
                                            make_vocab_size_divisible_by=meta["padded_vocab_size"])
    finally:
        torch.cuda.current_device, model_mod.rope_inv_freq = real, rope
    return model


def cpu_model(meta: dict):
    """meta_model with uninitialised CPU storage (the RoPE buffer is never used: no forward pass runs)."""
    return meta_model(meta).to_empty(device="cpu")


def _sharded(model) -> dict:
    from megatron.core import parallel_state

    md = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
          "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    return model.sharded_state_dict(metadata=md)


def _model_names(model) -> set[str]:
    return {k for k in model.state_dict() if not k.endswith("_extra_state")}


def fill_from_hf(model, hf_dir: Path, meta: dict, allow_nonfinite: bool) -> None:
    """Every HF tensor into `model` (tp=1), one at a time, through the model's own load_state_dict."""
    from megatune.convert.arch import shape_of
    from megatune.convert.hf_io import HFReader
    from megatune.convert.megatron_io import DTYPES
    from megatune.convert.plan import rank_part, stage_entries

    shape, dtype, loaded = shape_of(meta["hf_config"]), DTYPES[meta["dtype"]], set()
    reader = HFReader(hf_dir)
    try:
        for e in stage_entries(shape, [shape.layers], 0, meta["naming"], ep=1, ep_rank=0):
            t = rank_part(e, reader, shape, 1, 0, meta["padded_vocab_size"]).to(dtype)
            if not allow_nonfinite and t.is_floating_point() and not t.isfinite().all():
                raise TrainError(f"{hf_dir}: the weights of {e.name} ({', '.join(e.hf_names)}) hold NaN or Inf; "
                                 f"re-download them (or pass --allow_nonfinite true to export them anyway)")
            unexpected = model.load_state_dict({e.name: t}, strict=False).unexpected_keys
            if unexpected:
                raise TrainError(f"{hf_dir}: megatron-core's GPTModel has no tensor {unexpected[0]}")
            loaded.add(e.name)
    finally:
        reader.release()
    if _model_names(model) != loaded:
        raise TrainError(f"{hf_dir}: tensors not filled from HF: {sorted(_model_names(model) - loaded)[:3]}")


def release_meta(hf_dir: Path, *, tp: int, pp: int, dtype, model_type: str | None, naming: str,
                 make_vocab_size_divisible_by: int, layers_per_stage, ep: int) -> dict:
    """megatune.json of an export, as convert.hf_to_megatron writes it (tp/pp: the layout megatron_args.sh names)."""
    from megatune.convert.api import resolve_dtype, resolve_layers_per_stage
    from megatune.convert.arch import architecture, check_parallel, shape_of
    from megatune.convert.convert import FORMAT_VERSION
    from megatune.convert.hf_io import HFReader, read_config
    from megatune.convert.layout import padded_vocab_size
    from megatune.convert.megatron_io import dtype_name

    cfg = read_config(hf_dir)
    arch, shape = architecture(cfg, where=str(hf_dir / "config.json")), shape_of(cfg)
    check_parallel(shape, tp, where=str(hf_dir / "config.json"), ep=ep)
    reader = HFReader(hf_dir)
    to = resolve_dtype(dtype) or reader.dtype(reader.names()[0])
    reader.release()
    return {"format_version": FORMAT_VERSION, "model_type": model_type or arch.name, "architecture": arch.hf_class,
            "hf_config": cfg, "dtype": dtype_name(to), "tp": tp, "pp": pp,
            "layers_per_stage": resolve_layers_per_stage(shape.layers, pp, layers_per_stage), "ep": ep,
            "vocab_size": shape.vocab, "padded_vocab_size": padded_vocab_size(shape.vocab, make_vocab_size_divisible_by,
                                                                              tp),
            "make_vocab_size_divisible_by": make_vocab_size_divisible_by, "naming": naming, "tied_embeddings": shape.tied}


def hf_to_torch_dist(hf_dir, out_dir, *, tp: int = 1, pp: int = 1, dtype=None, model_type: str | None = None,
                     naming: str = "local", make_vocab_size_divisible_by: int = 128, layers_per_stage=None,
                     ep: int = 1, overwrite: bool = False, allow_nonfinite: bool = False) -> Path:
    """Write OUT (a torch_dist release checkpoint + megatune.json, megatron_args.sh, tokenizer) from an HF dir.
    NaN/Inf weights are refused (as the legacy export does) unless `allow_nonfinite`."""
    from megatron.core import dist_checkpointing
    from megatune.convert import api
    from megatune.convert.megatron_flags import write_megatron_args
    from megatune.train.torch_dist import CHECKPOINT_VERSION, FORMAT

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    meta = release_meta(hf_dir, tp=tp, pp=pp, dtype=dtype, model_type=model_type, naming=naming,
                        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                        layers_per_stage=layers_per_stage, ep=ep)
    with _one_process():
        model = cpu_model(meta)
        fill_from_hf(model, hf_dir, meta, allow_nonfinite)
        need = sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t)) + (1 << 20)
        with ckpt_layout.atomic_dir(out_dir, overwrite, inputs=[hf_dir], need=need, flag="--megatron_output_dir") as tmp:
            sd = {"model": _sharded(model), "args": api.megatron_args_namespace(meta),
                  "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0,
                  "megatune_layout": {"tp": 1, "pp": 1, "dp": 1, "ep": 1}}
            (tmp / RELEASE).mkdir()
            dist_checkpointing.save(sd, str(tmp / RELEASE))
            api.write_meta(tmp, meta)
            ckpt_layout.copy_aux_files(hf_dir, tmp)
            write_megatron_args(tmp, meta, FORMAT, final_dir=out_dir)
            api.write_latest(tmp, RELEASE)  # last
    return out_dir


def load_full_state(ckpt_dir: Path, meta: dict, iteration) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist iteration at tp=1, pp=1 (convert's names), read allow-listed."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatune.train.torch_dist import LOAD_ERRORS, load_error, safe_loading

    model = cpu_model(meta)
    sd = {k: v for k, v in _sharded(model).items() if isinstance(v, (ShardedTensor, ShardedTensorFactory))}
    path = ckpt_dir / ckpt_layout.iteration_dir(iteration)
    try:
        with safe_loading():
            loaded = dist_checkpointing.load({"model": sd}, str(path))
    except LOAD_ERRORS as e:
        raise load_error(path, e) from None
    missing = [k for k in model.load_state_dict(loaded["model"], strict=False).missing_keys
               if not k.endswith("_extra_state")]
    if missing:
        raise TrainError(f"{path}: the checkpoint lacks {missing[:3]}; it was saved for another model")
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def torch_dist_to_hf(ckpt_dir, out_dir=None, *, iteration=None, max_shard_size: int = 5 * 10**9,
                     overwrite: bool = False) -> Path:
    """Write an HF dir (safetensors, config, tokenizer) from a torch_dist checkpoint, at any saved layout."""
    from megatune.convert.arch import shape_of
    from megatune.convert.ckpt_layout import AUX_FILES, HF_CONFIG
    from megatune.convert.hf_io import HFWriter
    from megatune.convert.megatron_io import dtype_name

    ckpt_dir = Path(ckpt_dir)
    try:
        meta = ckpt_layout.read_meta(ckpt_dir)
        iteration = ckpt_layout.read_latest(ckpt_dir) if iteration is None else iteration
    except ConvertError as e:
        raise TrainError(str(e)) from None
    out_dir = Path(out_dir) if out_dir is not None else ckpt_dir / f"{meta['model_type']}-hf"
    shape = shape_of(meta["hf_config"])
    with _one_process():
        state = load_full_state(ckpt_dir, meta, iteration)
        tensors = dict(hf_tensors(state, meta, shape))
        specs = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
        need = sum(math.prod(s) * d.itemsize for _, s, d in specs) + (1 << 20)
        with ckpt_layout.atomic_dir(out_dir, overwrite, inputs=[ckpt_dir], need=need, flag="--hf_output_dir") as tmp:
            writer = HFWriter(tmp, specs, max_shard_size)
            for name, t in tensors.items():
                writer.write(name, t)
            writer.close()
            cfg = dict(meta["hf_config"])
            for key in ("torch_dtype", "dtype"):  # record the dtype the weights are now in
                if key in cfg or key == "torch_dtype":
                    cfg[key] = dtype_name(next(iter(tensors.values())).dtype)
            ckpt_layout.write_json_atomic(tmp / HF_CONFIG, cfg)
            ckpt_layout.copy_aux_files(ckpt_dir, tmp, [f for f in AUX_FILES if f != HF_CONFIG])
    return out_dir


def hf_tensors(state: dict[str, torch.Tensor], meta: dict, shape):
    """(HF name, tensor) in the order export --to_hf writes them, from whole (tp=1) Megatron tensors."""
    from megatune.convert.plan import is_tied_copy, sizes, stage_entries
    from megatune.convert.splits import VOCAB, split_full, unshard

    s = sizes(shape, 1, meta["padded_vocab_size"])
    for e in stage_entries(shape, [shape.layers], 0, meta["naming"], ep=1, ep_rank=None):
        if is_tied_copy(e):
            continue
        p = e.param
        full = unshard(p.kind, [state[e.name]], vocab_size=shape.vocab if p.kind == VOCAB else None)
        yield from zip(e.hf_names, split_full(p.fmt, full, e.hf_shapes, s))
