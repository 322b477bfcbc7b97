"""The torch_dist format (megatron-core dist_checkpointing) as seen from `megatune export`.

Its names and global shapes are megatron-core's GPTModel.sharded_state_dict, so the conversions live with the model
builder in megatune-train (megatune.train.torch_dist_export) and need megatron-core; this module only recognises a
torch_dist checkpoint and forwards to them, turning a missing package or a training-side error into one
ConvertError line. The legacy format never imports anything from here.
"""

from __future__ import annotations

from pathlib import Path

from megatune.convert.errors import ConvertError
from megatune.convert.megatron_flags import checkpoint_format


def is_torch_dist(ckpt_dir: str | Path) -> bool:
    """A Megatron checkpoint directory whose latest iteration is a distributed checkpoint (metadata.json)."""
    from megatune.convert.ckpt_layout import is_megatron_dir

    return is_megatron_dir(ckpt_dir) and checkpoint_format(ckpt_dir) == "torch_dist"


def _call(name: str, *args, **kwargs) -> Path:
    try:
        from megatune.train import torch_dist_export
        from megatune.train.errors import TrainError
    except ModuleNotFoundError as e:
        raise ConvertError(f"--ckpt_format torch_dist needs megatron-core ({e.name} is not installed); run "
                           f"`pip install megatune-train` or use --ckpt_format torch") from None
    try:
        return getattr(torch_dist_export, name)(*args, **kwargs)
    except TrainError as e:
        raise ConvertError(str(e)) from None


def hf_to_torch_dist(hf_dir, out_dir, **kwargs) -> Path:
    return _call("hf_to_torch_dist", hf_dir, out_dir, **kwargs)


def torch_dist_to_hf(ckpt_dir, out_dir=None, **kwargs) -> Path:
    return _call("torch_dist_to_hf", ckpt_dir, out_dir, **kwargs)
