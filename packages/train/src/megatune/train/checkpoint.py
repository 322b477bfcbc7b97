"""Load pretrained weights into GPTModel chunks; save and resume Megatron-LM legacy training checkpoints.

`LegacyFormat` is the legacy implementation of states.CheckpointFormat: it saves and loads one `states` mapping
(model, optimizer, scheduler, data position, RNG; see states.py). `save_checkpoint` / `load_checkpoint` spell the
states out for callers that hold the pieces separately.

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
import errno
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatune.convert import ckpt_layout
from megatune.convert.megatron_flags import write_megatron_args
from megatune.convert.torch_dist import is_torch_dist
from megatune.train.errors import TrainError
from megatune.train.states import (
    FILE_KEYS,
    CheckpointFormat,
    Loaded,
    ModelState,
    RNGState,
    Stateful,
    Value,
    extra_state_dicts,
    is_distributed_optimizer,
    layers_per_stage,
    load_extra_states,
    load_model_state,
    run_meta,
    single,
    unwrap,
)
from megatune.train.states import (
    expert_coords as _expert_coords,
)
from megatune.train.states import (
    naming_of as _naming,
)
from megatune.train.states import (
    parallel_coords as _coords,
)

log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 3.0


def _torch_load(path: Path, rank: dict | None = None) -> dict:
    """The rank file through convert's allow-listed loader (ckpt_layout.safe_load), its recorded rank checked."""
    from megatune.convert.errors import ConvertError

    try:
        return ckpt_layout.load_rank_file(path, mmap=False, rank=rank)
    except ConvertError as e:
        raise TrainError(str(e)) from None


def _writes_rank_file() -> bool:
    """One writer per (tp, pp, ep) coordinate: data-parallel rank 0, or with ep > 1 expert-data-parallel rank 0 (ep
    ranks are carved out of data parallelism and hold different experts)."""
    if _expert_coords()[0] > 1:
        return parallel_state.get_expert_data_parallel_rank() == 0
    return parallel_state.get_data_parallel_rank() == 0


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

    model = single(model_chunks)
    source_dir = Path(source_dir)
    kind = _source_kind(source_dir)
    tp, pp, tp_rank, pp_rank = _coords()
    ep, ep_rank = _expert_coords()
    dtype = next(unwrap(model).parameters()).dtype
    try:
        if kind == "hf":
            state = api.hf_to_megatron_rank(source_dir, tp=tp, pp=pp, tp_rank=tp_rank, pp_rank=pp_rank,
                                            naming=_naming(model), dtype=dtype,
                                            layers_per_stage=layers_per_stage(model), ep=ep, ep_rank=ep_rank)
            iteration = None
        else:
            meta = api.read_meta(source_dir)
            if meta.get("naming", "local") != _naming(model):
                raise TrainError(f"{source_dir}: checkpoint uses {meta.get('naming')!r} layer names but the model "
                                 f"was built with the {_naming(model)!r} spec; build with the matching spec "
                                 f"(spec='te' needs transformer-engine) or re-convert from HF")
            iteration = api.read_latest(source_dir) if iteration is None else iteration
            if is_torch_dist(source_dir):  # megatron-core's distributed format: any layout, via dist_checkpointing
                from megatune.train.torch_dist import TorchDistFormat

                TorchDistFormat(source_dir).load({"model": ModelState(model_chunks)}, iteration)
                return {"kind": kind, "iteration": iteration}
            state = api.load_megatron_rank(source_dir, tp=tp, pp=pp, tp_rank=tp_rank, pp_rank=pp_rank,
                                           iteration=iteration, ep=ep, ep_rank=ep_rank)
    except ConvertError as e:
        raise TrainError(str(e)) from None
    load_model_state(model, state, str(source_dir))
    return {"kind": kind, "iteration": iteration}


# ------------------------------------------------------------------------------------------------ save / load
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


def _load_optimizer(optimizer, state: dict, directory: Path, iteration, coords) -> tuple[str, ...]:
    """optimizer.load_state_dict (+ the distributed optimizer's sharded master weights and moments, a collective
    over DP). Without `distrib_optim.pt` the distributed optimizer's state dict is not loaded at all (its
    load_state_dict allocates master weights for load_parameter_state to fill): master weights are re-derived from
    the loaded model instead, so weights, schedule and data position resume exactly and Adam moments restart."""
    from megatune.train.fused import torch_optimizers, use_fused_adamw

    tp, pp, tp_rank, pp_rank = coords
    ep, ep_rank = _expert_coords()
    shard = ckpt_layout.distrib_optim_file(directory, iteration, tp_rank, pp_rank, pp, ep_rank=ep_rank, ep=ep)
    if is_distributed_optimizer(optimizer) and not shard.is_file():
        optimizer.reload_model_params()
        return (f"megatune sft: {directory} holds no distributed-optimizer state ({ckpt_layout.DISTRIB_OPTIM}); "
                f"weights, schedule and data position resume exactly, Adam moments restart from zero",)
    fused_kernel = any(g.get("fused") for opt in torch_optimizers(optimizer) for g in opt.param_groups)
    optimizer.load_state_dict(state["optimizer"])
    if is_distributed_optimizer(optimizer):
        with _adam_steps_hidden(optimizer):  # megatron-core's load_parameter_state, but allow-listed loading
            ckpt_layout.load_distributed_optimizer_state(optimizer, shard)
    if fused_kernel:  # load_state_dict restored the saved groups' kernel flags: keep this optimizer's choice
        use_fused_adamw(optimizer, devices=("cuda", "cpu"))
    return ()


