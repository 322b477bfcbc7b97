"""The device policy and the training plan, resolved on a CPU box for any machine: the production (GPU) choices are
asserted here, without a GPU; refusals are one line naming the flag."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from megatune.argmap import ArgumentError, SftArguments
from megatune.train.errors import TrainError
from megatune.train.plan import Parallel, Source, refuse_unsupported, resolve_parallel, resolve_plan
from megatune.train.policy import Fp8, Machine, Request, resolve_policy

GPU2, CPU = Machine(cuda=True, gpus=2), Machine(cuda=False)
TRAIN = Path(__file__).resolve().parents[1] / "src" / "megatune" / "train"


def test_gpu_bf16_dp2_is_the_production_configuration():
    p = resolve_policy(Request.from_args(SftArguments()), GPU2, dp=2)  # swift's defaults: AUTO dtype -> bf16
    assert (p.device_type, p.backend, p.precision, p.params_dtype) == ("cuda", "nccl", "bf16", torch.bfloat16)
    assert p.distributed_optimizer and p.overlap_grad_reduce and p.fused_adamw
    assert p.fused_loss and p.compiled_kernels and not p.cpu_init and p.layer_spec == "native"
    assert p.flex_documents and p.fixed_packed_length and p.notes == ()


def test_gpu_single_rank_does_not_overlap_and_sgd_has_no_fused_adamw():
    p = resolve_policy(Request.from_args(SftArguments(optim="sgd", use_distributed_optimizer=False)), GPU2, dp=1)
    assert not (p.overlap_grad_reduce or p.fused_adamw or p.distributed_optimizer)


def test_cpu_falls_back_to_fp32_replicated_optimizer_and_says_so():
    p = resolve_policy(Request.from_args(SftArguments(bf16=True)), CPU, dp=2)
    assert (p.device_type, p.backend, p.precision, p.params_dtype) == ("cpu", "gloo", "fp32", torch.float32)
    assert not (p.distributed_optimizer or p.overlap_grad_reduce or p.fused_adamw or p.fused_loss or p.compiled_kernels)
    assert p.cpu_init and not p.flex_documents
    assert len(p.notes) == 2 and "fp32" in p.notes[0] and "distributed optimizer" in p.notes[1]
    quiet = resolve_policy(Request(precision="fp32", distributed_optimizer=False), CPU, dp=1)
    assert quiet.notes == ()


@pytest.mark.parametrize(("flag", "attention", "flex"), [(None, "auto", True), (True, "flash", True),
                                                         (False, "no_flash", False)])
def test_use_flash_attn_selects_the_attention_kernels(flag, attention, flex):
    p = resolve_policy(Request(use_flash_attn=flag), GPU2, dp=1)
    assert (p.attention, p.flex_documents) == (attention, flex)
    with p.attention_kernels():  # a real context manager, also on CPU
        pass


def test_gpu_auto_attention_puts_cudnn_first():
    """torch's own order prefers its flash kernel; on an H200 cuDNN's was 1.8x faster in the backward pass, and torch
    stopped picking it once Transformer Engine was imported (BENCHMARKS.md). CPU keeps torch's choice."""
    from torch.nn.attention import SDPBackend

    before = torch._C._get_sdp_priority_order()
    with resolve_policy(Request(), GPU2, dp=1).attention_kernels():
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch._C._get_sdp_priority_order() == before
    with resolve_policy(Request(precision="fp32", distributed_optimizer=False), CPU, dp=1).attention_kernels():
        assert torch._C._get_sdp_priority_order() == before


def test_fp8_needs_the_te_spec_and_reaches_the_transformer_config(monkeypatch):
    from megatune.train import policy

    monkeypatch.setattr(policy, "_te_importable", lambda: True)
    sft = SftArguments(transformer_impl="te", fp8_format="hybrid", fp8_recipe="tensorwise")
    p = resolve_policy(Request.from_args(sft), GPU2, dp=1)
    assert (p.layer_spec, p.fp8) == ("te", policy.Fp8("hybrid", "tensorwise", 1024, "max"))
    assert p.fp8.transformer_fields() == {"fp8": "hybrid", "fp8_recipe": "tensorwise", "fp8_amax_history_len": 1024,
                                          "fp8_amax_compute_algo": "max"}
    assert resolve_policy(Request.from_args(SftArguments()), GPU2, dp=1).fp8 is None


