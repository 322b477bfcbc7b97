"""to_megatron / from_megatron: every row of the table, the derived counts, round trips, and validation errors."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from megatune.argmap import (
    TABLE,
    ArgumentError,
    MegatronArguments,
    SftArguments,
    from_megatron,
    to_megatron,
)

# a run that differs from every default, so a row that copies the wrong field shows up
CUSTOM = dict(
    optim="sgd", lr_scheduler_type="linear", learning_rate=3e-4, min_lr=2e-5, weight_decay=0.02, max_grad_norm=0.7,
    adam_beta1=0.8, adam_beta2=0.9, adam_epsilon=1e-6, fp16=True, tp=2, pp=2, sequence_parallel=True,
    use_distributed_optimizer=False, recompute_granularity="full", use_flash_attn=True, seed=7,
    resume_from_checkpoint="ckpt/qwen-tp2-pp2", output_dir="out", logging_dir="tb", logging_steps=3, eval_steps=11,
    save_steps=13, batch_size=2, gradient_accumulation_steps=4, dataloader_num_workers=6, max_length=512,
    num_train_epochs=3, warmup_steps=0, warmup_ratio=0.1, save_only_model=True, dataset=["d.jsonl"],
    expert_model_parallel_size=2, moe_router_topk=4, moe_aux_loss_coeff=0.02, moe_z_loss_coeff=1e-3,
    moe_grouped_gemm=False, moe_token_dispatcher_type="allgather", ckpt_format="torch_dist", async_save=True,
    fp8_format="hybrid", fp8_recipe="tensorwise", fp8_amax_history_len=16, fp8_amax_compute_algo="most_recent",
)
# world 16 = tp 2 x pp 2 x dp 4; global batch 2 x 4 x 4 = 32; train ceil(1000 x 3 / 32) = 94; eval ceil(70/32) = 3
EXPECTED = dict(
    optimizer="sgd", lr_decay_style="linear", lr=3e-4, min_lr=2e-5, weight_decay=0.02, clip_grad=0.7,
    adam_beta1=0.8, adam_beta2=0.9, adam_eps=1e-6, fp16=True, apply_query_key_layer_scaling=True, bf16=False,
    tensor_model_parallel_size=2, pipeline_model_parallel_size=2, sequence_parallel=True,
    use_distributed_optimizer=False, recompute_granularity="full", use_flash_attn=True, seed=7,
    load="ckpt/qwen-tp2-pp2", save="out", tensorboard_dir="tb", log_interval=3, eval_interval=11, save_interval=13,
    micro_batch_size=2, global_batch_size=32, num_workers=6, seq_length=512, train_iters=94, lr_decay_iters=94,
    eval_iters=3, lr_warmup_iters=10, no_save_optim=True, no_save_rng=True, world_size=16, data_parallel_size=4,
    transformer_impl="local", lr_warmup_init=0.0, lr_wsd_decay_iters=None, lr_wsd_decay_style="cosine",
    loss_scale=None, initial_loss_scale=2.0**16,
    expert_model_parallel_size=2, moe_router_topk=4, moe_aux_loss_coeff=0.02, moe_z_loss_coeff=1e-3,
    moe_grouped_gemm=False, moe_token_dispatcher_type="allgather", ckpt_format="torch_dist", async_save=True,
    fp8="hybrid", fp8_recipe="tensorwise", fp8_amax_history_len=16, fp8_amax_compute_algo="most_recent",
)


def custom(**overrides) -> SftArguments:
    return SftArguments(**{**CUSTOM, **overrides})


def test_every_row_of_the_table() -> None:
    assert set(EXPECTED) == {rule.megatron for rule in TABLE}, "a table row has no expected value here"
    meg = to_megatron(custom(), world_size=16, train_len=1000, val_len=70)
    assert {name: getattr(meg, name) for name in EXPECTED} == EXPECTED


def test_table_covers_every_megatron_field_exactly_once() -> None:
    names = [rule.megatron for rule in TABLE]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(MegatronArguments))
    sft_fields = {f.name for f in dataclasses.fields(SftArguments)}
    assert all(set(rule.sft) <= sft_fields for rule in TABLE)


def test_defaults_follow_swift() -> None:
    s = SftArguments()
    # ms-swift 2.5 SftArguments (and its __post_init__ for sft_type=full)
    assert (s.learning_rate, s.min_lr) == (1e-5, pytest.approx(1e-6))
    assert (s.lr_scheduler_type, s.warmup_ratio, s.weight_decay, s.max_grad_norm) == ("cosine", 0.05, 0.1, 1.0)
    assert (s.adam_beta1, s.adam_beta2, s.adam_epsilon, s.optim) == (0.9, 0.95, 1e-8, "adamw_torch")
    assert (s.logging_steps, s.eval_steps, s.save_steps, s.batch_size, s.num_train_epochs) == (5, 200, 200, 1, 1)
    assert (s.seed, s.max_length, s.dataset_test_ratio, s.max_steps, s.output_dir) == (42, 2048, 0.01, -1, "output")
    assert (s.truncation_strategy, s.sft_type, s.train_backend) == ("delete", "full", "megatron")
    assert (s.bf16, s.fp16) == (True, False)  # dtype AUTO -> bf16


def test_default_run_gives_swift_global_batch_of_16() -> None:
    meg = to_megatron(SftArguments(model_type="qwen2-7b"), world_size=8, train_len=160, val_len=0)
    assert (meg.micro_batch_size, meg.global_batch_size, meg.data_parallel_size) == (1, 16, 8)
    assert (meg.train_iters, meg.eval_iters, meg.lr_warmup_iters) == (10, 0, 1)
    assert meg.load == "qwen2-7b-tp1-pp1" and meg.tensorboard_dir == "output/runs"
    assert meg.recompute_granularity == "selective" and meg.seq_length == 2048


def test_data_parallel_size_not_world_size_in_global_batch() -> None:
    meg = to_megatron(custom(tp=4, pp=2, gradient_accumulation_steps=1), world_size=8, train_len=10, val_len=0)
    assert meg.global_batch_size == 2  # dp = 8 / (4 x 2) = 1, not 8


@pytest.mark.parametrize(("swift", "megatron", "warmup"), [
    ("cosine", "cosine", 5), ("linear", "linear", 5), ("constant", "constant", 0),
    ("constant_with_warmup", "constant", 5), ("inverse_sqrt", "inverse-square-root", 5),
    ("cosine_with_min_lr", "cosine", 5), ("warmup_stable_decay", "WSD", 5)])
def test_lr_scheduler_names(swift: str, megatron: str, warmup: int) -> None:
    meg = to_megatron(custom(lr_scheduler_type=swift, warmup_steps=5), world_size=4, train_len=3200, val_len=0)
    assert (meg.lr_decay_style, meg.lr_warmup_iters) == (megatron, warmup)


@pytest.mark.parametrize(("swift", "megatron"), [
    ("adamw_torch", "adam"), ("adamw", "adam"), ("adam", "adam"), ("adamw_torch_fused", "adam"), ("sgd", "sgd")])
def test_optimizer_names(swift: str, megatron: str) -> None:
    assert to_megatron(custom(optim=swift), world_size=4, train_len=10, val_len=0).optimizer == megatron


def test_max_steps_overrides_epochs_and_max_length_minus_one_is_none() -> None:
    meg = to_megatron(custom(max_steps=7, max_length=-1), world_size=4, train_len=10**6, val_len=0)
    assert (meg.train_iters, meg.lr_decay_iters, meg.seq_length) == (7, 7, None)


def test_global_batch_size_sets_accumulation() -> None:
    meg = to_megatron(custom(gradient_accumulation_steps=None, global_batch_size=64), world_size=16,
                      train_len=640, val_len=0)
    assert (meg.global_batch_size, meg.train_iters) == (64, 30)
    assert from_megatron(meg)["gradient_accumulation_steps"] == 8


@pytest.mark.parametrize("kwargs", [
    {}, {"fp16": False, "bf16": True}, {"fp16": False, "bf16": False}, {"lr_scheduler_type": "constant"},
    {"lr_scheduler_type": "constant_with_warmup", "warmup_steps": 3}, {"max_length": -1},
    {"recompute_granularity": "none"}, {"logging_dir": None}, {"max_steps": 5}, {"use_flash_attn": None}])
def test_round_trip_sft_megatron_sft(kwargs: dict) -> None:
    sft = custom(**kwargs)
    meg = to_megatron(sft, world_size=16, train_len=1000, val_len=70)
    back = from_megatron(meg)
    for rule in TABLE:  # every directly mapped swift field comes back unchanged
        if rule.backward is not None and len(rule.sft) == 1:
            assert back[rule.sft[0]] == getattr(sft, rule.sft[0]), rule
    # and the read-back values reproduce the same Megatron arguments (derived counts included)
    assert to_megatron(SftArguments(**back), world_size=16, train_len=1000, val_len=70) == meg


def test_from_megatron_reads_a_checkpoint_namespace() -> None:
    meg = to_megatron(custom(), world_size=16, train_len=1000, val_len=70)
    ns = argparse.Namespace(**dataclasses.asdict(meg), hidden_size=64, rank=0)  # extra names are ignored
    assert from_megatron(ns) == from_megatron(meg)
    assert MegatronArguments.from_namespace(ns) == meg
    old = argparse.Namespace(lr=1e-4, optimizer="adam")  # an older checkpoint without most arguments
    assert from_megatron(old) == {"learning_rate": 1e-4, "optim": "adamw_torch"}


def test_to_argv_uses_megatron_spelling() -> None:
    argv = to_megatron(custom(), world_size=16, train_len=1000, val_len=70).to_argv()
    assert argv[argv.index("--tensor-model-parallel-size") + 1] == "2"
    assert "--fp16" in argv and "--bf16" not in argv and "--world-size" not in argv


# --- validation: one clear line each -------------------------------------------------------------------------


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ArgumentError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ValueError)
    return message


def test_tp_pp_must_divide_world_size() -> None:
    msg = error_of(to_megatron, custom(tp=2, pp=2), world_size=6, train_len=10, val_len=0)
    assert msg.startswith("--tp/--pp:") and "does not divide the world size 6" in msg


def test_global_batch_size_must_divide() -> None:
    msg = error_of(to_megatron, custom(gradient_accumulation_steps=None, global_batch_size=20), world_size=16,
                   train_len=10, val_len=0)
    assert msg.startswith("--global_batch_size:") and "multiple of 8" in msg
    msg = error_of(to_megatron, custom(global_batch_size=16), world_size=16, train_len=10, val_len=0)
    assert "give only one" in msg  # 16 needs accumulation 2, but 4 was given


def test_empty_training_set_without_max_steps() -> None:
    assert "training set is empty" in error_of(to_megatron, custom(), world_size=16, train_len=0, val_len=0)
    assert to_megatron(custom(max_steps=3), world_size=16, train_len=0, val_len=0).train_iters == 3


@pytest.mark.parametrize(("kwargs", "where", "words"), [
    ({"fp16": True, "bf16": True}, "--fp16/--bf16", "both are true"),
    ({"dtype": "fp16", "bf16": True}, "--dtype", "contradicts"),
    ({"lr_scheduler_type": "polynomial"}, "--lr_scheduler_type", "no lr decay style"),
    ({"lr_scheduler_type": "cosine_with_restarts"}, "--lr_scheduler_type", "no lr decay style"),
    ({"optim": "adafactor"}, "--optim", "no optimizer"),
    ({"optim": "adamw_bnb_8bit"}, "--optim", "no optimizer"),
    ({"sft_type": "qlora"}, "--sft_type", "not supported by the megatron backend"),
    ({"sft_type": "lora", "lora_rank": 0}, "--lora_rank/--lora_alpha/--lora_dropout", "rank >= 1"),
    ({"sft_type": "banana"}, "--sft_type", "unknown sft_type"),
    ({"train_backend": "transformers"}, "--train_backend", "only has the megatron backend"),
    ({"model_name": ["a", "b", "c"]}, "--model_name", "at most 2"),
    ({"model_author": ["a", "b", "c"]}, "--model_author", "at most 2"),
    ({"truncation_strategy": "middle"}, "--truncation_strategy", "not one of"),
    ({"tp": 0}, "--tp", ">= 1"),
    ({"warmup_ratio": 1.5}, "--warmup_ratio", "[0, 1]"),
])
def test_argument_errors(kwargs: dict, where: str, words: str) -> None:
    msg = error_of(SftArguments, **kwargs)
    assert msg.startswith(where + ":") and words in msg and ";" in msg  # what; what to do


def test_swift_compatible_normalisations() -> None:
    s = SftArguments(truncation_strategy="truncation_left", model_name=["小黄"], val_dataset=["v.jsonl"])
    assert (s.truncation_strategy, s.model_name, s.dataset_test_ratio) == ("left", ["小黄", "小黄"], 0.0)
