"""The Megatron-LM command-line flags that load a megatune checkpoint: `megatron_args.sh` beside every Megatron
checkpoint megatune writes, and the same flags as one line at the end of the command's output.

Why the file exists: `--use-checkpoint-args` does not rebuild the model from a checkpoint's `args`. Megatron-LM's
`load_args_from_checkpoint` (megatron/training/checkpointing.py, read at core_v0.16.1) copies a fixed list of
fields (layer counts, sizes, heads, GQA, rope base/percent, bias, SwiGLU, RMSNorm, tied embeddings, dropout, MoE
sizes and top-k, padded vocab) and leaves every other field at its command-line value. Left at their defaults, a
megatune checkpoint silently becomes another model:
- `qk_layernorm` (Qwen3): strict loading fails on q/k_layernorm and Megatron-LM retries with strict=False, so it
  trains a model without its q/k norms;
- `--norm-epsilon` (dest `layernorm_epsilon`): 1e-5 instead of Qwen2's 1e-6, logits off by ~6e-3;
- `use_rope_scaling` / `rope_scaling_factor` (Llama 3.1), `bf16` / `fp16`, the uneven first/last pipeline stages,
  `transformer_impl` (default `transformer_engine`: other parameter names), the MoE aux-loss coefficient and
  shared-expert gate;
- `tokenizer_model` (None in the args: the tokenizer is in the checkpoint directory), the parallel sizes (compared
  by `check_checkpoint_args` for a legacy checkpoint, read back only with `--use-mp-args-from-checkpoint-args`) and
  `ckpt_format` (read back only when unset, and its default is torch_dist).
The flags are derived from the same `args` Namespace that is stored in the checkpoint, so the two cannot disagree;
packages/convert/tests/test_megatron_flags.py replays Megatron-LM's reading rules (as data) to prove it per family.

What Megatron-LM 0.16.1's `gpt_builders.py` cannot express at all (it hands GPTModel only `use_rope_scaling`, so the
llama3 factor is fixed at 8 with low/high frequency factors 1/4 and an 8192 original context; no linear scaling) is
written as a NOTE in the file and in the output instead of being silently lost.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path

from megatune.convert.ckpt_layout import MEGATRON_ARGS, write_text_atomic

__all__ = ["CKPT_FORMATS", "MEGATRON_LM_RULES", "Flag", "MODEL_FLAGS", "load_flags", "cautions", "script_text",
           "write_megatron_args", "command_line", "checkpoint_format", "output_lines"]

CKPT_FORMATS = ("torch", "torch_dist")  # megatune's --ckpt_format values, spelled as Megatron-LM's --ckpt-format
MEGATRON_LM_RULES = "NVIDIA/Megatron-LM core_v0.16.1 (55ac708), megatron/training/checkpointing.py"
_DIR = "${CKPT_DIR}"  # the checkpoint directory inside megatron_args.sh (the script finds itself)


@dataclass(frozen=True)
class Flag:
    """One Megatron-LM flag for a field of the stored `args` that `load_args_from_checkpoint` does not copy."""

    dest: str  # the key in the checkpoint's args Namespace (megatron_io.megatron_args_namespace)
    flag: str  # Megatron-LM's spelling
    switch: bool = False  # store_true: given when the value is true, absent when false (Megatron-LM's default)
    moe: bool = False  # only for a model with experts (args.num_experts set)
    unless_equals: str | None = None  # left out when equal to this field (Megatron-LM then derives the same value)


# Model fields not read back (see the module docstring); a row is used when the Namespace has the field set.
MODEL_FLAGS: tuple[Flag, ...] = (
    Flag("tensor_model_parallel_size", "--tensor-model-parallel-size"),
    Flag("pipeline_model_parallel_size", "--pipeline-model-parallel-size"),
    Flag("expert_model_parallel_size", "--expert-model-parallel-size", moe=True),
    Flag("expert_tensor_parallel_size", "--expert-tensor-parallel-size", moe=True,
         unless_equals="tensor_model_parallel_size"),
    Flag("decoder_first_pipeline_num_layers", "--decoder-first-pipeline-num-layers"),
    Flag("decoder_last_pipeline_num_layers", "--decoder-last-pipeline-num-layers"),
    Flag("transformer_impl", "--transformer-impl"),
    Flag("norm_epsilon", "--norm-epsilon"),
    Flag("qk_layernorm", "--qk-layernorm", switch=True),
    Flag("use_rope_scaling", "--use-rope-scaling", switch=True),
    Flag("rope_scaling_factor", "--rope-scaling-factor"),
    Flag("bf16", "--bf16", switch=True),
    Flag("fp16", "--fp16", switch=True),
    Flag("moe_aux_loss_coeff", "--moe-aux-loss-coeff", moe=True),
    Flag("moe_shared_expert_gate", "--moe-shared-expert-gate", switch=True, moe=True),
)


def _value(v) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(_value(x) for x in v)
    return repr(v) if isinstance(v, float) else str(v)


def load_flags(args: argparse.Namespace, ckpt_format: str, ckpt_dir: str | Path = _DIR) -> list[str]:
    """The flags, in order: where the checkpoint is and how to read it, then the model fields not read back."""
    if ckpt_format not in CKPT_FORMATS:
        raise ValueError(f"ckpt_format {ckpt_format!r}: use one of {', '.join(CKPT_FORMATS)}")
    out = ["--load", str(ckpt_dir), "--use-checkpoint-args", "--ckpt-format", ckpt_format,
           "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(ckpt_dir)]
    for f in MODEL_FLAGS:
        value = getattr(args, f.dest, None)
        if value is None or (f.moe and not getattr(args, "num_experts", None)) or \
                (f.unless_equals and value == getattr(args, f.unless_equals, None)):
            continue
        if f.switch:
            out += [f.flag] if value else []
        elif f.dest == "rope_scaling_factor" and not getattr(args, "use_rope_scaling", False):
            continue  # read only with --use-rope-scaling
        else:
            out += [f.flag, *_value(value).split(" ")]
    return out


def cautions(args: argparse.Namespace, rope_scaling: dict | None = None) -> list[str]:
    """What Megatron-LM 0.16.1's gpt_builders cannot rebuild from any flag (empty for every model it can)."""
    notes = []
    kind = None if not rope_scaling else rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind == "llama3":
        got = (float(rope_scaling.get("factor", 8.0)), float(rope_scaling.get("low_freq_factor", 1.0)),
               float(rope_scaling.get("high_freq_factor", 4.0)),
               int(rope_scaling.get("original_max_position_embeddings", 8192)))
        if got != (8.0, 1.0, 4.0, 8192):
            notes.append(f"llama3 rope scaling (factor, low, high, original context) = {got}: Megatron-LM's "
                         f"gpt_builders passes only --use-rope-scaling to GPTModel, which fixes (8.0, 1.0, 4.0, 8192); "
                         f"build the model with megatron-core directly (GPTModel(rope_scaling_factor=...)) or "
                         f"Megatron-Bridge")
    elif kind is not None:
        notes.append(f"rope scaling type {kind!r} has no Megatron-LM flag (gpt_builders passes no "
                     f"seq_len_interpolation_factor); positions beyond the original context will differ from HF")
    return notes