def _nbytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict: about what its file takes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_nbytes(v) for v in obj.values())
    return sum(_nbytes(v) for v in obj) if isinstance(obj, (list, tuple)) else 0


@contextlib.contextmanager
def _atomic_torch_save(path: Path):
    """megatron-core's save_parameter_state torch.saves straight to `path`: on a full disk that is torch's "unexpected
    pos" and a torn file. Route that one write through ckpt_layout.torch_save_atomic (temp + fsync + rename; a failed
    write is one line naming the file)."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, Path)) and Path(f) == path:
            return ckpt_layout.torch_save_atomic(obj, path)
        return real(obj, f, *args, **kwargs)

    torch.save = save
    try:
        yield
    finally:
        torch.save = real


class LegacyFormat(CheckpointFormat):
    """Megatron-LM's legacy checkpoint (ckpt_layout; DESIGN.md "Checkpoint formats") over a `states` mapping.

    Where each state goes in a rank file: states.FILE_KEYS (Megatron-LM's names); any other state (the data
    position, a caller's values) goes into the file's `extra` dict (states.EXTRA_KEYS). The distributed
    optimizer's sharded state also goes to `distrib_optim.pt` next to the rank file, as Megatron-LM writes it.
    `meta`: the source's megatune.json (or {"hf_config": ..., "model_type": ...}), completed from the live model
    (run_meta) on save; `aux_dir`: where the tokenizer/config files are copied from."""

    after_write = None  # (staging dir, states, meta) -> None on every rank before publishing, e.g. hf_stream's HF dir

    def __init__(self, directory, *, meta: dict | None = None, aux_dir=None) -> None:
        self.directory, self.meta, self.aux_dir = Path(directory), meta, aux_dir

    def _rank_file(self, iteration) -> Path:
        tp, pp, tp_rank, pp_rank = _coords()
        ep, ep_rank = _expert_coords()
        return ckpt_layout.rank_file(self.directory, iteration, tp_rank, pp_rank, pp, ep_rank=ep_rank, ep=ep)

    def save(self, states: Mapping[str, Stateful], iteration: int) -> Path:
        """Every rank calls; DP rank 0 of each (tp, pp) writes its rank file into the staging dir, rank 0 swaps it in,
        then writes megatune.json, the aux files and the tracker (last). Each step is agreed over all ranks
        (torch_dist.all_ranks): a failed write (a full disk) stops every rank with one line, the staging dir removed."""
        from megatune.convert import api
        from megatune.train.torch_dist import all_ranks

        full_meta = run_meta(self.meta or {}, states["model"].chunks)
        tmp = ckpt_layout.iteration_temp(self.directory, iteration)
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        with all_ranks(self.directory, iteration):
            if rank0:
                ckpt_layout.begin_iteration_temp(self.directory, iteration)  # also clears stale leftovers
        rank_path = self._rank_file(iteration)
        staged = tmp / rank_path.parent.name / rank_path.name
        with all_ranks(self.directory, iteration):
            if _writes_rank_file():
                self._write_rank_file(states, iteration, full_meta, staged)
        if "optimizer" in states and is_distributed_optimizer(states["optimizer"]):
            # fp32 master weights and Adam moments are sharded over DP outside state_dict(); like Megatron-LM, gather
            # them to DP rank 0 (a collective: every DP rank calls) into distrib_optim.pt
            shard = staged.with_name(ckpt_layout.DISTRIB_OPTIM)
            with all_ranks(self.directory, iteration), _atomic_torch_save(shard):
                states["optimizer"].save_parameter_state(str(shard))  # written by DP rank 0 only
        if self.after_write is not None:
            with all_ranks(self.directory, iteration):
                self.after_write(tmp, states, full_meta)
        with all_ranks(self.directory, iteration):
            if rank0:
                ckpt_layout.publish_iteration(self.directory, iteration)  # atomic exchange when re-saving
                api.write_meta(self.directory, full_meta)  # every file: temp sibling + fsync + rename
                if self.aux_dir is not None:
                    ckpt_layout.copy_aux_files(self.aux_dir, self.directory)
                write_megatron_args(self.directory, full_meta, "torch")  # the Megatron-LM flags that load it
                api.write_latest(self.directory, int(iteration))  # last
        return self.directory / ckpt_layout.iteration_dir(iteration)

    def _write_rank_file(self, states: Mapping[str, Stateful], iteration: int, full_meta: dict, staged: Path) -> None:
        from megatune.convert import api, fileio
        from megatune.convert.errors import ConvertError

        tp, pp, tp_rank, pp_rank = _coords()
        extra = extra_state_dicts(states)
        state = {"model": states["model"].state_dict(), "checkpoint_version": CHECKPOINT_VERSION,
                 "iteration": int(iteration), "args": api.megatron_args_namespace(full_meta, iteration=int(iteration)),
                 "extra": extra,
                 ckpt_layout.RANK_KEY: ckpt_layout.rank_record(tp, tp_rank, pp, pp_rank, *_expert_coords())}
        for key in ("optimizer", "scheduler"):
            if key in states:
                state[FILE_KEYS[key]] = states[key].state_dict()
        if "rng" in states:
            state["rng_state"] = [states["rng"].state_dict()]
        staged.parent.mkdir(parents=True, exist_ok=True)
        try:
            ckpt_layout.torch_save_atomic(state, staged)
        except ConvertError as e:  # a full disk: say how much this file needs (fileio's line, with its size)
            cause = e.__context__  # the OSError that fileio turned into the line
            if not isinstance(cause, OSError) or cause.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise fileio.write_error(staged, cause, _nbytes(state)) from None

    def load(self, states: Mapping[str, Stateful], iteration: int | None = None) -> Loaded:

        meta, iteration = self.meta_and_iteration(iteration)
        coords = _coords()
        ep = _expert_coords()[0]
        if (meta["tp"], meta["pp"], meta.get("ep", 1)) != (*coords[:2], ep):
            if set(states) != {"model"}:
                raise TrainError(f"{self.directory}: saved with tp={meta['tp']} pp={meta['pp']} "
                                 f"ep={meta.get('ep', 1)}, running tp={coords[0]} pp={coords[1]} ep={ep}; optimizer "
                                 f"and data state cannot be resharded: resume with the same tp/pp/ep, or load the "
                                 f"weights only")
            load_pretrained(states["model"].chunks, self.directory, iteration=iteration)
            return Loaded(iteration, meta, {})
        path = self._rank_file(iteration)
        record = ckpt_layout.rank_record(coords[0], coords[2], coords[1], coords[3], *_expert_coords())
        state = _torch_load(path, record)
        states["model"].load_state_dict(state["model"], source=str(path))
        notes: tuple[str, ...] = ()
        if "optimizer" in states:
            if "optimizer" not in state:
                raise TrainError(f"{self.directory}: iteration {iteration} has no optimizer state (saved with "
                                 f"--save_only_model or converted from HF); load the weights only")
            notes = _load_optimizer(states["optimizer"], state, self.directory, iteration, coords)
        if "scheduler" in states and "opt_param_scheduler" in state:
            states["scheduler"].load_state_dict(state["opt_param_scheduler"])
        if "rng" in states and "rng_state" in state:
            states["rng"].load_state_dict(state["rng_state"][0])
        extra = state.get("extra", {})
        load_extra_states(states, extra, path, self.directory,
                          "start from it as weights (megatune export --to_hf, --model_id_or_path)")
        return Loaded(state.get("iteration", iteration), meta, extra, notes)


def save_checkpoint(ckpt_dir, iteration: int, model_chunks, *, optimizer=None, scheduler=None, extra: dict | None = None,
                    meta: dict, save_optim: bool = True, save_rng: bool = True, tokenizer_dir=None) -> Path:
    """LegacyFormat.save with the states spelled out (all ranks call this). Returns DIR/iter_%07d. `extra`: plain
    python values stored in the rank files' `extra` dict."""
    states: dict[str, Stateful] = {"model": ModelState(model_chunks)}
    if optimizer is not None and save_optim:
        states["optimizer"] = optimizer
    if scheduler is not None and save_optim:
        states["scheduler"] = scheduler
    if save_rng:
        states["rng"] = RNGState()
    states.update({k: Value(v) for k, v in (extra or {}).items()})
    return LegacyFormat(ckpt_dir, meta=meta, aux_dir=tokenizer_dir).save(states, iteration)


def load_checkpoint(ckpt_dir, model_chunks, optimizer=None, scheduler=None, *, iteration: int | None = None,
                    load_optim: bool = True, load_rng: bool = True) -> dict:
    """Resume: model (+ optimizer, scheduler, RNG when saved). Returns {"iteration", "extra", "meta"}."""
    states: dict[str, Stateful] = {"model": ModelState(model_chunks)}
    if optimizer is not None and load_optim:
        states["optimizer"] = optimizer
    if scheduler is not None and load_optim:
        states["scheduler"] = scheduler
    if load_rng:
        states["rng"] = RNGState()
    loaded = LegacyFormat(ckpt_dir).load(states, iteration)
    return {"iteration": loaded.iteration, "extra": loaded.extra, "meta": loaded.meta}
