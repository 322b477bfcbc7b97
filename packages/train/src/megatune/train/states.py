"""What a training checkpoint holds: one `states` mapping of objects with `state_dict()` / `load_state_dict()`.

    states = {"model": ModelState(chunks), "optimizer": optimizer, "scheduler": scheduler,
              "data": train_batches, "rng": RNGState()}
    fmt.save(states, iteration);  fmt.load(states)            # fmt: a CheckpointFormat

megatron-core's optimizer and scheduler and megatune's BatchIterator already have both methods; `ModelState` (the
GPTModel's own names, without DDP/Float16Module prefixes or TE's `_extra_state`) and `RNGState` (python, numpy,
torch, device and megatron-core's tracker streams) supply them for the rest. A format decides where each state goes
on disk (checkpoint.LegacyFormat: Megatron-LM's rank files; a torch_dist format would write sharded state dicts of
the same mapping), so a second format is a second implementation of `CheckpointFormat`, not a change to the
trainer. Loading a subset of the states (weights only, no optimizer) is passing a smaller mapping.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from megatron.core import parallel_state
from megatune.train.errors import TrainError

log = logging.getLogger(__name__)


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What a format's `load` found: the iteration, the checkpoint's metadata, its extra values (all of them, also
    those no state asked for), and notes for the user."""

    iteration: int | str
    meta: dict
    extra: dict
    notes: tuple[str, ...] = ()


class CheckpointFormat(abc.ABC):
    """One on-disk format of training checkpoints in one directory. Every rank calls every method."""

    directory: Path

    @abc.abstractmethod
    def save(self, states: Mapping[str, Stateful], iteration: int) -> Path:
        """Write `states` as iteration `iteration`, atomically (a crash keeps the previous checkpoint)."""

    @abc.abstractmethod
    def load(self, states: Mapping[str, Stateful], iteration: int | None = None) -> Loaded:
        """Fill `states` from iteration `iteration` (None: the latest); refuse what cannot be restored exactly."""

    def latest(self) -> int | None:
        """The newest complete iteration (the tracker file, written last by every format), None when there is none."""
        from megatune.convert import ckpt_layout
        from megatune.convert.errors import ConvertError

        if not ckpt_layout.is_megatron_dir(self.directory):
            return None
        try:
            it = ckpt_layout.read_latest(self.directory)
        except ConvertError as e:
            raise TrainError(str(e)) from None
        return None if it == ckpt_layout.RELEASE else int(it)

    def meta_and_iteration(self, iteration: int | str | None = None) -> tuple[dict, int | str]:
        """(megatune.json, the iteration to load: `iteration`, or the tracker's when None), failures as one line."""
        from megatune.convert import ckpt_layout
        from megatune.convert.errors import ConvertError

        try:
            meta = ckpt_layout.read_meta(self.directory)
            return meta, ckpt_layout.read_latest(self.directory) if iteration is None else iteration
        except ConvertError as e:
            raise TrainError(str(e)) from None

    def finalize(self, blocking: bool = False) -> None:
        """Formats that write in the background publish the saves that have finished (every rank calls);
        `blocking`: wait for the one in flight. Synchronous formats have nothing to do."""
        return None


# Where each state goes in a checkpoint, in every format: those with a place of their own under Megatron-LM's names;
# any other state (the data position, a caller's values) goes into the checkpoint's `extra` dict, under its
# EXTRA_KEYS name when it has one.
FILE_KEYS = {"model": "model", "optimizer": "optimizer", "scheduler": "opt_param_scheduler", "rng": "rng_state"}
EXTRA_KEYS = {"data": "data_state"}


def extra_state_dicts(states: Mapping[str, Stateful]) -> dict[str, Any]:
    """The `extra` dict a checkpoint stores: every state without a place of its own, by its EXTRA_KEYS name."""
    return {EXTRA_KEYS.get(k, k): v.state_dict() for k, v in states.items() if k not in FILE_KEYS}


def load_extra_states(states: Mapping[str, Stateful], extra: Mapping[str, Any], where, directory, hint: str) -> None:
    """Fill the states without a place of their own from a checkpoint's `extra` dict; one line when one is missing
    (`where`: the file or directory named; `hint`: what to do) or refuses its value."""
    for key, obj in states.items():
        if key in FILE_KEYS:
            continue
        name = EXTRA_KEYS.get(key, key)
        if name not in extra:
            raise TrainError(f"{where}: no {name!r} in the checkpoint's extra state; it was not written by megatune "
                             f"sft: {hint}")
        try:
            obj.load_state_dict(extra[name])
        except ValueError as e:
            raise TrainError(f"{directory}: {e}") from None


