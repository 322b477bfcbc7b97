"""The checkpoint layout: the one home of every file name in a checkpoint directory, of rank naming, of atomic
writes and directory swaps, of stale-leftover cleanup, and of allow-listed loading.

    DIR/latest_checkpointed_iteration.txt     TRACKER: "release" or an integer; replaced atomically, last
    DIR/megatune.json                         META: HF config, dtype, tp/pp, vocab padding, layer-spec naming
    DIR/megatron_args.sh                      MEGATRON_ARGS: the Megatron-LM flags that load the checkpoint
    DIR/config.json, tokenizer files          AUX_FILES, copied from the HF source
    DIR/{release|iter_%07d}/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt   RANK_FILE
                                                         .../distrib_optim.pt           DISTRIB_OPTIM

Rank directories are named as Megatron-LM's `get_checkpoint_name` names them: the pp part when pp > 1, the ep
part when expert parallelism is on. Every rank file also records its own coordinates (RANK_KEY), so a renamed or
swapped rank directory is refused instead of converting into a wrong model.

Writes never damage what was there: a file goes to a temporary sibling (`.NAME.tmp-HOST-PID`), is fsynced and
renamed into place, then its directory is fsynced. A directory is published by an atomic exchange with the old one
(Linux renameat2 RENAME_EXCHANGE) when it exists; where that is unsupported, two renames, and a kill between them
is undone on the next run (`recover`). Leftovers are removed only when provably stale: made on this host by a
process that is no longer running. Those primitives are implemented in fileio.py and re-exported here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import shutil
import socket
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from megatune.convert.errors import ConvertError
from megatune.convert.fileio import (  # the atomic-write primitives, re-exported: import them from here
    clean_stale,
    copy_file_atomic,
    dead_owner,
    exchange,
    free_bytes,
    fsync_dir,
    fsync_file,
    human_size,
    publish_dir,
    recover,
    temp_sibling,
    torch_save_atomic,
    write_bytes_atomic,
    write_error,
    write_json_atomic,
    write_text_atomic,
)

__all__ = [
    "TRACKER", "META", "MEGATRON_ARGS", "RANK_FILE", "DISTRIB_OPTIM", "RELEASE", "HF_CONFIG", "AUX_FILES",
    "RANK_DIR_GLOB", "RANK_KEY", "META_KEYS", "SAFE_GLOBALS", "iteration_dir", "rank_dir_name", "rank_file",
    "distrib_optim_file", "rank_record", "check_rank", "iteration_temp", "copy_aux_files", "clean_stale_leftovers",
    "begin_iteration_temp", "publish_iteration", "write_latest", "read_latest", "is_megatron_dir", "has_meta",
    "write_meta", "read_meta", "safe_load", "load_rank_file", "load_distributed_optimizer_state",
    "atomic_dir", "clean_stale", "contains", "copy_file_atomic", "exchange", "free_bytes", "fsync_dir",
    "fsync_file", "publish_dir", "recover", "temp_sibling", "torch_save_atomic", "write_bytes_atomic",
    "write_error", "write_json_atomic", "write_text_atomic",
]

TRACKER = "latest_checkpointed_iteration.txt"
META = "megatune.json"
MEGATRON_ARGS = "megatron_args.sh"
RANK_FILE = "model_optim_rng.pt"
DISTRIB_OPTIM = "distrib_optim.pt"
RELEASE = "release"
HF_CONFIG = "config.json"
# Copied into a checkpoint directory along with the weights, and back out on export (config, tokenizer, template).
AUX_FILES = (
    HF_CONFIG, "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
RANK_DIR_GLOB = "mp_rank_*"
RANK_KEY = "megatune_rank"  # in every rank file: {"tp", "tp_rank", "pp", "pp_rank", "ep", "ep_rank"}
OWNER = ".megatune-owner"  # "HOST PID" inside a training save's temporary iteration directory
# megatune.json keys and their types; read_meta refuses a value of another type with the file and key.
META_TYPES: dict[str, tuple[type, ...]] = {
    "format_version": (int,), "model_type": (str, type(None)), "architecture": (str, type(None)),
    "hf_config": (dict,), "dtype": (str,), "tp": (int,), "pp": (int,), "layers_per_stage": (list,),
    "vocab_size": (int,), "padded_vocab_size": (int,), "make_vocab_size_divisible_by": (int,), "naming": (str,),
    "tied_embeddings": (bool,),
}
META_KEYS = tuple(META_TYPES)
OPTIONAL_META_TYPES: dict[str, tuple[type, ...]] = {"ep": (int,), "lora": (dict, type(None))}
# The only non-tensor class a rank file pickles (Megatron-LM's args); RNG states are stored as plain values.
SAFE_GLOBALS = [argparse.Namespace]
torch.serialization.add_safe_globals(SAFE_GLOBALS)


# ------------------------------------------------------------------------------------------------ names
def iteration_dir(iteration: int | str | None) -> str:
    return RELEASE if iteration in (None, RELEASE) else f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """Megatron-LM's get_checkpoint_name: mp_rank_TT, + _PPP when pp > 1, + _EEE when expert parallelism is on."""
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name + (f"_{ep_rank:03d}" if ep > 1 else "")


