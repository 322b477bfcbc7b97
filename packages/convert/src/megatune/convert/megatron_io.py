"""The Megatron-LM legacy checkpoint layout (what `--load` reads with `--use-checkpoint-args`), plus megatune.json.

    DIR/latest_checkpointed_iteration.txt          "release" or an integer, replaced atomically, last
    DIR/{release|iter_%07d}/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt
    DIR/megatune.json                               HF config, dtype, tp/pp, vocab padding, layer-spec naming
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from megatune.convert.arch import megatron_model_args
from megatune.convert.errors import ConvertError

LATEST = "latest_checkpointed_iteration.txt"
META = "megatune.json"
META_KEYS = ("format_version", "model_type", "architecture", "hf_config", "dtype", "tp", "pp", "layers_per_stage",
             "vocab_size", "padded_vocab_size", "make_vocab_size_divisible_by", "naming", "tied_embeddings")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}

# The only non-tensor class our rank files pickle; Megatron-LM training checkpoints add numpy RNG state etc.,
# which callers that need them (megatune.train) allow-list themselves.
torch.serialization.add_safe_globals([argparse.Namespace])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def iteration_dir(iteration: int | str | None) -> str:
    return "release" if iteration in (None, "release") else f"iter_{int(iteration):07d}"


def rank_file(ckpt_dir: str | Path, iteration: int | str | None, tp_rank: int, pp_rank: int, pp: int) -> Path:
    rank = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return Path(ckpt_dir) / iteration_dir(iteration) / rank / "model_optim_rng.pt"


def write_latest(ckpt_dir: str | Path, iteration: int | str) -> None:
    """Atomically replace the tracker file: readers see the old or the new iteration, never a partial file."""
    path = Path(ckpt_dir) / LATEST
    tmp = path.with_name(f".{LATEST}.{os.getpid()}.tmp")
    tmp.write_text(f"{iteration}\n" if iteration == "release" else f"{int(iteration)}\n")
    os.replace(tmp, path)


def read_latest(ckpt_dir: str | Path) -> int | str:
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        raise ConvertError(f"{path}: not found; is {ckpt_dir} a Megatron checkpoint directory "
                           f"(written by `megatune export --to_megatron true` or `megatune sft`)?")
    text = path.read_text().strip()
    if text == "release":
        return "release"
    try:
        return int(text)
    except ValueError:
        raise ConvertError(f"{path}: expected 'release' or an iteration number, found {text!r}") from None


def write_meta(ckpt_dir: str | Path, meta: dict) -> None:
    missing = [k for k in META_KEYS if k not in meta]
    assert not missing, f"megatune.json needs {missing}"
    (Path(ckpt_dir) / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def read_meta(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / META
    if not path.is_file():
        raise ConvertError(f"{path}: not found; {ckpt_dir} was not written by megatune "
                           f"(convert the HF model with `megatune export --to_megatron true`)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: invalid JSON ({e})") from None
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ConvertError(f"{path}: missing keys {missing}")
    return meta


def megatron_args_namespace(meta: dict, **overrides: Any) -> argparse.Namespace:
    """An argparse.Namespace that Megatron-LM's `load_args_from_checkpoint` / `check_checkpoint_args` accept."""
    m = megatron_model_args(meta["hf_config"])
    scaling = m.pop("rope_scaling")
    llama3 = bool(scaling) and scaling.get("rope_type", scaling.get("type")) == "llama3"
    counts = meta["layers_per_stage"]
    dtype = DTYPES[meta["dtype"]]
    args = dict(
        m,
        seq_length=m["max_position_embeddings"],
        add_position_embedding=False,
        use_rotary_position_embeddings=True,
        rotary_percent=1.0,
        rotary_interleaved=False,
        rotary_seq_len_interpolation_factor=None,
        use_rope_scaling=llama3,
        rope_scaling_factor=float(scaling.get("factor", 8.0)) if llama3 else 8.0,
        apply_layernorm_1p=False,
        layernorm_epsilon=m["norm_epsilon"],
        padded_vocab_size=meta["padded_vocab_size"],
        make_vocab_size_divisible_by=meta["make_vocab_size_divisible_by"],
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=None,  # the tokenizer is copied into the checkpoint dir; pass --tokenizer-model DIR
        vocab_file=None,
        merge_file=None,
        tensor_model_parallel_size=meta["tp"],
        pipeline_model_parallel_size=meta["pp"],
        virtual_pipeline_model_parallel_size=None,
        num_layers_per_virtual_pipeline_stage=None,
        decoder_first_pipeline_num_layers=counts[0] if meta["pp"] > 1 and len(set(counts)) > 1 else None,
        decoder_last_pipeline_num_layers=counts[-1] if meta["pp"] > 1 and len(set(counts)) > 1 else None,
        transformer_impl="transformer_engine" if meta["naming"] == "te" else "local",
        data_parallel_random_init=False,
        consumed_train_samples=0,
        consumed_valid_samples=0,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    args.update(overrides)
    return argparse.Namespace(**args)


def load_rank_file(path: Path, *, mmap: bool = True, meta: bool = False) -> dict:
    """torch.load with weights_only=True (allow-list: argparse.Namespace); mmap keeps RSS to the pages touched.
    meta=True reads only the pickle: tensors on the meta device, each storage carrying `_checkpoint_offset`, its
    byte offset in the file (what torch.load sets for meta/fake loading), so callers can read records directly."""
    if not path.is_file():
        raise ConvertError(f"{path}: rank file not found; the checkpoint is incomplete or was written with a "
                           f"different tp/pp than megatune.json says")
    try:
        if meta:
            return torch.load(path, map_location="meta", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{path}: cannot load ({first}); the file is corrupt or not a torch checkpoint") from None