# ------------------------------------------------------------------------------------------------ model
def single(model_chunks) -> torch.nn.Module:
    if len(model_chunks) != 1:
        raise TrainError(f"{len(model_chunks)} model chunks: virtual pipeline stages are not supported; build "
                         f"the model with build_model (one chunk per rank)")
    return model_chunks[0]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # megatron-core DDP / Float16Module wrap the GPTModel as .module
        model = model.module
    return model


def model_state(model) -> dict[str, torch.Tensor]:
    """GPTModel state dict without `_extra_state` entries (TE's fp8 metadata; empty for our spec)."""
    return {k: v for k, v in unwrap(model).state_dict().items() if not k.endswith("_extra_state")}


def load_model_state(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load (names and shapes), ignoring `_extra_state`; one clear line on the first problem."""
    expected = model_state(model)
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
    unwrap(model).load_state_dict(state, strict=False)


class ModelState:
    """This rank's model chunk (one; no virtual pipeline stages) as a Stateful."""

    def __init__(self, model_chunks) -> None:
        self.chunks = list(model_chunks)
        self.module = unwrap(single(self.chunks))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return model_state(self.module)

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        load_model_state(self.module, state, source)


# ------------------------------------------------------------------------------------------------ RNG
class RNGState:
    """Every random stream a step draws from: python, numpy, torch (CPU), the CUDA generator and megatron-core's
    tracker (TP-rank dropout streams). Stored as plain values (no numpy objects: the allow-listed loader needs none).
    CPU and CUDA generator states have different formats: across devices only the host streams are restored."""

    def __init__(self, device_type: str | None = None) -> None:
        if device_type is None:
            from megatune.train.policy import active

            device_type = active().device_type
        self.device_type = device_type

    def state_dict(self) -> dict:
        from megatron.core import tensor_parallel

        name, keys, pos, has_gauss, cached = np.random.get_state()
        np_state = (name, keys.tolist(), int(pos), int(has_gauss), float(cached))  # np.random.set_state accepts this
        state = {"random_rng_state": random.getstate(), "np_rng_state": np_state,
                 "torch_rng_state": torch.get_rng_state(),
                 "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
                 "megatune_device": self.device_type}
        if self.device_type == "cuda":
            state["cuda_rng_state"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        from megatron.core import tensor_parallel

        random.setstate(state["random_rng_state"])
        np.random.set_state(state["np_rng_state"])
        torch.set_rng_state(state["torch_rng_state"])
        saved = state.get("megatune_device", "cuda" if "cuda_rng_state" in state else "cpu")
        if saved != self.device_type:
            log.warning("checkpoint RNG state was saved on %s, running on %s: device RNG streams not restored", saved,
                        self.device_type)
            return
        if "cuda_rng_state" in state:
            torch.cuda.set_rng_state(state["cuda_rng_state"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


class Value:
    """A plain python value as a Stateful (e.g. a caller's own bookkeeping stored next to the data position)."""

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, state: Any) -> None:
        self.value = state


# ------------------------------------------------------------------ facts every format records about the live run
def parallel_coords() -> tuple[int, int, int, int]:
    return (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank())


def expert_coords() -> tuple[int, int]:
    """(ep, ep_rank): expert parallelism adds the ep rank to the rank file's name and record (ckpt_layout)."""
    return (parallel_state.get_expert_model_parallel_world_size(), parallel_state.get_expert_model_parallel_rank())


def naming_of(model) -> str:
    return "te" if getattr(unwrap(model), "megatune_spec", "native") == "te" else "local"


def layers_per_stage(model) -> list[int]:
    """Layer count of every PP stage for this model's config (gathered from the config, not communicated)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    cfg = unwrap(model).config
    return [get_num_layers_to_build(cfg, pp_rank=r) for r in range(cfg.pipeline_model_parallel_size)]


def run_meta(meta: dict, model_chunks) -> dict:
    """megatune.json for this run: the source's meta (or {"hf_config": ...}) with tp/pp/layers/vocab/naming/dtype
    taken from the live model, so `megatune export --to_hf` reads the shards exactly as they were written."""
    from megatune.convert.layout import padded_vocab_size

    model = unwrap(single(model_chunks))
    tp, pp, _, _ = parallel_coords()
    hf = dict(meta["hf_config"])
    divisible = meta.get("make_vocab_size_divisible_by", 128)
    vocab = int(hf["vocab_size"])
    tied = bool(model.share_embeddings_and_output_weights)
    return {**meta, "format_version": meta.get("format_version", 1),
            "model_type": meta.get("model_type") or hf.get("model_type"),
            "architecture": meta.get("architecture") or (hf.get("architectures") or [None])[0],
            "hf_config": hf, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "tp": tp,
            "pp": pp, "ep": expert_coords()[0], "layers_per_stage": layers_per_stage(model),
            "vocab_size": vocab,
            "padded_vocab_size": padded_vocab_size(vocab, divisible, tp), "make_vocab_size_divisible_by": divisible,
            "naming": naming_of(model), "tied_embeddings": tied}


def is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))
