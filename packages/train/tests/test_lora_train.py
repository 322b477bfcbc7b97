"""`megatune sft --sft_type lora` on real megatron-core over gloo, in ONE spawned group of 4 processes:

1. the same 20 LoRA steps (ALL linears, no dropout) at (tp, pp, dp) = (1,1,1), (2,1,1) with sequence parallelism,
   (1,2,1) and (1,1,2) give the same loss curve (<= 1e-4), and the loss falls;
2. resume: rewinding the (1,1,1) and (2,1,1) runs to their iteration-10 checkpoint and continuing reproduces
   iterations 11..20 bit for bit;
3. the checkpoint holds only the adapters (names, size) and megatune.json records the base and its fingerprint;
4. export: the merged HF weights of the TP1 and TP2 runs agree, every non-adapted tensor is the base's bit for
   bit (the base was never updated), and the peft adapter dir loaded by peft on the HF base gives the merged model's
   logits; a base whose files changed is refused.
A separate small group checks that after a LoRA training step the base has no gradient and the optimizer holds
exactly the adapters (and that without freezing the check fails).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from group_helpers import STEPS, rewind, train_layouts
from group_helpers import sft_argv as base_argv
from megatune.train.distributed import free_port, run_local

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)]
EXTRA = {(2, 1, 1): {"sequence_parallel": "true"}, (1, 2, 1): {"recompute_granularity": "full"}}
RESUMED = [(1, 1, 1), (2, 1, 1)]
LORA = {"sft_type": "lora", "lora_target_modules": "ALL", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0}


def sft_argv(model_dir, out_dir, **overrides) -> list[str]:
    """group_helpers.sft_argv with LoRA on and the adapters' learning rate."""
    return base_argv(model_dir, out_dir, **{"learning_rate": 1e-2, **LORA, **overrides})


def _group(rank: int, world: int, model_dir: str, out_dir: str, ports: list[int]) -> dict:
    def argv(tp, pp, dp, **flags):
        return sft_argv(model_dir, out_dir, tp=tp, pp=pp, **EXTRA.get((tp, pp, dp), {}), **flags)

    results = train_layouts(rank, LAYOUTS, ports, argv, ("losses", "run_dir", "tp", "pp", "dp"))
    rewind(rank, out_dir, [results[layout]["run_dir"] for layout in RESUMED] if rank == 0 else [], 10)
    def resumed(tp, pp, dp):
        return argv(tp, pp, dp, resume_from_checkpoint=results[(tp, pp, dp)]["run_dir"])

    results |= train_layouts(rank, RESUMED, ports[len(LAYOUTS):], resumed, ("losses", "run_dir", "start_iteration"),
                             tag=("resumed",))
    return results


