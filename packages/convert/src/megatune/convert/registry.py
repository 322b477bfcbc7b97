"""`--model_type` -> Hugging Face repo id, and where its weights are: --model_id_or_path, the local HF cache
(huggingface_hub's layout, read without importing transformers), or a hub download when online."""

from __future__ import annotations

import os
from pathlib import Path

from megatune.convert.errors import ConvertError

MODEL_TYPES: dict[str, str] = {
    "qwen2-0.5b-instruct": "Qwen/Qwen2-0.5B-Instruct",
    "qwen2-1.5b-instruct": "Qwen/Qwen2-1.5B-Instruct",
    "qwen2-7b-instruct": "Qwen/Qwen2-7B-Instruct",
    "qwen2-72b-instruct": "Qwen/Qwen2-72B-Instruct",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "llama2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "mistral-7b-instruct-v0.3": "mistralai/Mistral-7B-Instruct-v0.3",
    "qwen2-57b-a14b-instruct": "Qwen/Qwen2-57B-A14B-Instruct",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "mixtral-8x7b-instruct": "mistralai/Mixtral-8x7B-Instruct-v0.1",
}
# ms-swift 2.x spellings
ALIASES = {"mistral-7b-instruct-v3": "mistral-7b-instruct-v0.3"}


def canonical_model_type(model_type: str) -> str:
    """'qwen2_5-7b-instruct' / 'qwen2-0_5b-instruct' (ms-swift) -> 'qwen2.5-7b-instruct' / 'qwen2-0.5b-instruct'."""
    t = model_type.lower().replace("_", ".")
    return ALIASES.get(t, t)


def repo_id(model_type: str) -> str | None:
    return MODEL_TYPES.get(canonical_model_type(model_type))


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo: str, cache: Path | None = None) -> Path | None:
    """huggingface_hub layout: hub/models--ORG--NAME/{refs/main, snapshots/<commit>/...}."""
    root = (cache or hf_cache_dir()) / f"models--{repo.replace('/', '--')}"
    ref = root / "refs" / "main"
    candidates = []
    if ref.is_file():
        candidates.append(root / "snapshots" / ref.read_text().strip())
    snaps = root / "snapshots"
    if snaps.is_dir():
        candidates += sorted(snaps.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for snap in candidates:
        if (snap / "config.json").is_file() and any(snap.glob("*.safetensors")):
            return snap
    return None


def resolve_weights(model_type: str | None, model_id_or_path: str | None) -> Path:
    if model_id_or_path and Path(model_id_or_path).expanduser().is_dir():
        return Path(model_id_or_path).expanduser()
    repo = model_id_or_path or (repo_id(model_type) if model_type else None)
    if repo is None:
        if not model_type:
            raise ConvertError("give --model_type or --model_id_or_path")
        raise ConvertError(f"unknown --model_type {model_type!r}; known: {', '.join(MODEL_TYPES)} "
                           f"(or pass --model_id_or_path DIR of a Llama/Mistral/Qwen2/Qwen3, Qwen2/3-MoE or "
                           f"Mixtral checkpoint)")
    if "/" not in repo:
        raise ConvertError(f"--model_id_or_path {repo}: no such directory")
    snap = cached_snapshot(repo)
    if snap is not None:
        return snap
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise ConvertError(f"{repo}: not in the local HF cache ({hf_cache_dir()}) and HF_HUB_OFFLINE is set; "
                           f"download it elsewhere and pass --model_id_or_path DIR")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConvertError(f"{repo}: not in the local HF cache ({hf_cache_dir()}); pass --model_id_or_path DIR "
                           f"or `pip install huggingface_hub` to download it") from None
    try:
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                            "*.jinja"]))
    except Exception as e:  # network/auth errors: one line, with the offline alternative
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{repo}: not in the local HF cache ({hf_cache_dir()}) and download failed ({first}); "
                           f"pass --model_id_or_path DIR") from None
