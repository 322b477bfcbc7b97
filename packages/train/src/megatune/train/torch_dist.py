"""torch_dist: megatron-core's distributed checkpoint format, the second implementation of states.CheckpointFormat.

    DIR/latest_checkpointed_iteration.txt, megatune.json, megatron_args.sh, tokenizer/config files   (ckpt_layout)
    DIR/iter_%07d/metadata.json, common.pt, .metadata, __R_N.distcp                          (dist_checkpointing)

The format of Megatron-LM, NeMo, Megatron-Bridge and ms-swift 3+. Every tensor is stored as a slice of a global
tensor (GPTModel.sharded_state_dict: decoder layers stacked on a layer axis, TP splits as global offsets, SwiGLU's
fc1 as two halves), so a checkpoint saved at one (tp, pp, dp) loads at another. The sharded state dict is laid out
as Megatron-LM's `generate_state_dict` lays it out, so Megatron-LM loads it (`megatron_args.sh`):
- model: GPTModel.sharded_state_dict;
- optimizer: optimizer.sharded_state_dict(model) — Adam moments as global tensors beside their parameters; the
  distributed optimizer as 'fully_reshardable' (Megatron-LM's --dist-ckpt-optim-fully-reshardable), so it too
  reshards over TP/PP/DP;
- common (rank 0's common.pt): args, iteration, checkpoint_version, opt_param_scheduler, megatune's `extra`
  (data position and other plain values) and the saving layout;
- rng_state: one ShardedObject per (pp, tp) rank, as Megatron-LM; restored only when the layout is unchanged
  (a resharded run continues with fresh device RNG streams, noted once).

Writes are atomic like the legacy format: the iteration is written into a staging sibling, fsynced, swapped in by
rank 0, then megatune.json, megatron_args.sh and the tracker (last). With `async_save` the tensors are written by a
forked process (megatron-core's AsyncCallsQueue) while training goes on; `finalize()` publishes a finished save, so
a kill during the write leaves the previous checkpoint as the latest one.

Loading never unpickles arbitrary objects: megatron-core reads common.pt, ShardedObjects and `_extra_state` with
torch.load and torch's DCP reads `.metadata` with pickle.load. Inside `safe_loading()` every torch.load is
weights_only (torch's allow-list plus ckpt_layout's and megatron-core's registered classes) and `.metadata` goes
through an unpickler that admits only torch.distributed.checkpoint's metadata classes.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from megatune.convert import ckpt_layout, fileio
from megatune.convert.errors import ConvertError
from megatune.convert.megatron_flags import checkpoint_format, write_megatron_args
from megatune.train.errors import TrainError
from megatune.train.states import (
    CheckpointFormat,
    Loaded,
    Stateful,
    extra_state_dicts,
    is_distributed_optimizer,
    load_extra_states,
    run_meta,
    unwrap,
)
from torch.distributed.checkpoint.api import CheckpointException

log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 3.0
FORMAT = "torch_dist"
_DCP = "torch.distributed.checkpoint"
LOAD_ERRORS = (Exception, CheckpointException)  # megatron-core and torch DCP raise many kinds
# What `.metadata` may hold: torch DCP's own metadata/plan records, torch.Size, dtypes and layouts.
_METADATA_GLOBALS = {
    f"{_DCP}.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                         "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    f"{_DCP}.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem",
                        "LoadItemType"},
    f"{_DCP}.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        ok = name in _METADATA_GLOBALS.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)))
        if not ok:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a torch_dist checkpoint's .metadata")
        return super().find_class(module, name)


class _SafePickle:
    """Stands in for the `pickle` module inside torch.distributed.checkpoint.filesystem while loading."""

    dump, dumps, HIGHEST_PROTOCOL = pickle.dump, pickle.dumps, pickle.HIGHEST_PROTOCOL

    @staticmethod
    def load(file):
        return _MetadataUnpickler(file).load()


@contextlib.contextmanager
def safe_loading():
    """Every torch.load weights_only and an allow-listed `.metadata` unpickler, for the duration of a load."""
    filesystem = importlib.import_module(f"{_DCP}.filesystem")
    real_load, real_pickle = torch.load, filesystem.pickle

    def weights_only_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    torch.load, filesystem.pickle = weights_only_load, _SafePickle
    try:
        yield
    finally:
        torch.load, filesystem.pickle = real_load, real_pickle


def load_error(path: Path, e: BaseException) -> TrainError:
    """One line for a failed load: torch DCP's CheckpointException unwrapped; for a refused unpickle, the global."""
    failures = getattr(e, "failures", None)
    if failures:
        inner = next(iter(failures.values()))
        e = inner[0] if isinstance(inner, tuple) else inner
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    why = next((ln for ln in lines if "GLOBAL" in ln or "global " in ln), lines[0] if lines else type(e).__name__)
    return TrainError(f"{path}: cannot load ({why}); the checkpoint is damaged or holds objects outside the "
                      f"allow-list: restore it from a copy")


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _one_line(e: BaseException, tmp: Path, final: Path) -> BaseException:
    """A failed save step as the user's one line, named by the final path (the staging dir goes); a bug stays."""
    if isinstance(e, CheckpointException):  # torch DCP: {rank: (error, traceback)}, on the coordinator only
        inner = next(iter(e.failures.values()), None)
        inner = inner[0] if isinstance(inner, tuple) else inner
        code = re.search(r"\[Errno (\d+)\]", str(inner))  # a writer process's OSError, passed on as text
        e = OSError(int(code[1]), os.strerror(int(code[1]))) if code else TrainError(
            f"{tmp}: cannot write ({inner or 'on another rank'})")
    if isinstance(e, OSError):
        e = fileio.write_error(e.filename or tmp, e)
    return type(e)(str(e).replace(str(tmp), str(final))) if isinstance(e, (TrainError, ConvertError)) else e