def rank_file(ckpt_dir: str | Path, iteration: int | str | None, tp_rank: int, pp_rank: int, pp: int,
              ep_rank: int = 0, ep: int = 1) -> Path:
    return Path(ckpt_dir) / iteration_dir(iteration) / rank_dir_name(tp_rank, pp_rank, pp, ep_rank, ep) / RANK_FILE


def distrib_optim_file(ckpt_dir: str | Path, iteration: int | str | None, tp_rank: int, pp_rank: int, pp: int,
                       ep_rank: int = 0, ep: int = 1) -> Path:
    """The distributed optimizer's parameter-state shard, next to the rank file (Megatron-LM's name)."""
    return rank_file(ckpt_dir, iteration, tp_rank, pp_rank, pp, ep_rank, ep).with_name(DISTRIB_OPTIM)


def rank_record(tp: int, tp_rank: int, pp: int, pp_rank: int, ep: int = 1, ep_rank: int = 0) -> dict[str, int]:
    """What a rank file stores under RANK_KEY: its own coordinates."""
    return {"tp": tp, "tp_rank": tp_rank, "pp": pp, "pp_rank": pp_rank, "ep": ep, "ep_rank": ep_rank}


def check_rank(state: dict, path: Path, want: dict[str, int]) -> None:
    """Refuse a rank file whose recorded coordinates differ from where it sits (files written before the record
    existed carry none and are accepted)."""
    got = state.get(RANK_KEY)
    if not isinstance(got, dict):
        return
    if any(got.get(k, 1 if k == "ep" else 0) != v for k, v in want.items()):
        def show(r: dict) -> str:
            return (f"tp rank {r.get('tp_rank')} of tp={r.get('tp')}, pp rank {r.get('pp_rank')} of pp={r.get('pp')}"
                    + (f", ep rank {r.get('ep_rank')} of ep={r.get('ep')}" if r.get("ep", 1) > 1 else ""))
        raise ConvertError(f"{path}: written as {show(got)}, expected {show(want)}; rank directories were renamed, "
                           f"swapped or copied: restore the checkpoint as it was written")


def iteration_temp(ckpt_dir: str | Path, iteration: int | str) -> Path:
    """A training save's staging directory, the same name on every rank (rank 0 records its owner inside)."""
    return Path(ckpt_dir) / f".{iteration_dir(iteration)}.tmp"


