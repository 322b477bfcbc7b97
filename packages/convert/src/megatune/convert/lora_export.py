"""Files of a LoRA run: the base checkpoint's fingerprint, the adapters read back from the run's rank files, and the
two exports of `megatune export --ckpt_dir RUN --to_hf true`: merged HF weights (default) or, with
`--merge_lora false`, a peft adapter directory (adapter_config.json + adapter_model.safetensors + tokenizer).

A LoRA run directory is a Megatron legacy checkpoint whose rank files hold only the adapters under `model`
(`decoder.layers.{local i}.{module}.lora.A` / `.B`, this rank's TP parts) and whose megatune.json carries
    "lora": {"rank", "alpha", "dropout", "rslora", "targets", "modules", "seed",
             "base": {"path", "kind": "hf" | "megatron", "fingerprint"}}
The base weights stay where they are; the fingerprint says whether they are still the ones trained against.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from megatune.convert import lora
from megatune.convert.arch import Shape, shape_of
from megatune.convert.ckpt_layout import (
    AUX_FILES,
    HF_CONFIG,
    META,
    RANK_DIR_GLOB,
    atomic_dir,
    copy_aux_files,
    is_megatron_dir,
    load_rank_file,
    rank_file,
    rank_record,
    read_latest,
    read_meta,
    write_json_atomic,
)
from megatune.convert.errors import ConvertError
from megatune.convert.hf_io import HFReader, HFWriter
from megatune.convert.layout import stage_offsets
from megatune.convert.megatron_io import dtype_name

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_SAMPLE = 1 << 20  # bytes hashed at each end of every weight file
_ADAPTER_NAME = re.compile(r"decoder\.layers\.(\d+)\.(.+)\.lora\.(A|B)")


# ------------------------------------------------------------------------------------------------ base fingerprint
def _weight_files(base: Path) -> list[Path]:
    if is_megatron_dir(base):  # Megatron: the rank files of the iteration the tracker names
        return sorted(rank_file(base, read_latest(base), 0, 0, 1).parent.parent.glob(f"{RANK_DIR_GLOB}/*.pt"))
    return sorted(base.glob("*.safetensors"))


def base_fingerprint(base: str | Path) -> str:
    """sha256 over the base's metadata file, and the name, size and first/last MiB of every weight file.

    Not a full content hash on purpose: hashing a 145 GB base would cost minutes at every start and export. A
    re-conversion, a different model or a changed dtype/tp changes sizes, headers (safetensors headers and torch
    pickles sit at the start/end of the files) or metadata, and so the fingerprint."""
    base = Path(base)
    files = _weight_files(base)
    if not files:
        raise ConvertError(f"{base}: no weight files (*.safetensors or Megatron rank files) to fingerprint")
    h = hashlib.sha256()
    for meta in (META, HF_CONFIG):
        if (base / meta).is_file():
            h.update(meta.encode() + (base / meta).read_bytes())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(base)}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_SAMPLE))
            fh.seek(max(0, size - _SAMPLE))
            h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def check_base(lora_meta: dict, base: str | Path | None = None) -> Path:
    """The base directory of a LoRA run (recorded, or `base` given instead), checked against its fingerprint."""
    recorded = lora_meta["base"]
    path = Path(base or recorded["path"]).expanduser()
    if not path.is_dir():
        raise ConvertError(f"LoRA base {path}: no such directory (the run was trained on it); pass the base "
                           f"checkpoint's new location with --model_id_or_path")
    if base_fingerprint(path) != recorded["fingerprint"]:
        raise ConvertError(f"LoRA base {path}: its files differ from the base the adapters were trained on "
                           f"(fingerprint mismatch); point at that exact checkpoint with --model_id_or_path")
    return path


# ------------------------------------------------------------------------------------------------ adapters
def read_lora_meta(run_dir: str | Path) -> tuple[dict, dict | None]:
    """(megatune.json, its "lora" record or None for a full-parameter checkpoint)."""
    meta = read_meta(run_dir)
    return meta, meta.get("lora")


def read_adapters(run_dir: str | Path, iteration: int | str | None = None
                  ) -> tuple[dict, Shape, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(megatune.json, model shape, {lora.layer_key(global layer, module): (A, B) full tensors}) of a LoRA run."""
    run_dir = Path(run_dir)
    meta, record = read_lora_meta(run_dir)
    if record is None:
        raise ConvertError(f"{run_dir}/{META}: no \"lora\" record; this is not a LoRA run")
    iteration = read_latest(run_dir) if iteration is None else iteration
    shape = shape_of(meta["hf_config"])
    tp, pp, offsets = meta["tp"], meta["pp"], stage_offsets(meta["layers_per_stage"])
    parts: dict[tuple[str, str], list] = {}  # (layer key, "A"/"B") -> tp parts
    for p in range(pp):
        for t in range(tp):
            path = rank_file(run_dir, iteration, t, p, pp)
            state = load_rank_file(path, mmap=False, rank=rank_record(tp, t, pp, p))
            for name, tensor in state["model"].items():
                match = _ADAPTER_NAME.fullmatch(name)
                if match is None or match[2] not in lora.BY_NAME:
                    raise ConvertError(f"{path}: {name!r} is not a LoRA adapter tensor; a LoRA run's rank files "
                                       f"hold only adapters")
                key = lora.layer_key(offsets[p] + int(match[1]), lora.BY_NAME[match[2]])
                parts.setdefault((key, match[3]), [None] * tp)[t] = tensor
    adapters = {}
    for (key, which), tensors in parts.items():
        if which == "B":
            continue
        b_parts = parts.get((key, "B"))
        if b_parts is None or any(x is None for x in tensors + b_parts):
            raise ConvertError(f"{run_dir}: adapter {key} is missing on some tp rank; the checkpoint is incomplete")
        module = lora.BY_NAME[key.split(".", 3)[3]]
        adapters[key] = lora.full_adapter(module, list(zip(tensors, b_parts)))
    return meta, shape, adapters


