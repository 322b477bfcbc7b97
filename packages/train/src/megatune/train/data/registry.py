"""Known hub datasets (names as in ms-swift's registry) and loading them through `datasets.load_dataset`.

Only the Hugging Face hub is reachable through `datasets`; entries published on ModelScope alone keep their id so
the error can say exactly what to download. Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, no route to the hub,
or any hub failure) every hub spec fails fast with a message naming the spec and the local-file alternative.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

from .config import DataError, DatasetSpec


@dataclass(frozen=True)
class HubDataset:
    ms_id: str | None
    hf_id: str | None
    subsets: tuple[str, ...] = ()  # the subsets loaded when the spec names none
    split: str = "train"


# Repo ids follow ms-swift's dataset registry (swift/llm/dataset, dataset_info.json).
REGISTRY: dict[str, HubDataset] = {
    "alpaca-en": HubDataset("AI-ModelScope/alpaca-gpt4-data-en", "vicgalle/alpaca-gpt4"),
    "alpaca-zh": HubDataset("AI-ModelScope/alpaca-gpt4-data-zh", "llm-wizard/alpaca-gpt4-data-zh"),
    "alpaca-cleaned": HubDataset("AI-ModelScope/alpaca-cleaned", "yahma/alpaca-cleaned"),
    "code-alpaca-en": HubDataset("AI-ModelScope/CodeAlpaca-20k", "HuggingFaceH4/CodeAlpaca_20K"),
    "swift-mix": HubDataset("swift/swift-sft-mixture", None, ("sharegpt", "firefly", "codefuse", "metamathqa")),
    "ms-bench": HubDataset("iic/ms_bench", None),
    "sharegpt-gpt4": HubDataset("AI-ModelScope/sharegpt_gpt4", None, ("default",)),
    "ultrachat-200k": HubDataset("swift/ultrachat_200k", "HuggingFaceH4/ultrachat_200k", split="train_sft"),
    "no-robots": HubDataset("swift/no_robots", "HuggingFaceH4/no_robots"),
    "slim-orca": HubDataset("swift/SlimOrca", "Open-Orca/SlimOrca"),
    "open-platypus": HubDataset("AI-ModelScope/Open-Platypus", "garage-bAInd/Open-Platypus"),
    "tulu-v2-sft-mixture": HubDataset("AI-ModelScope/tulu-v2-sft-mixture", "allenai/tulu-v2-sft-mixture"),
    "school-math-zh": HubDataset("AI-ModelScope/school_math_0.25M", "BelleGroup/school_math_0.25M"),
}
# ms-swift's own aliases for the same repos.
REGISTRY["alpaca-gpt4-data-en"] = REGISTRY["alpaca-en"]
REGISTRY["alpaca-gpt4-data-zh"] = REGISTRY["alpaca-zh"]
REGISTRY["swift-sft-mixture"] = REGISTRY["swift-mix"]

_TRUE = ("1", "true", "yes", "on")


def _offline_reason() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    # A 3 s connect probe: without it `datasets` retries for minutes before giving up on a machine with no route.
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        return f"cannot reach {host}:{port} ({e.__class__.__name__})"
    return None


def _hint(spec: DatasetSpec, entry: HubDataset | None) -> str:
    where = ""
    if entry is not None:
        ids = [f"ModelScope {entry.ms_id}" if entry.ms_id else "", f"Hugging Face {entry.hf_id}" if entry.hf_id else ""]
        where = f" (published as {' / '.join(i for i in ids if i)})"
    return (
        f"Download the data{where} while online and pass the file instead, e.g. "
        f"`--dataset /path/to/{spec.name.replace('/', '_')}.jsonl"
        f"{'#' + str(spec.sample) if spec.sample else ''}` (.jsonl/.json/.csv/.parquet)."
    )


def resolve(spec: DatasetSpec) -> tuple[str, tuple[str, ...], str, HubDataset | None]:
    """(hf repo id, subsets, split, registry entry) for a hub spec, or DataError when it cannot come from HF."""
    entry = REGISTRY.get(spec.name)
    if spec.hub == "ms":
        raise DataError(
            f"dataset {spec.raw!r}: ModelScope datasets are not loaded by megatune. {_hint(spec, entry)}"
        )
    if entry is None:
        if "/" not in spec.name:
            known = ", ".join(sorted(REGISTRY))
            raise DataError(
                f"dataset {spec.raw!r}: not a file and not a known dataset name (known: {known}); "
                "give a local .jsonl/.json/.csv/.parquet path or a Hugging Face repo id `org/name`."
            )
        return spec.name, spec.subsets, "train", None
    if entry.hf_id is None:
        raise DataError(f"dataset {spec.raw!r}: published on ModelScope only, which `datasets` "
                        f"cannot load. {_hint(spec, entry)}")
    return entry.hf_id, spec.subsets or entry.subsets, entry.split, entry


def load_hub(spec: DatasetSpec, cache_dir: str | None):
    """Load a hub spec as one `datasets.Dataset` of raw rows (subsets concatenated in the given order)."""
    import datasets

    repo, subsets, split, entry = resolve(spec)
    reason = _offline_reason()
    if reason:
        raise DataError(f"dataset {spec.raw!r} needs the Hugging Face hub ({repo}), but {reason}. {_hint(spec, entry)}")
    parts = []
    try:
        for subset in subsets or (None,):
            parts.append(datasets.load_dataset(repo, subset, split=split, cache_dir=cache_dir))
    except Exception as e:  # any hub failure: the message, not a traceback from deep inside `datasets`
        raise DataError(
            f"dataset {spec.raw!r}: loading {repo} from the hub failed ({e.__class__.__name__}: {e}). "
            f"{_hint(spec, entry)}"
        ) from e
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
