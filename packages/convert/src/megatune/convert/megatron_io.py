"""Megatron-LM's `args` for a legacy checkpoint (what `--load` reads with `--use-checkpoint-args`), and the
checkpoint-layout names re-exported for existing importers (ckpt_layout is their home: file names, rank naming,
tracker, megatune.json, allow-listed loading).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from megatune.convert.arch import megatron_model_args
from megatune.convert.ckpt_layout import (
    META,
    META_KEYS,
    iteration_dir,
    load_rank_file,
    rank_file,
    read_latest,
    read_meta,
    write_latest,
    write_meta,
)
from megatune.convert.ckpt_layout import TRACKER as LATEST

__all__ = ["LATEST", "META", "META_KEYS", "DTYPES", "dtype_name", "iteration_dir", "rank_file", "write_latest",
           "read_latest", "write_meta", "read_meta", "megatron_args_namespace", "load_rank_file"]
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
        expert_model_parallel_size=meta.get("ep", 1),
        expert_tensor_parallel_size=meta["tp"],
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
