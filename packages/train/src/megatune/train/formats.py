"""Which on-disk format a run's checkpoints use: `open_format` picks the `CheckpointFormat` (states.py) for a
directory: Megatron-LM's legacy rank files (checkpoint.LegacyFormat) or megatron-core's distributed checkpoint
(torch_dist.TorchDistFormat), to save with the format asked for or to load the one on disk."""

from __future__ import annotations

from megatune.convert import ckpt_layout
from megatune.convert.megatron_flags import checkpoint_format
from megatune.train.checkpoint import LegacyFormat
from megatune.train.errors import TrainError
from megatune.train.states import CheckpointFormat
from megatune.train.torch_dist import FORMAT, TorchDistFormat


def open_format(directory, ckpt_format: str | None = None, *, save_safetensors: bool = False, async_save: bool = False,
                **kwargs) -> CheckpointFormat:
    """The checkpoint format for `directory`: `ckpt_format` ("torch" | "torch_dist") to save, None: the one on disk
    (to load). `save_safetensors`: each save also writes an HF dir (hf_stream); `kwargs`: meta, aux_dir."""
    if ckpt_format is None:
        ckpt_format = checkpoint_format(directory) if ckpt_layout.is_megatron_dir(directory) else "torch"
    if async_save and ckpt_format != FORMAT:
        raise TrainError("--async_save true needs --ckpt_format torch_dist")
    fmt = TorchDistFormat(directory, async_save=async_save, **kwargs) if ckpt_format == FORMAT else \
        LegacyFormat(directory, **kwargs)
    if save_safetensors:
        from megatune.train import hf_stream

        fmt.after_write = hf_stream.after_write(kwargs.get("aux_dir"))
    return fmt