def copy_aux_files(src: str | Path, dst: str | Path, names: Iterable[str] = AUX_FILES) -> list[str]:
    """Copy the config/tokenizer files that exist in `src` into `dst`, each atomically."""
    copied = []
    for name in names:
        if (Path(src) / name).is_file():
            copy_file_atomic(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def _stale_iteration_temp(path: Path) -> bool:
    """A training save's staging dir whose recorded owner is provably gone."""
    if not re.fullmatch(r"\.(iter_\d{7}|release)\.tmp", path.name):
        return False
    try:
        host, pid = (path / OWNER).read_text().split()
    except (OSError, ValueError):
        return False
    return dead_owner(host, pid)


def clean_stale_leftovers(ckpt_dir: str | Path) -> list[Path]:
    """Stale temp files and staging dirs of crashed saves in a checkpoint directory."""
    return clean_stale(ckpt_dir, also=_stale_iteration_temp)


def begin_iteration_temp(ckpt_dir: str | Path, iteration: int | str) -> Path:
    """Rank 0 of a training save: clean stale leftovers, then a fresh staging dir that records its owner."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_leftovers(ckpt_dir)
    tmp = iteration_temp(ckpt_dir, iteration)
    shutil.rmtree(tmp, ignore_errors=True)  # this run's own earlier attempt at the same iteration
    tmp.mkdir()
    (tmp / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    return tmp


def publish_iteration(ckpt_dir: str | Path, iteration: int | str) -> Path:
    """Rank 0, after every rank wrote its files into iteration_temp: swap it in as the iteration directory."""
    tmp, final = iteration_temp(ckpt_dir, iteration), Path(ckpt_dir) / iteration_dir(iteration)
    (tmp / OWNER).unlink(missing_ok=True)
    publish_dir(tmp, final)
    return final


# ------------------------------------------------------------------------------------------------ export output
def contains(outer: Path, inner: Path) -> bool:
    """True when `inner` is `outer` or lies inside it (symlinks resolved)."""
    outer, inner = Path(outer).resolve(), Path(inner).resolve()
    return outer == inner or outer in inner.parents


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool, *, inputs: Iterable[str | Path] = (), need: int | None = None,
               flag: str = "output") -> Iterator[Path]:
    """Yield a fresh temp sibling of out_dir to fill; publish it at out_dir on success, remove it on any error
    (a full disk becomes one line naming the file and the space needed). `inputs` may not be out_dir or lie inside
    it (--overwrite would delete them); `need`: bytes to be written, checked against the free space first."""
    out_dir = Path(out_dir)
    for src in inputs:
        if contains(out_dir, Path(src)):
            raise ConvertError(f"{flag} {out_dir}: is or contains the input {src}; writing there would delete the "
                               f"input: choose another output directory")
    parent = out_dir.parent
    for p in [parent, *parent.parents]:
        if p.exists() and not p.is_dir():
            raise ConvertError(f"{flag} {out_dir}: {p} is a file, not a directory; choose another output path")
    recover(out_dir)
    clean_stale(parent, out_dir.name)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConvertError(f"{flag} {out_dir}: exists and is a file, not a directory; remove it or choose another "
                           f"output path")
    if out_dir.exists() and not overwrite:
        raise ConvertError(f"{out_dir}: output directory exists; pass --overwrite true or choose another directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(parent, e) from None
    if need is not None and free_bytes(parent) < need:
        raise ConvertError(f"{out_dir}: not enough free space ({human_size(free_bytes(parent))} free, about "
                           f"{human_size(need)} needed); free some space or write to another filesystem")
    tmp = temp_sibling(out_dir)
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # first: the free space reported below is then real
        if isinstance(e, OSError):  # named by its final path: the temporary one is gone
            raise write_error(str(e.filename or out_dir).replace(str(tmp), str(out_dir)), e, need) from None
        if isinstance(e, ConvertError) and str(tmp) in str(e):
            raise ConvertError(str(e).replace(str(tmp), str(out_dir))) from None
        raise


# ------------------------------------------------------------------------------------------------ tracker, meta
def write_latest(ckpt_dir: str | Path, iteration: int | str) -> None:
    """Atomically replace the tracker file: readers see the old or the new iteration, never a partial file."""
    write_text_atomic(Path(ckpt_dir) / TRACKER, f"{RELEASE if iteration == RELEASE else int(iteration)}\n")


def read_latest(ckpt_dir: str | Path) -> int | str:
    path = Path(ckpt_dir) / TRACKER
    if not path.is_file():
        raise ConvertError(f"{path}: not found; is {ckpt_dir} a Megatron checkpoint directory "
                           f"(written by `megatune export --to_megatron true` or `megatune sft`)?")
    text = path.read_text(errors="replace").strip()
    if text == RELEASE:
        return RELEASE
    try:
        return int(text)
    except ValueError:
        raise ConvertError(f"{path}: expected 'release' or an iteration number, found {text!r}") from None


def is_megatron_dir(d: str | Path) -> bool:
    return (Path(d) / TRACKER).is_file()


def has_meta(d: str | Path) -> bool:
    return (Path(d) / META).is_file()


def write_meta(ckpt_dir: str | Path, meta: dict) -> None:
    missing = [k for k in META_KEYS if k not in meta]
    assert not missing, f"{META} needs {missing}"
    write_json_atomic(Path(ckpt_dir) / META, meta)


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def read_meta(ckpt_dir: str | Path) -> dict:
    """megatune.json, with every known key's type checked: one line naming the file and the key otherwise."""
    path = Path(ckpt_dir) / META
    if not path.is_file():
        raise ConvertError(f"{path}: not found; {ckpt_dir} was not written by megatune "
                           f"(convert the HF model with `megatune export --to_megatron true`)")
    try:
        meta = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: invalid JSON ({e}); the file is damaged: restore it from a copy") from None
    if not isinstance(meta, dict):
        raise ConvertError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ConvertError(f"{path}: missing keys {missing}")
    for key, types in {**META_TYPES, **OPTIONAL_META_TYPES}.items():
        if key in meta and not _type_ok(meta[key], types):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ConvertError(f"{path}: key {key!r} is {meta[key]!r}, expected {want}; the file was edited: "
                               f"restore it")
    for key in ("tp", "pp"):
        if meta[key] < 1:
            raise ConvertError(f"{path}: key {key!r} is {meta[key]}, expected a size >= 1; restore the file")
    if not all(_type_ok(n, (int,)) and n >= 0 for n in meta["layers_per_stage"]) or \
            len(meta["layers_per_stage"]) != meta["pp"]:
        raise ConvertError(f"{path}: key 'layers_per_stage' is {meta['layers_per_stage']!r}, expected pp={meta['pp']} "
                           f"layer counts; restore the file")
    return meta


# ------------------------------------------------------------------------------------------------ loading
def safe_load(path: str | Path, *, mmap: bool = False, meta_device: bool = False) -> Any:
    """torch.load with weights_only=True (allow-list: SAFE_GLOBALS), for every rank file and optimizer shard.
    meta_device=True reads only the pickle: tensors on the meta device, each storage carrying
    `_checkpoint_offset` (its byte offset in the file), so callers can read records directly."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: not found; the checkpoint is incomplete or was written with a different "
                           f"tp/pp than {META} says")
    try:
        if meta_device:
            return torch.load(path, map_location="meta", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{path}: cannot load ({first}); the file is corrupt or not a torch checkpoint") from None


def load_rank_file(path: str | Path, *, mmap: bool = True, meta: bool = False, rank: dict | None = None) -> dict:
    """A rank file (mmap keeps RSS to the pages touched); `rank`: the rank_record it must carry, when recorded."""
    state = safe_load(path, mmap=mmap, meta_device=meta)
    if not isinstance(state, dict):
        raise ConvertError(f"{path}: holds a {type(state).__name__}, not a checkpoint dict; the file is not a rank "
                           f"file")
    if rank is not None:
        check_rank(state, Path(path), rank)
    return state


def load_distributed_optimizer_state(optimizer: Any, path: str | Path) -> None:
    """megatron-core's `load_parameter_state`, with distrib_optim.pt read by safe_load (theirs is a bare torch.load,
    which unpickles arbitrary objects on torch < 2.6). Same control flow: DP rank 0 reads, every DP rank calls
    `load_parameter_state_from_dp_zero` (a collective); a chained optimizer's file is a list, one per optimizer."""
    chained = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    single = len(chained) == 1
    states = None
    for i, opt in enumerate(chained):
        stub = single and getattr(opt, "is_stub_optimizer", False)
        if stub or not hasattr(opt, "load_parameter_state_from_dp_zero"):
            continue
        if opt.data_parallel_group.rank() == 0 and states is None:
            states = [safe_load(path)] if single else safe_load(path)
        opt.load_parameter_state_from_dp_zero(states[i] if states else None)