def script_text(args: argparse.Namespace, ckpt_format: str, notes: list[str] = ()) -> str:
    """megatron_args.sh: a bash array MEGATRON_ARGS when sourced; the flags on stdout when run."""
    def word(w: str) -> str:
        return f'"{_DIR}"' if w == _DIR else shlex.quote(w)

    flags = load_flags(args, ckpt_format)
    lines, i = [], 0
    while i < len(flags):  # one flag (with its values) per line
        j = i + 1
        while j < len(flags) and not flags[j].startswith("--"):
            j += 1
        lines.append("  " + " ".join(word(w) for w in flags[i:j]))
        i = j
    head = [
        "#!/usr/bin/env bash",
        "# The Megatron-LM flags that load this checkpoint, written by megatune. Megatron-LM's --use-checkpoint-args",
        "# reads only some model fields back from the checkpoint's args; the others are spelled out here",
        f"# (rules of {MEGATRON_LM_RULES}, load_args_from_checkpoint).",
        "#   source megatron_args.sh; torchrun --nproc-per-node N pretrain_gpt.py \"${MEGATRON_ARGS[@]}\" --seq-length ...",
        "#   or: pretrain_gpt.py $(bash megatron_args.sh) ...   (when no path holds a space)",
        *[f"# NOTE: {n}" for n in notes],
        'CKPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        "MEGATRON_ARGS=(",
    ]
    tail = [")", 'if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then echo "${MEGATRON_ARGS[*]}"; fi', ""]
    return "\n".join(head + lines + tail)


def command_line(args: argparse.Namespace, ckpt_format: str, ckpt_dir: str | Path) -> str:
    """The flags as one shell-quoted line, with the checkpoint's absolute path."""
    return shlex.join(load_flags(args, ckpt_format, Path(ckpt_dir).resolve()))


def write_megatron_args(ckpt_dir: str | Path, meta: dict, ckpt_format: str, *,
                        final_dir: str | Path | None = None) -> tuple[str, list[str]]:
    """Write DIR/megatron_args.sh atomically for the checkpoint described by `meta` (megatune.json). Returns (the
    flags as one line for the command's output, notes). `final_dir`: where the checkpoint will live when `ckpt_dir`
    is a staging directory swapped into place later."""
    from megatune.convert.arch import rope_of
    from megatune.convert.megatron_io import megatron_args_namespace

    args = megatron_args_namespace(meta)  # the same function builds the args stored in the checkpoint
    notes = cautions(args, rope_of(meta["hf_config"])[1])
    write_text_atomic(Path(ckpt_dir) / MEGATRON_ARGS, script_text(args, ckpt_format, notes))
    return command_line(args, ckpt_format, final_dir or ckpt_dir), notes


def checkpoint_format(ckpt_dir: str | Path, iteration: int | str | None = None) -> str:
    """"torch_dist" when the iteration directory is a megatron-core distributed checkpoint (metadata.json), else
    "torch" (Megatron-LM's legacy rank files)."""
    from megatune.convert.ckpt_layout import iteration_dir, read_latest

    it = read_latest(ckpt_dir) if iteration is None else iteration
    return "torch_dist" if (Path(ckpt_dir) / iteration_dir(it) / "metadata.json").is_file() else "torch"


def output_lines(ckpt_dir: str | Path, prog: str) -> list[str]:
    """The lines a command prints last after writing a Megatron checkpoint: what cannot be expressed (if anything),
    then the flags that load it."""
    from megatune.convert.arch import rope_of
    from megatune.convert.ckpt_layout import read_meta
    from megatune.convert.megatron_io import megatron_args_namespace

    meta = read_meta(ckpt_dir)
    args = megatron_args_namespace(meta)
    notes = [f"{prog}: note: {n}" for n in cautions(args, rope_of(meta["hf_config"])[1])]
    flags = command_line(args, checkpoint_format(ckpt_dir), ckpt_dir)
    return notes + [f"{prog}: Megatron-LM loads it with (also in {Path(ckpt_dir) / MEGATRON_ARGS}): {flags}"]
