"""Which Hugging Face directory to load: swift's `--ckpt_dir DIR` or `--model_type T --model_id_or_path DIR`.

Engines need an HF directory (config.json + weights + tokenizer). A Megatron checkpoint is pointed at its exported
`*-hf` folder when there is exactly one, and otherwise refused with the export command to run. A hub id in
--model_id_or_path resolves through the local HF cache (downloaded when online), as swift does.
"""

from __future__ import annotations

from pathlib import Path

from megatune.convert.ckpt_layout import has_meta, is_megatron_dir
from megatune.evaluate.errors import UsageError


def _hf_dir(d: Path, flag: str) -> Path:
    if (d / "config.json").is_file():
        return d
    if (d / "adapter_config.json").is_file():  # a peft (LoRA) adapter dir: the engine loads its base + the adapter
        return d
    if has_meta(d) or is_megatron_dir(d):
        exported = sorted(p for p in d.glob("*-hf") if (p / "config.json").is_file())
        if len(exported) == 1:
            return exported[0]
        raise UsageError(f"{flag} {d} is a Megatron checkpoint; run `megatune export --ckpt_dir {d} --to_hf true` "
                        f"and pass the {d}/<model_type>-hf folder it writes")
    raise UsageError(f"{flag} {d} has no config.json; pass a Hugging Face model folder (config.json, weights, tokenizer)")


def resolve_model_dir(ckpt_dir: str | None, model_type: str | None, model_id_or_path: str | None) -> Path:
    if ckpt_dir:
        d = Path(ckpt_dir).expanduser()
        if not d.is_dir():
            raise UsageError(f"--ckpt_dir {d}: no such directory")
        return _hf_dir(d, "--ckpt_dir")
    if model_id_or_path:
        d = Path(model_id_or_path).expanduser()
        if d.is_dir():
            return _hf_dir(d, "--model_id_or_path")
        if d.is_absolute() or str(model_id_or_path).startswith(".") or str(model_id_or_path).count("/") != 1:
            raise UsageError(f"--model_id_or_path {model_id_or_path}: no such directory (nor a hub id owner/name)")
        return _from_hub(str(model_id_or_path))
    if model_type:
        raise UsageError(f"--model_type {model_type} alone does not say where the weights are; "
                        "add --model_id_or_path DIR (an HF folder or hub id), or pass --ckpt_dir DIR")
    raise UsageError("no model given; pass --ckpt_dir DIR, or --model_type T --model_id_or_path DIR")


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError(f"--model_id_or_path {repo_id}: not a local folder, and huggingface_hub is not installed "
                        "to fetch it; download the model and pass its folder") from None
    try:
        return Path(snapshot_download(repo_id))
    except Exception as e:  # offline, unknown repo, gated: same advice
        raise UsageError(f"--model_id_or_path {repo_id}: not a local folder and not in the HF cache, and the hub "
                        f"download failed ({type(e).__name__}); download it and pass the folder") from None