@pytest.fixture(scope="module")
def group(tiny_qwen2, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    ports = [free_port() for _ in range(len(LAYOUTS) + len(RESUMED))]
    return run_local(4, _group, str(tiny_qwen2), str(out), ports, timeout=900)[0]


@pytest.mark.slow
def test_same_loss_curve_for_every_layout(group):
    base = group[(1, 1, 1)]["losses"]
    assert len(base) == STEPS and base[-1] < base[0] - 0.3, f"LoRA loss did not fall: {base}"
    for layout in LAYOUTS:
        run = group[layout]
        assert (run["tp"], run["pp"], run["dp"]) == layout
        diff = max(abs(a - b) for a, b in zip(run["losses"], base))
        assert len(run["losses"]) == STEPS and diff <= 1e-4, f"{layout}: max |loss diff| {diff:.2e} vs (1,1,1)"


@pytest.mark.slow
@pytest.mark.parametrize("layout", RESUMED)
def test_resume_is_bit_exact(group, layout):
    resumed = group[("resumed", *layout)]
    assert resumed["start_iteration"] == 10 and resumed["run_dir"] != group[layout]["run_dir"]
    assert resumed["losses"] == group[layout]["losses"][10:]


@pytest.mark.slow
def test_checkpoint_holds_only_adapters(group, tiny_qwen2):
    from megatune.convert import ckpt_layout

    run = Path(group[(2, 1, 1)]["run_dir"])
    meta = ckpt_layout.read_meta(run)
    record = meta["lora"]
    assert (record["rank"], record["alpha"], record["rslora"]) == (8, 16.0, False)
    assert record["base"]["path"] == str(Path(tiny_qwen2).resolve()) and len(record["base"]["fingerprint"]) == 64
    for tp_rank in range(2):
        path = ckpt_layout.rank_file(run, 20, tp_rank, 0, 1)
        model = ckpt_layout.load_rank_file(path, mmap=False)["model"]
        assert model and all(".lora." in k for k in model), sorted(model)[:4]
        assert len(model) == 4 * 4 * 2  # 4 layers x 4 linears x (A, B)
        adapters = sum(t.numel() for t in model.values())
        base = sum(t.numel() for t in _safetensors(Path(tiny_qwen2)).values())
        assert adapters < 0.15 * base, (adapters, base)


def _safetensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_exports_merged_and_peft(group, tiny_qwen2, tmp_path):
    from megatune.convert import cli as export_cli
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = {}
    for layout in [(1, 1, 1), (2, 1, 1)]:
        out = tmp_path / f"merged-{layout[0]}"
        assert export_cli.main(["--ckpt_dir", group[layout]["run_dir"], "--to_hf", "true",
                                "--hf_output_dir", str(out)]) == 0
        merged[layout] = _safetensors(out)
    base = _safetensors(Path(tiny_qwen2))
    one, two = merged[(1, 1, 1)], merged[(2, 1, 1)]
    assert set(one) == set(base)
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name, t in base.items():
        if any(a in name for a in adapted) and name.endswith(".weight"):
            assert not torch.equal(one[name], t), f"{name}: the adapter did not change the merged weight"
            assert (one[name] - two[name]).abs().max() <= 1e-3, name  # TP1 and TP2 trained the same adapters
        else:
            assert torch.equal(one[name], t), f"{name}: a frozen base tensor changed"

    adapter_dir = tmp_path / "adapter"
    assert export_cli.main(["--ckpt_dir", group[(1, 1, 1)]["run_dir"], "--to_hf", "true", "--merge_lora", "false",
                            "--hf_output_dir", str(adapter_dir)]) == 0
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(Path(tiny_qwen2).resolve()) and cfg["r"] == 8
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-1", dtype=torch.float32).eval()(ids).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32),
                                               str(adapter_dir)).eval()
        got = peft_model(ids).logits
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_changed_base_is_refused(group, tiny_qwen2, tmp_path, capsys):
    import shutil

    from megatune.convert import cli as export_cli

    moved = tmp_path / "other-base"
    shutil.copytree(tiny_qwen2, moved)
    state = _safetensors(moved)
    state["model.norm.weight"] = state["model.norm.weight"] + 1
    from safetensors.torch import save_file

    save_file(state, str(moved / "model.safetensors"))
    code = export_cli.main(["--ckpt_dir", group[(1, 1, 1)]["run_dir"], "--to_hf", "true", "--model_id_or_path",
                            str(moved), "--hf_output_dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 1 and "fingerprint mismatch" in err and not (tmp_path / "x").exists(), err


def _step_worker(rank, world, model_dir, targets):
    """TP2: optimizer contents, gradients and (for partly targeted fused modules) B's masked rows after 3 steps."""
    from megatune.argmap import MegatronArguments
    from megatune.convert import lora as spec
    from megatune.train import lora, optim, runtime, steps
    from megatune.train.checkpoint import load_pretrained
    from megatune.train.distributed import init_distributed
    from megatune.train.errors import TrainError
    from megatune.train.fused import torch_optimizers
    from megatune.train.model import build_model
    from megatune.train.policy import default_policy

    dist = init_distributed(2, 1)
    policy = default_policy()
    margs = MegatronArguments(lr=1e-2, global_batch_size=1, micro_batch_size=1, train_iters=10,
                              lr_decay_style="constant")
    out = {}

    def build(lora_after_optimizer: bool):
        chunks = build_model(model_dir, tp=2, pp=1, spec="native", sequence_parallel=True)
        load_pretrained(chunks, model_dir)
        cfg = lora.LoraConfig(rank=4, alpha=8, dropout=0.1, targets=targets)
        if not lora_after_optimizer:
            lora.apply_lora(chunks, cfg)
        ddp = runtime.wrap_model(chunks, policy)
        optimizer = optim.build_optimizer(ddp, margs, policy)
        if lora_after_optimizer:
            lora.apply_lora(chunks, cfg)
        return chunks, ddp, optimizer

    _, ddp, optimizer = build(lora_after_optimizer=True)
    try:
        lora.check_optimizer(optimizer, ddp)
        out["late_lora_refused"] = False
    except TrainError:
        out["late_lora_refused"] = True

    chunks, ddp, optimizer = build(lora_after_optimizer=False)
    out["optimizer_numel"] = lora.check_optimizer(optimizer, ddp)
    adapters = lora.adapters(chunks[0])
    out["adapter_numel"] = sum(a.A.numel() + a.B.numel() for a in adapters.values())
    base = {n: p.detach().clone() for n, p in chunks[0].named_parameters() if ".lora." not in n}
    scheduler = optim.build_scheduler(optimizer, margs)
    g = torch.Generator().manual_seed(0)
    forward_step = steps.make_forward_step(lambda batch: {"attention_mask": None})
    for _ in range(3):
        tokens = torch.randint(0, 1000, (1, 17), generator=g)
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, 16),
                 "position_ids": torch.arange(16)[None]}
        steps.train_step(ddp, optimizer, scheduler, [batch], forward_step, increment=1, device=dist.device)
    params = dict(chunks[0].named_parameters())
    out["base_unchanged"] = all(torch.equal(params[n], t) for n, t in base.items())
    out["base_without_grad"] = all(params[n].grad is None and not hasattr(params[n], "main_grad") for n in base)
    out["adapters_moved"] = all(bool(a.B.abs().sum() > 0) for a in adapters.values())
    state_shapes = sorted(tuple(st["exp_avg"].shape) for opt in torch_optimizers(optimizer) for st in opt.state.values())
    out["state_is_adapters"] = state_shapes == sorted(tuple(p.shape) for a in adapters.values() for p in (a.A, a.B))
    masked = []
    for a in adapters.values():
        if a.mask is not None:
            masked.append(bool((a.B[a.mask[:, 0] == 0] == 0).all()) and bool(a.B[a.mask[:, 0] == 1].abs().sum() > 0))
    out["masked_rows_stay_zero"] = masked
    out["targets"] = lora.LoraConfig(targets=targets).resolved() == spec.resolve_targets(targets)
    return out


@pytest.mark.parametrize("targets", [("ALL",), ("q_proj", "up_proj")], ids=["all", "partial"])
def test_only_adapters_train(tiny_qwen2, targets):
    for r in run_local(2, _step_worker, str(tiny_qwen2), targets, timeout=600):
        assert r["late_lora_refused"], "check_optimizer accepted an optimizer built before the base was frozen"
        assert r["optimizer_numel"] == r["adapter_numel"] > 0
        assert r["base_unchanged"] and r["base_without_grad"] and r["adapters_moved"] and r["state_is_adapters"], r
        # partial: linear_qkv (q rows only) and linear_fc1 (up rows only) of 4 layers carry a row mask
        assert r["masked_rows_stay_zero"] == ([] if targets == ("ALL",) else [True] * 8), r