@contextlib.contextmanager
def all_ranks(directory: Path, iteration):
    """One step of saving `iteration`, agreed over all ranks (a collective that stands for the barrier): when it
    failed on any rank, rank 0 removes the staging dir and every rank raises (none waits forever): a failing rank
    its own one-line error, the others a TrainError carrying the first failing rank's line (rank 0 prints it)."""
    tmp, error = ckpt_layout.iteration_temp(directory, iteration), None
    try:
        yield
    except (Exception, CheckpointException) as e:  # (a BaseException); raised again below, on every rank
        error = _one_line(e, tmp, directory / ckpt_layout.iteration_dir(iteration))
    lines = [None if error is None else (str(error).strip().split("\n")[0] or type(error).__name__)]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        mine, lines = lines[0], [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(lines, mine)
    failed = [(rank, text) for rank, text in enumerate(lines) if text is not None]
    if failed and _rank0():
        shutil.rmtree(tmp, ignore_errors=True)
    if error is not None or failed:  # the others: the first failing rank's line, which rank 0 prints
        raise error if error is not None else TrainError(f"rank {failed[0][0]} could not save: {failed[0][1]}")


def _layout() -> dict[str, int]:
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(), "ep": ps.get_expert_model_parallel_world_size()}


def _content_metadata(optimizer) -> dict:
    """Megatron-LM's `_build_sharded_state_dict_metadata` for this run (what is stored in metadata.json)."""
    md = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if optimizer is not None and is_distributed_optimizer(optimizer):
        md["distrib_optim_sharding_type"] = "fully_reshardable"
    return md


def _fsync_tree(root: Path) -> None:
    for d, _, files in os.walk(root):
        for f in files:
            ckpt_layout.fsync_file(Path(d) / f)
        ckpt_layout.fsync_dir(d)


@contextlib.contextmanager
def _quiet_not_empty():
    """dist_checkpointing.save warns 'Overwriting old incomplete' for our staging dir (it holds its owner record, as
    expected), and its writer logs a failed write (a full disk) that all_ranks reports in one line."""
    names = ("serialization", "strategies.filesystem_async")
    loggers = {lg: lg.level for lg in (logging.getLogger(f"megatron.core.dist_checkpointing.{n}") for n in names)}
    for lg, level in zip(loggers, (logging.ERROR, logging.CRITICAL)):
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, level in loggers.items():
            lg.setLevel(level)