@pytest.mark.parametrize(("request_", "machine", "words"), [
    (Request(fp8=Fp8()), GPU2, "--transformer_impl te"),
    (Request(fp8=Fp8(), transformer_impl="te", precision="fp32"), GPU2, "--dtype bf16"),
    (Request(use_flash_attn=True), CPU, "--use_flash_attn true"),
    (Request(transformer_impl="te"), CPU, "--transformer_impl te"),
    (Request(transformer_impl="te", packing=True), GPU2, "--packing"),
    (Request(transformer_impl="te", use_flash_attn=False), GPU2, "--use_flash_attn"),
])
def test_refusals_name_the_flag(request_, machine, words):
    with pytest.raises(TrainError) as info:
        resolve_policy(request_, machine, dp=1)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_te_is_chosen_only_when_asked_and_importable(monkeypatch):
    from megatune.train import policy

    monkeypatch.setattr(policy, "_te_importable", lambda: False)
    with pytest.raises(TrainError, match="not importable"):
        resolve_policy(Request(transformer_impl="te"), GPU2, dp=1)
    monkeypatch.setattr(policy, "_te_importable", lambda: True)
    assert resolve_policy(Request(transformer_impl="te"), GPU2, dp=1).layer_spec == "te"
    assert resolve_policy(Request(), GPU2, dp=1).layer_spec == "native"  # installed TE does not change the default


def test_a_broken_te_install_is_named_in_the_refusal(monkeypatch):
    """`import transformer_engine` failing for any reason (here: blocked in sys.modules) refuses --transformer_impl
    te in one line that carries the import error, so a broken install is not mistaken for a missing one."""
    import sys

    from megatune.train import policy

    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    reason = policy.te_import_error()
    assert reason is not None and "transformer_engine halted" in reason and "\n" not in reason
    with pytest.raises(TrainError) as info:
        resolve_policy(Request(transformer_impl="te"), GPU2, dp=1)
    assert f"not importable ({reason})" in str(info.value) and "\n" not in str(info.value)


def test_dataloader_workers_beyond_one_are_refused_as_a_usage_error():
    refuse_unsupported(SftArguments(dataloader_num_workers=1))
    with pytest.raises(ArgumentError, match="^--dataloader_num_workers"):
        refuse_unsupported(SftArguments(dataloader_num_workers=4))


HF = {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
      "intermediate_size": 128, "vocab_size": 1000, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}


def _source(kind="megatron", tp=2, pp=1):
    return Source(Path("/ckpt/qwen2-tp2-pp1"), kind, "qwen2-tp2-pp1", {"hf_config": HF, "tp": tp, "pp": pp})


def test_parallel_sizes_follow_the_checkpoint_unless_given():
    assert resolve_parallel(SftArguments(), _source(), 4) == Parallel(world_size=4, tp=2, pp=1, dp=2)
    par = resolve_parallel(SftArguments(tp=1, pp=2, sequence_parallel=True), _source(), 4)
    assert (par.tp, par.pp, par.dp, par.sp) == (1, 2, 2, False)  # SP needs tp > 1
    with pytest.raises(TrainError, match="does not divide the world size 3"):
        resolve_parallel(SftArguments(), _source(), 3)
    with pytest.raises(TrainError, match="cannot be resharded"):
        resolve_parallel(SftArguments(tp=1), _source("run"), 2)


def test_the_plan_is_frozen_and_translates_the_resolved_run(tmp_path):
    sft = SftArguments(model_type="qwen2", batch_size=2, gradient_accumulation_steps=3, max_steps=7, bf16=True)
    parallel = resolve_parallel(sft, _source(), 4)
    policy = resolve_policy(Request.from_args(sft), CPU, parallel.dp)
    plan = resolve_plan(sft, _source(), parallel, policy, train_rows=100, val_rows=0, run_dir=tmp_path / "v0")
    meg = plan.megatron
    assert (meg.tensor_model_parallel_size, meg.data_parallel_size, meg.global_batch_size) == (2, 2, 12)
    assert (plan.micro_batch_size, plan.num_micro_batches, plan.train_iters) == (2, 3, 7)
    assert (meg.bf16, meg.use_distributed_optimizer) == (False, False)  # what runs on a CPU, not what was asked
    assert (meg.load, meg.save, meg.tensorboard_dir) == ("/ckpt/qwen2-tp2-pp1", str(tmp_path / "v0"),
                                                        f"{tmp_path / 'v0'}/runs")
    assert plan.args is sft and sft.tp is None and sft.bf16  # the user's arguments are not rewritten
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.parallel = parallel  # type: ignore[misc]
    assert plan.describe()["policy"]["precision"] == "fp32"


def test_no_cpu_boolean_is_passed_between_train_modules():
    """Device decisions are read from the policy: no function of megatune.train takes a `cpu`/`gpu` parameter."""
    offenders = []
    for path in TRAIN.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.args + node.args.kwonlyargs]
                offenders += [f"{path.name}:{node.name}({n})" for n in names if n in ("cpu", "gpu", "is_cpu")]
    assert offenders == []