def _targets(record: dict) -> dict[str, tuple[bool, ...]]:
    return {name: tuple(flags) for name, flags in record["modules"].items()}


def _scaling(record: dict) -> float:
    return lora.lora_scaling(int(record["rank"]), float(record["alpha"]), bool(record["rslora"]))


# ------------------------------------------------------------------------------------------------ exports
def export_merged(run_dir: str | Path, out_dir: str | Path | None = None, *, base: str | Path | None = None,
                  max_shard_size: int = 5 * 10**9, overwrite: bool = False) -> Path:
    """HF weights of base + scaling * B @ A (merged in fp32 per HF tensor, cast to the base dtype)."""
    from megatune.convert.megatron_reader import MegatronReader

    run_dir = Path(run_dir)
    meta, shape, adapters = read_adapters(run_dir)
    record = meta["lora"]
    base_dir = check_base(record, base)
    deltas = lora.hf_deltas(adapters, _targets(record), shape)
    scaling = _scaling(record)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / f"{meta['model_type']}-hf"
    if record["base"]["kind"] == "megatron":
        reader = MegatronReader(base_dir)
        names = reader.names()
        dtypes = dict.fromkeys(names, reader.dtype())
    else:
        reader = HFReader(base_dir)
        names = reader.names()
        dtypes = {n: reader.dtype(n) for n in names}
    missing = sorted(set(deltas) - set(names))
    if missing:
        raise ConvertError(f"LoRA base {base_dir}: no tensor {missing[0]} to merge into; wrong base checkpoint")
    specs = [(n, tuple(reader.shape(n)), dtypes[n]) for n in names]
    with atomic_dir(out_dir, overwrite, inputs=[run_dir, base_dir], flag="--hf_output_dir") as tmp:
        writer = HFWriter(tmp, specs, max_shard_size)
        for n, _, _ in specs:
            t = reader.read(n)
            if n in deltas:
                a, rows = deltas[n]
                t = lora.merge_weight(t, a, rows, scaling)
            writer.write(n, t)
        writer.close()
        reader.release()
        cfg = dict(meta["hf_config"])
        cfg["torch_dtype"] = dtype_name(specs[0][2])  # the weights keep the base's dtype
        write_json_atomic(tmp / HF_CONFIG, cfg)
        copy_aux_files(run_dir, tmp, [f for f in AUX_FILES if f != HF_CONFIG])
    return out_dir


def peft_base_model(meta: dict, base: str | None = None) -> str:
    """What adapter_config.json names as the base: `base` if given, else the HF directory trained on, else the hub
    repo id of the model type (as swift writes it)."""
    from megatune.convert.registry import repo_id

    if base:
        return str(base)
    record = meta["lora"]["base"]
    if record["kind"] == "hf":
        return str(record["path"])
    if record.get("hf_path"):
        return str(record["hf_path"])
    repo = repo_id(meta.get("model_type") or "")
    if repo is None:
        raise ConvertError(f"LoRA base {record['path']} is a Megatron checkpoint and model_type "
                           f"{meta.get('model_type')!r} has no known hub id; pass --model_id_or_path HF_BASE_DIR "
                           f"for adapter_config.json's base_model_name_or_path")
    return repo


def write_peft(out_dir: Path, adapters: dict, record: dict, shape: Shape, base_model: str) -> None:
    """adapter_config.json + adapter_model.safetensors into an existing directory."""
    from safetensors.torch import save_file

    state = lora.peft_state_dict(adapters, _targets(record), shape)
    save_file(state, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})  # in atomic_dir's temp dir
    cfg = lora.peft_config(rank=int(record["rank"]), alpha=float(record["alpha"]), dropout=float(record["dropout"]),
                           rslora=bool(record["rslora"]), targets=_targets(record), base_model=base_model)
    write_json_atomic(out_dir / ADAPTER_CONFIG, cfg)


def export_peft(run_dir: str | Path, out_dir: str | Path | None = None, *, base: str | None = None,
                overwrite: bool = False) -> Path:
    """A peft adapter directory (HF module names) that `PeftModel.from_pretrained(hf_base, DIR)` loads, plus the
    tokenizer files, so `megatune infer --ckpt_dir DIR` works as with swift. Default DIR: RUN/{model_type}-lora."""
    run_dir = Path(run_dir)
    meta, shape, adapters = read_adapters(run_dir)
    base_model = peft_base_model(meta, base)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / f"{meta['model_type']}-lora"
    with atomic_dir(out_dir, overwrite, inputs=[run_dir], flag="--hf_output_dir") as tmp:
        write_peft(tmp, adapters, meta["lora"], shape, base_model)
        # no config.json: transformers would take the directory for a full model instead of an adapter
        copy_aux_files(run_dir, tmp, [f for f in AUX_FILES if f not in (HF_CONFIG, "generation_config.json")])
    return out_dir


def export(run_dir: str | Path, out_dir: str | Path | None = None, *, merge: bool = True, base: str | None = None,
           max_shard_size: int = 5 * 10**9, overwrite: bool = False) -> Path:
    """`megatune export --ckpt_dir RUN --to_hf true [--merge_lora false]` for a LoRA run."""
    if merge:
        return export_merged(run_dir, out_dir, base=base, max_shard_size=max_shard_size, overwrite=overwrite)
    return export_peft(run_dir, out_dir, base=base, overwrite=overwrite)