class TorchDistFormat(CheckpointFormat):
    """megatron-core dist_checkpointing over a `states` mapping (module docstring). `meta`: the source's
    megatune.json (completed from the live model on save); `aux_dir`: where tokenizer/config files are copied from;
    `async_save`: write tensors in a forked process while training goes on (call `finalize`)."""

    def __init__(self, directory, *, meta: dict | None = None, aux_dir=None, async_save: bool = False) -> None:
        self.directory, self.meta, self.aux_dir, self.async_save = Path(directory), meta, aux_dir, async_save
        self._queue = None  # async_save.AsyncWriter, created on the first async save
        # (staging dir, states, meta) -> None, every rank, before publishing: e.g. hf_stream's HF dir
        self.after_write = None

    # ------------------------------------------------------------------------------------------- state dicts
    def _sharded(self, states: Mapping[str, Stateful], *, loading: bool, with_rng: bool) -> dict:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        optimizer = states.get("optimizer")
        md = {**_content_metadata(optimizer), "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
        sd = {"model": unwrap(states["model"].module).sharded_state_dict(metadata=md)}
        if optimizer is not None:
            sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=loading, metadata=md)
        if with_rng and "rng" in states:
            lay = _layout()
            sd["rng_state"] = ShardedObject(
                "rng_state", None if loading else [states["rng"].state_dict()], (lay["pp"], lay["tp"]),
                (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                replica_id=ps.get_data_parallel_rank(with_context_parallel=True))
        return sd

    # ------------------------------------------------------------------------------------------- save
    def save(self, states: Mapping[str, Stateful], iteration: int) -> Path:
        """Every rank calls. Sync: returns when the checkpoint is published. Async: returns once the write has
        started (an earlier async save is finished first); `finalize()` publishes it."""
        from megatron.core import dist_checkpointing
        from megatune.convert import api

        self.finalize(blocking=True)  # one save in flight at a time
        full_meta = run_meta(self.meta or {}, states["model"].chunks)
        tmp = ckpt_layout.iteration_temp(self.directory, iteration)
        with all_ranks(self.directory, iteration):  # a failed step stops every rank with one line; the staging dir goes
            if _rank0():
                ckpt_layout.begin_iteration_temp(self.directory, iteration)  # also clears stale leftovers
        sd = self._sharded(states, loading=False, with_rng=True)
        sd.update({"args": api.megatron_args_namespace(full_meta, iteration=int(iteration)),
                   "checkpoint_version": CHECKPOINT_VERSION, "iteration": int(iteration),
                   "megatune_layout": _layout(), "megatune_optimizer": _content_metadata(states.get("optimizer")),
                   "extra": extra_state_dicts(states)})
        if "scheduler" in states:
            sd["opt_param_scheduler"] = states["scheduler"].state_dict()
        with _quiet_not_empty(), all_ranks(self.directory, iteration):
            request = dist_checkpointing.save(sd, str(tmp), async_sharded_save=self.async_save,
                                              content_metadata=_content_metadata(states.get("optimizer")))
        if self.after_write is not None:  # while an async write goes on, too
            with all_ranks(self.directory, iteration):
                self.after_write(tmp, states, full_meta)
        if request is None:
            self._publish(iteration, full_meta)
        else:
            from megatune.train.async_save import AsyncWriter

            self._queue = self._queue or AsyncWriter()
            self._queue.schedule(request, int(iteration), lambda: self._publish(iteration, full_meta))
        return self.directory / ckpt_layout.iteration_dir(iteration)

    def _publish(self, iteration: int, full_meta: dict) -> None:
        """After every rank's files are written (a collective): make them durable and swap the iteration in."""
        from megatune.convert import api

        _barrier()
        with all_ranks(self.directory, iteration):
            if _rank0():
                _fsync_tree(ckpt_layout.iteration_temp(self.directory, iteration))
                ckpt_layout.publish_iteration(self.directory, iteration)  # atomic exchange when re-saving
                api.write_meta(self.directory, full_meta)
                if self.aux_dir is not None:
                    ckpt_layout.copy_aux_files(self.aux_dir, self.directory)
                write_megatron_args(self.directory, full_meta, FORMAT)
                api.write_latest(self.directory, int(iteration))  # last

    def finalize(self, blocking: bool = False) -> list[int]:
        """Publish async saves whose writes have finished on every rank (all ranks call; a collective).
        `blocking`: wait for the one in flight. Returns the finalized call indices."""
        return [] if self._queue is None else self._queue.finalize(blocking, where=str(self.directory))

    # ------------------------------------------------------------------------------------------- load
    def load(self, states: Mapping[str, Stateful], iteration: int | None = None) -> Loaded:
        """Fill `states` from the checkpoint at any (tp, pp, dp); RNG streams only at the saving layout."""
        from megatron.core import dist_checkpointing

        meta, iteration = self.meta_and_iteration(iteration)
        path = self.directory / ckpt_layout.iteration_dir(iteration)
        if checkpoint_format(self.directory, iteration) != FORMAT:
            raise TrainError(f"{path}: not a torch_dist checkpoint (no metadata.json); load it with the legacy "
                             f"format (--ckpt_format torch)")
        try:
            with safe_loading():
                common = dist_checkpointing.load_common_state_dict(str(path))
                if "optimizer" in states and "optimizer" not in common:
                    raise TrainError(f"{self.directory}: iteration {iteration} has no optimizer state (saved with "
                                     f"--save_only_model); load the weights only")
                saved_md = common.get("megatune_optimizer", _content_metadata(None))
                if "optimizer" in states and saved_md != _content_metadata(states["optimizer"]):
                    kind = "the distributed" if "distrib_optim_sharding_type" in saved_md else "a replicated"
                    raise TrainError(f"{self.directory}: optimizer state was saved by {kind} optimizer, this run uses "
                                     f"the other kind; pass --use_distributed_optimizer "
                                     f"{str('distrib_optim_sharding_type' in saved_md).lower()} (the distributed "
                                     f"optimizer needs a GPU), or load the weights only")
                same = common.get("megatune_layout") == _layout()
                sd = self._sharded(states, loading=True, with_rng=same and "rng_state" in _sharded_keys(path))
                loaded = dist_checkpointing.load(sd, str(path))
        except TrainError:
            raise
        except LOAD_ERRORS as e:
            raise load_error(path, e) from None
        self._restore(states, loaded, common)
        notes = () if same or "rng" not in states else (
            f"megatune sft: {self.directory} was saved at {common.get('megatune_layout')}, this run is {_layout()}: "
            f"weights, optimizer, schedule and data position resharded; random streams restart from the seed",)
        return Loaded(common.get("iteration", iteration), meta, dict(common.get("extra", {})), notes)

    def _restore(self, states: Mapping[str, Stateful], loaded: dict, common: dict) -> None:
        from megatune.train.fused import torch_optimizers, use_fused_adamw

        model = unwrap(states["model"].module)
        missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise TrainError(f"{self.directory}: state-dict names do not match the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); check the model type and layer-spec naming")
        if "optimizer" in states:
            optimizer = states["optimizer"]
            fused = any(g.get("fused") for opt in torch_optimizers(optimizer) for g in opt.param_groups)
            with _adam_step_kept(optimizer):
                optimizer.load_state_dict(loaded["optimizer"])
            if fused:  # load_state_dict restored the saved groups' kernel flags: keep this optimizer's choice
                use_fused_adamw(optimizer, devices=("cuda", "cpu"))
        if "scheduler" in states and "opt_param_scheduler" in common:
            states["scheduler"].load_state_dict(common["opt_param_scheduler"])
        if "rng" in states and "rng_state" in loaded:
            states["rng"].load_state_dict(loaded["rng_state"][0])
        extra = common.get("extra", {})
        load_extra_states(states, extra, self.directory, self.directory, "start from it as weights")


@contextlib.contextmanager
def _adam_step_kept(optimizer):
    """megatron-core 0.16's distributed optimizer, loading 'fully_reshardable' state, copies every key of the live
    torch AdamW state (param, exp_avg, exp_avg_sq, step) from the loaded tensors, which skip "step" (it comes from
    the param groups): KeyError 'step' without TE/apex. Copy the others, keep the step it set."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)]
    for opt in patched:
        def set_states(model_param, tensors, opt=opt, real=opt._set_main_param_and_optimizer_states):
            group, order = opt.model_param_group_index_map[model_param]
            state = opt.optimizer.state.get(opt.optimizer.param_groups[group]["params"][order], {})
            step = state.pop("step", None) if "step" not in tensors else None
            try:
                real(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        opt._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # the class's method again


def _sharded_keys(path: Path) -> set[str]:
    """Top-level keys of the sharded part (what `.metadata` lists), e.g. whether rng_state was saved."""
    from megatron.core.dist_checkpointing.strategies.torch import _get_filesystem_reader

    md = _get_filesystem_reader(path).read_metadata()
    return {k.split("/")[0].split(".")[0] for k in md.state_dict_metadata}
