"""`megatune sft --sft_type lora` on a GPU through the real CLI path: bf16 base, megatron-core's distributed
optimizer (fp32 main params and Adam moments of the adapters only, sharded into distrib_optim.pt), fused AdamW.

20 steps saved at 10; `latest` rewound to 10 and resumed: iterations 11..20 repeat the first run's losses within
2e-3 (GPU kernels are not bit-reproducible); the optimizer held only the adapters (runtime checks it, and the
distributed optimizer's shard file is adapter-sized); the merged export keeps every frozen tensor of the base.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from group_helpers import as_rank as _as_rank
from megatune.train.distributed import free_port, run_local
from test_lora_train import sft_argv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _group(rank: int, world: int, model_dir: str, out_dir: str, ports: list[int]) -> dict:
    from megatune.convert import ckpt_layout
    from megatune.train import cli

    gpu = dict(dtype="bf16", learning_rate=1e-2, lora_dropout=0.05)
    _as_rank(rank, world, ports[0])
    first = cli.run(sft_argv(model_dir, out_dir, **gpu), progress=False)
    ready = Path(out_dir) / "rewound"
    if rank == 0:
        ckpt_layout.write_latest(first["run_dir"], 10)
        ready.write_text("")
    while not ready.exists():
        time.sleep(0.2)
    _as_rank(rank, world, ports[1])
    resumed = cli.run(sft_argv(model_dir, out_dir, resume_from_checkpoint=first["run_dir"], **gpu), progress=False)
    return {"first": first["losses"], "resumed": resumed["losses"], "run_dir": first["run_dir"],
            "start": resumed["start_iteration"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megatune.convert.testing import make_tiny_model

    return make_tiny_model("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2", seed=0)


def test_lora_bf16_distributed_optimizer_resume(tiny, tmp_path):
    from megatune.convert import ckpt_layout
    from megatune.convert import cli as export_cli
    from safetensors.torch import load_file

    world = min(torch.cuda.device_count(), 2)
    r = run_local(world, _group, str(tiny), str(tmp_path / "runs"), [free_port(), free_port()], timeout=900)[0]
    first, resumed = r["first"], r["resumed"]
    assert first[-1] < first[0] - 0.3, first
    assert r["start"] == 10 and max(abs(a - b) for a, b in zip(resumed, first[10:])) <= 2e-3, (first, resumed)
    run = Path(r["run_dir"])
    rank_file = ckpt_layout.rank_file(run, 20, 0, 0, 1)
    model = ckpt_layout.load_rank_file(rank_file, mmap=False)["model"]
    assert model and all(".lora." in k for k in model)
    shard = rank_file.with_name(ckpt_layout.DISTRIB_OPTIM)
    assert shard.is_file() and shard.stat().st_size < 1024 * 1024, "optimizer state beyond the adapters"
    out = tmp_path / "merged"
    assert export_cli.main(["--ckpt_dir", str(run), "--to_hf", "true", "--hf_output_dir", str(out)]) == 0
    merged, base = load_file(out / "model.safetensors"), load_file(Path(tiny) / "model.safetensors")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(merged[name], base[name]), name
    assert not torch.equal(merged["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])
