"""A LoRA run's checkpoint: the adapters only, plus a reference to the base weights.

The rank files of a LoRA run hold, under `model`, only this rank's adapter tensors (`LoraModelState`), next to the
optimizer, scheduler, RNG and data state of those adapters -- megabytes instead of the base's gigabytes. Its
megatune.json records the adapter hyper-parameters and the base under "lora" (convert.lora_export documents the
record), including the base's fingerprint: continuing the run or exporting it refuses a base whose files changed.

    lora_run = plan_lora(sft, source)       # None for --sft_type full
    load_pretrained(chunks, lora_run.base_path); apply_lora(chunks, lora_run.config)
    states["model"] = LoraModelState(chunks); meta["lora"] = lora_run.record(hf_config)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from megatune.train import lora
from megatune.train.errors import TrainError
from megatune.train.states import ModelState


class LoraModelState(ModelState):
    """This rank's adapters (not the frozen base) as the checkpoint's "model" state."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return lora.adapter_state_dict(self.module)

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        lora.load_adapter_state_dict(self.module, state, source)


@dataclasses.dataclass(frozen=True)
class LoraRun:
    config: lora.LoraConfig
    base: dict  # {"path", "kind": "hf" | "megatron", "fingerprint", "hf_path"}

    @property
    def base_path(self) -> Path:
        return Path(self.base["path"])

    def record(self, hf_config: dict) -> dict:
        """megatune.json's "lora" entry."""
        return {**self.config.to_json(hf_config), "base": dict(self.base)}


def _fingerprint(path: Path) -> str:
    """The base's fingerprint, read on rank 0 only and broadcast (every rank would hit the same files)."""
    from megatune.convert.errors import ConvertError
    from megatune.convert.lora_export import base_fingerprint

    answer: list = [None, None]
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        try:
            answer = [base_fingerprint(path), None]
        except (ConvertError, OSError) as e:
            answer = [None, str(e)]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(answer, src=0)
    if answer[1]:
        raise TrainError(answer[1])
    return answer[0]


def plan_lora(sft, source) -> LoraRun | None:
    """The LoRA run for these arguments and weights source (runtime.Source), after init_distributed.

    A new LoRA run records its source as the base; continuing a LoRA run dir reuses that run's adapter settings and
    base, after checking the base's fingerprint."""
    record = source.meta.get("lora")
    if sft.sft_type != "lora":
        if record:
            raise TrainError(f"{source.path} is a LoRA run (adapters only); continue it with --sft_type lora, or "
                             f"export merged weights (`megatune export --ckpt_dir {source.path} --to_hf true`) and "
                             f"fine-tune those")
        return None
    if record:
        base = dict(record["base"])
        if not Path(base["path"]).is_dir():
            raise TrainError(f"{source.path}: its LoRA base {base['path']} is gone; restore it there to continue "
                             f"the run")
        if _fingerprint(Path(base["path"])) != base["fingerprint"]:
            raise TrainError(f"{source.path}: its LoRA base {base['path']} changed since the adapters were trained "
                             f"(fingerprint mismatch); restore the original base checkpoint to continue the run")
        return LoraRun(lora.LoraConfig.from_json(record), base)
    if source.kind == "run":
        raise TrainError(f"{source.path} is a full-parameter run with optimizer state; LoRA starts from weights: "
                         f"export it (`megatune export --ckpt_dir {source.path} --to_hf true`) and pass "
                         f"--model_id_or_path to the exported folder")
    config = lora.LoraConfig(rank=sft.lora_rank, alpha=sft.lora_alpha, dropout=sft.lora_dropout,
                             targets=tuple(sft.lora_target_modules), rslora=sft.use_rslora, seed=sft.seed)
    hf = source.kind == "hf"
    base = {"path": str(source.path), "kind": "hf" if hf else "megatron", "fingerprint": _fingerprint(source.path),
            "hf_path": str(source.path) if hf else source.meta.get("hf_source")}
    return LoraRun(config, base)
