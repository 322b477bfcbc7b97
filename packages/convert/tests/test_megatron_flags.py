"""megatron_args.sh: the written flags plus the checkpoint's stored `args` rebuild the model configuration exactly
under Megatron-LM's own argument-reading rules, for every family; and each written model flag is needed.

Megatron-LM is not a dependency, so its rules are copied here as data, from NVIDIA/Megatron-LM at tag core_v0.16.1
(commit 55ac7082517c3878ae653c07c09c534b8aed49f6):
- PARSER: the option strings, actions and defaults of megatron/training/arguments.py `parse_args` (fields generated
  from TransformerConfig/ModelParallelConfig by ArgumentGroupFactory included, with their `argparse_meta`), for
  every field below; pretrain_gpt.py's `args_defaults={'tokenizer_type': 'GPT2BPETokenizer'}`;
- READ_BACK: megatron/training/checkpointing.py `load_args_from_checkpoint`, each `_set_arg(name, force=...)` in
  order (tokenizer fields only with use_tokenizer_model_from_checkpoint_args, parallel sizes only with
  use_mp_args_from_checkpoint_args);
- `check_checkpoint_args` (same file), the validate_args steps that touch these fields (arguments.py), and what
  `core_transformer_config_from_args` (arguments.py) and `gpt_builder` (gpt_builders.py) hand to megatron-core.
The copy was checked against the real code of that tag on these checkpoints (parse_args + load_args_from_checkpoint
+ validate_args + core_transformer_config_from_args on CPU): the same configurations come out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
from pathlib import Path

import pytest
from megatune.convert.ckpt_layout import MEGATRON_ARGS, safe_load
from megatune.convert.cli import main
from megatune.convert.megatron_flags import MODEL_FLAGS

# (option strings, dest, action, type, nargs, default): arguments.py @ core_v0.16.1
PARSER = (
    (["--load"], "load", "store", str, None, None),
    (["--use-checkpoint-args"], "use_checkpoint_args", "store_true", None, 0, False),
    (["--use-mp-args-from-checkpoint-args"], "use_mp_args_from_checkpoint_args", "store_true", None, 0, False),
    (["--no-use-tokenizer-model-from-checkpoint-args"], "use_tokenizer_model_from_checkpoint_args", "store_false",
     None, 0, True),
    (["--ckpt-format"], "ckpt_format", "store", str, None, "torch_dist"),
    (["--tokenizer-type"], "tokenizer_type", "store", str, None, None),
    (["--tokenizer-model"], "tokenizer_model", "store", str, None, None),
    (["--vocab-file"], "vocab_file", "store", str, None, None),
    (["--tensor-model-parallel-size"], "tensor_model_parallel_size", "store", int, None, 1),
    (["--pipeline-model-parallel-size"], "pipeline_model_parallel_size", "store", int, None, 1),
    (["--expert-model-parallel-size"], "expert_model_parallel_size", "store", int, None, 1),
    (["--expert-tensor-parallel-size"], "expert_tensor_parallel_size", "store", int, None, None),
    (["--decoder-first-pipeline-num-layers"], "decoder_first_pipeline_num_layers", "store", int, None, None),
    (["--decoder-last-pipeline-num-layers"], "decoder_last_pipeline_num_layers", "store", int, None, None),
    (["--transformer-impl"], "transformer_impl", "store", str, None, "transformer_engine"),
    (["--fp16"], "fp16", "store_true", None, 0, False),
    (["--bf16"], "bf16", "store_true", None, 0, False),
    (["--num-layers"], "num_layers", "store", int, None, None),
    (["--hidden-size"], "hidden_size", "store", int, None, None),
    (["--ffn-hidden-size"], "ffn_hidden_size", "store", int, None, None),
    (["--seq-length"], "seq_length", "store", int, None, None),
    (["--num-attention-heads"], "num_attention_heads", "store", int, None, None),
    (["--num-query-groups"], "num_query_groups", "store", int, None, 1),
    (["--group-query-attention"], "group_query_attention", "store_true", None, 0, False),
    (["--kv-channels"], "kv_channels", "store", int, None, None),
    (["--max-position-embeddings"], "max_position_embeddings", "store", int, None, None),
    (["--position-embedding-type"], "position_embedding_type", "store", str, None, "learned_absolute"),
    (["--no-position-embedding"], "add_position_embedding", "store_false", None, 0, True),
    (["--use-rotary-position-embeddings"], "use_rotary_position_embeddings", "store_true", None, 0, False),
    (["--rotary-base"], "rotary_base", "store", int, None, 10000),
    (["--rotary-percent"], "rotary_percent", "store", float, None, 1.0),
    (["--rotary-interleaved"], "rotary_interleaved", "store_true", None, 0, False),
    (["--use-rope-scaling"], "use_rope_scaling", "store_true", None, 0, False),
    (["--rope-scaling-factor"], "rope_scaling_factor", "store", float, None, 8.0),
    (["--disable-bias-linear"], "add_bias_linear", "store_false", None, 0, True),
    (["--add-qkv-bias"], "add_qkv_bias", "store_true", None, 0, False),
    (["--squared-relu"], "squared_relu", "store_true", None, 0, False),
    (["--swiglu"], "swiglu", "store_true", None, 0, False),
    (["--untie-embeddings-and-output-weights"], "untie_embeddings_and_output_weights", "store_true", None, 0, False),
    (["--apply-layernorm-1p"], "layernorm_zero_centered_gamma", "store_true", None, 0, False),
    (["--normalization"], "normalization", "store", str, None, "LayerNorm"),
    (["--norm-epsilon"], "layernorm_epsilon", "store", float, None, 1e-05),
    (["--qk-layernorm"], "qk_layernorm", "store_true", None, 0, False),
    (["--apply-query-key-layer-scaling"], "apply_query_key_layer_scaling", "store_true", None, 0, False),
    (["--hidden-dropout"], "hidden_dropout", "store", float, None, 0.1),
    (["--attention-dropout"], "attention_dropout", "store", float, None, 0.1),
    (["--padded-vocab-size"], "padded_vocab_size", "store", int, None, None),
    (["--num-experts"], "num_experts", "store", int, None, None),
    (["--moe-layer-freq"], "moe_layer_freq", "store", str, None, 1),
    (["--moe-ffn-hidden-size"], "moe_ffn_hidden_size", "store", int, None, None),
    (["--moe-router-topk"], "moe_router_topk", "store", int, None, 2),
    (["--moe-router-pre-softmax"], "moe_router_pre_softmax", "store_true", None, 0, False),
    (["--moe-grouped-gemm"], "moe_grouped_gemm", "store_true", None, 0, False),
    (["--moe-shared-expert-intermediate-size"], "moe_shared_expert_intermediate_size", "store", int, None, None),
    (["--moe-shared-expert-gate"], "moe_shared_expert_gate", "store_true", None, 0, False),
    (["--moe-aux-loss-coeff"], "moe_aux_loss_coeff", "store", float, "+", 0.0),
    (["--moe-router-score-function"], "moe_router_score_function", "store", str, None, "softmax"),
    (["--moe-router-topk-scaling-factor"], "moe_router_topk_scaling_factor", "store", float, None, None),
    (["--moe-token-dispatcher-type"], "moe_token_dispatcher_type", "store", str, None, "allgather"),
)
ARGS_DEFAULTS = {"tokenizer_type": "GPT2BPETokenizer"}  # pretrain_gpt.py
# checkpointing.py load_args_from_checkpoint @ core_v0.16.1: (name, force), in order.
READ_BACK = (
    ("num_layers", False), ("hidden_size", False), ("ffn_hidden_size", False), ("seq_length", False),
    ("num_attention_heads", False), ("num_query_groups", True), ("group_query_attention", True),
    ("kv_channels", False), ("max_position_embeddings", False), ("position_embedding_type", True),
    ("add_position_embedding", True), ("use_rotary_position_embeddings", True), ("rotary_base", True),
    ("rotary_percent", True), ("rotary_interleaved", True), ("add_bias_linear", True), ("add_qkv_bias", True),
    ("squared_relu", True), ("swiglu", True), ("untie_embeddings_and_output_weights", True),
    ("apply_layernorm_1p", True), ("normalization", True), ("apply_query_key_layer_scaling", True),
    ("attention_dropout", True), ("hidden_dropout", True), ("hybrid_override_pattern", True), ("spec", True),
    ("hybrid_attention_ratio", True), ("hybrid_mlp_ratio", True), ("num_experts", True), ("moe_layer_freq", True),
    ("moe_ffn_hidden_size", True),  # only when the checkpoint has num_experts; else set to None
    ("moe_router_topk", True), ("moe_token_dispatcher_type", False), ("moe_router_pre_softmax", True),
    ("moe_grouped_gemm", True), ("moe_shared_expert_intermediate_size", True), ("moe_router_score_function", True),
    ("moe_router_enable_expert_bias", True), ("moe_router_topk_scaling_factor", True),
    ("mamba_state_dim", True), ("mamba_head_dim", True), ("mamba_num_groups", True), ("mamba_num_heads", True),
    ("is_hybrid_model", True), ("heterogeneous_layers_config_path", True),
    ("heterogeneous_layers_config_encoded_json", True), ("moe_latent_size", True),
)
TOKENIZER_READ_BACK = (("tokenizer_model", True), ("tokenizer_type", True))  # if use_tokenizer_model_from_...
AFTER_TOKENIZER = (("tiktoken_pattern", True), ("padded_vocab_size", False), ("ckpt_format", False))
MP_READ_BACK = (("tensor_model_parallel_size", True), ("pipeline_model_parallel_size", True),
                ("virtual_pipeline_model_parallel_size", True), ("num_layers_per_virtual_pipeline_stage", False),
                ("expert_model_parallel_size", True))  # if use_mp_args_from_checkpoint_args (version >= 3.0)


def megatron_lm_parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pretrain_gpt.py", add_help=False, allow_abbrev=False)
    for flags, dest, action, typ, nargs, default in PARSER:
        kw = {"dest": dest, "default": default, "action": action}
        if action == "store":
            kw.update(type=typ, **({"nargs": nargs} if nargs else {}))
        p.add_argument(*flags, **kw)
    return p.parse_args(argv)  # an unknown or misspelt flag exits: every written flag must exist in Megatron-LM


def load_args_from_checkpoint(args: argparse.Namespace, ckpt: argparse.Namespace) -> None:
    def set_arg(name, force):
        if not force and getattr(args, name, None) is not None:
            return
        value = getattr(ckpt, name, None)
        if value is not None:
            setattr(args, name, value)

    for name, force in READ_BACK:
        if name == "moe_ffn_hidden_size" and getattr(ckpt, "num_experts", None) is None:
            args.moe_ffn_hidden_size = None
        else:
            set_arg(name, force)
    if args.use_tokenizer_model_from_checkpoint_args:
        for name, force in TOKENIZER_READ_BACK:
            set_arg(name, force)
    for name, force in AFTER_TOKENIZER:
        set_arg(name, force)
    if args.use_mp_args_from_checkpoint_args:
        for name, force in MP_READ_BACK:
            set_arg(name, force)


def validate_args(args: argparse.Namespace) -> None:
    for key, value in ARGS_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.expert_tensor_parallel_size is None:
        args.expert_tensor_parallel_size = args.tensor_model_parallel_size
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = (int((4 * args.hidden_size * 2 / 3) / 64) * 64 if args.swiglu
                                else 4 * args.hidden_size)
    if args.kv_channels is None:
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"
    args.use_dist_ckpt = args.ckpt_format != "torch"


def check_checkpoint_args(args: argparse.Namespace, ckpt: argparse.Namespace, version: float) -> None:
    names = ["num_layers", "hidden_size", "num_attention_heads"]
    if version >= 3.0 and not args.use_dist_ckpt:
        names += ["tensor_model_parallel_size", "pipeline_model_parallel_size"]
    for name in names:
        assert getattr(ckpt, name) == getattr(args, name), f"{name}: checkpoint {getattr(ckpt, name)}, args " \
                                                           f"{getattr(args, name)}"
    assert getattr(ckpt, "add_position_embedding", True) == args.add_position_embedding


def model_config(args: argparse.Namespace) -> dict:
    """What core_transformer_config_from_args + gpt_builder hand to megatron-core's GPTModel."""
    one = args.moe_aux_loss_coeff
    return {
        "num_layers": args.num_layers, "hidden_size": args.hidden_size, "ffn_hidden_size": args.ffn_hidden_size,
        "num_attention_heads": args.num_attention_heads,
        "num_query_groups": args.num_query_groups if args.group_query_attention else None,
        "kv_channels": args.kv_channels, "layernorm_epsilon": args.layernorm_epsilon,
        "normalization": args.normalization, "gated_linear_unit": args.swiglu,
        "activation": "silu" if args.swiglu else ("squared_relu" if args.squared_relu else "gelu"),
        "add_bias_linear": args.add_bias_linear, "add_qkv_bias": args.add_qkv_bias,
        "qk_layernorm": args.qk_layernorm, "layernorm_zero_centered_gamma": args.layernorm_zero_centered_gamma,
        "hidden_dropout": args.hidden_dropout, "attention_dropout": args.attention_dropout,
        "bf16": args.bf16, "fp16": args.fp16,
        "params_dtype": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "tensor_model_parallel_size": args.tensor_model_parallel_size,
        "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
        "num_layers_in_first_pipeline_stage": args.decoder_first_pipeline_num_layers,
        "num_layers_in_last_pipeline_stage": args.decoder_last_pipeline_num_layers,
        "transformer_impl": args.transformer_impl, "rotary_interleaved": args.rotary_interleaved,
        "vocab_size": args.padded_vocab_size, "max_sequence_length": args.max_position_embeddings,
        "share_embeddings_and_output_weights": not args.untie_embeddings_and_output_weights,
        "position_embedding_type": args.position_embedding_type, "rotary_percent": args.rotary_percent,
        "rotary_base": args.rotary_base, "rope_scaling": args.use_rope_scaling,
        "num_moe_experts": args.num_experts,
        **({"moe_router_topk": args.moe_router_topk, "moe_ffn_hidden_size": args.moe_ffn_hidden_size,
            "moe_shared_expert_intermediate_size": args.moe_shared_expert_intermediate_size,
            "moe_shared_expert_gate": args.moe_shared_expert_gate, "moe_layer_freq": args.moe_layer_freq,
            "moe_router_pre_softmax": args.moe_router_pre_softmax, "moe_grouped_gemm": args.moe_grouped_gemm,
            "moe_aux_loss_coeff": one[0] if isinstance(one, list) and len(one) == 1 else one,
            "expert_model_parallel_size": args.expert_model_parallel_size,
            "expert_tensor_parallel_size": args.expert_tensor_parallel_size} if args.num_experts else {}),
    }


def megatron_lm_config(argv: list[str], ckpt_args: argparse.Namespace, version: float = 3.0) -> dict:
    args = megatron_lm_parse(argv)
    assert args.use_checkpoint_args
    load_args_from_checkpoint(args, ckpt_args)
    validate_args(args)
    check_checkpoint_args(args, ckpt_args, version)
    return model_config(args)


def expected_config(cfg: dict, *, tp: int, pp: int, ep: int, counts: list[int] | None, dtype: str,
                    naming: str) -> dict:
    """The model an HF config.json describes, in megatron-core's terms, written out from the config by hand."""
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    groups = cfg.get("num_key_value_heads", heads)
    cls = cfg["architectures"][0]
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    scaling = cfg.get("rope_scaling") or {}
    vocab, step = cfg["vocab_size"], 128 * tp
    out = {
        "num_layers": cfg["num_hidden_layers"], "hidden_size": hidden, "ffn_hidden_size": cfg["intermediate_size"],
        "num_attention_heads": heads, "num_query_groups": groups if groups != heads else None,
        "kv_channels": cfg.get("head_dim") or hidden // heads, "layernorm_epsilon": cfg["rms_norm_eps"],
        "normalization": "RMSNorm", "gated_linear_unit": True, "activation": "silu", "add_bias_linear": False,
        "add_qkv_bias": cls in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM") or bool(cfg.get("attention_bias")),
        "qk_layernorm": cls in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"), "layernorm_zero_centered_gamma": False,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "bf16": dtype == "bf16", "fp16": dtype == "fp16",
        "params_dtype": dtype, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
        "num_layers_in_first_pipeline_stage": counts[0] if counts else None,
        "num_layers_in_last_pipeline_stage": counts[-1] if counts else None,
        "transformer_impl": "transformer_engine" if naming == "te" else "local", "rotary_interleaved": False,
        "vocab_size": -(-vocab // step) * step, "max_sequence_length": cfg["max_position_embeddings"],
        "share_embeddings_and_output_weights": bool(cfg.get("tie_word_embeddings")),
        "position_embedding_type": "rope", "rotary_percent": 1.0, "rotary_base": cfg["rope_theta"],
        "rope_scaling": scaling.get("rope_type") == "llama3", "num_moe_experts": experts,
    }
    if experts:
        dense = set(cfg.get("mlp_only_layers") or ())
        shared = cfg.get("shared_expert_intermediate_size")
        out.update({
            "moe_router_topk": cfg["num_experts_per_tok"],
            "moe_ffn_hidden_size": cfg.get("moe_intermediate_size") or cfg["intermediate_size"],
            "moe_shared_expert_intermediate_size": shared, "moe_shared_expert_gate": bool(shared),
            "moe_layer_freq": [int(i not in dense) for i in range(cfg["num_hidden_layers"])],
            # HF Qwen2-MoE keeps the top-k softmax probabilities over all experts (norm_topk_prob false)
            "moe_router_pre_softmax": cfg.get("norm_topk_prob", True) is False, "moe_grouped_gemm": False,
            "moe_aux_loss_coeff": cfg["router_aux_loss_coef"], "expert_model_parallel_size": ep,
            "expert_tensor_parallel_size": tp,
        })
    return out


# arch -> (tp, pp, ep, uneven first/last stage sizes or None, dtype, naming)
CASES = {
    "llama": (2, 2, 1, None, "bf16", "te"),
    "llama3": (2, 2, 1, [1, 3], "bf16", "local"),
    "mistral": (1, 2, 1, None, "fp16", "local"),
    "qwen2": (2, 1, 1, None, "fp32", "local"),
    "qwen3": (2, 2, 1, [3, 1], "bf16", "local"),
    "qwen2_moe": (2, 1, 2, None, "bf16", "local"),
    "qwen3_moe": (1, 2, 2, None, "bf16", "local"),
    "mixtral": (2, 1, 2, None, "fp32", "local"),
}


def written_flags(ckpt: Path) -> list[str]:
    """MEGATRON_ARGS as bash sees it after `source megatron_args.sh`."""
    out = subprocess.run(["bash", "-c", 'source "$1" && printf "%s\\0" "${MEGATRON_ARGS[@]}"', "_",
                          str(ckpt / MEGATRON_ARGS)], capture_output=True, text=True, check=True).stdout
    return out.split("\0")[:-1]


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """arch -> (HF config, export dir, the flags megatron_args.sh holds, the export command's output lines)."""
    out = {}
    root = tmp_path_factory.mktemp("flags")
    for arch, (tp, pp, ep, counts, dtype, naming) in CASES.items():
        if arch not in tiny:
            continue
        d = root / arch
        argv = ["--model_id_or_path", str(tiny[arch]), "--to_megatron", "true", "--megatron_output_dir", str(d),
                "--tp", str(tp), "--pp", str(pp), "--dtype", dtype, "--naming", naming]
        argv += ["--ep", str(ep)] if ep > 1 else []
        if counts:
            argv += ["--decoder_first_pipeline_num_layers", str(counts[0]),
                     "--decoder_last_pipeline_num_layers", str(counts[1])]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(argv) == 0
        out[arch] = (json.loads((tiny[arch] / "config.json").read_text()), d, written_flags(d),
                     printed.getvalue().splitlines())
    return out


def stored_args(ckpt: Path) -> argparse.Namespace:
    rank = sorted((ckpt / "release").glob("mp_rank_*"))[0] / "model_optim_rng.pt"
    return safe_load(rank)["args"]


@pytest.mark.parametrize("arch", list(CASES))
def test_flags_and_stored_args_rebuild_the_model(exported, arch):
    if arch not in exported:
        pytest.skip(f"no tiny {arch} model")
    cfg, ckpt, flags, printed = exported[arch]
    tp, pp, ep, counts, dtype, naming = CASES[arch]
    got = megatron_lm_config(flags, stored_args(ckpt))
    assert got == expected_config(cfg, tp=tp, pp=pp, ep=ep, counts=counts, dtype=dtype, naming=naming)
    parsed = megatron_lm_parse(flags)
    assert (parsed.load, parsed.tokenizer_model, parsed.ckpt_format) == (str(ckpt), str(ckpt), "torch")
    assert parsed.tokenizer_type == "HuggingFaceTokenizer" and (ckpt / "tokenizer.json").is_file()
    # the command's output ends with the same flags, the checkpoint's absolute path in them
    assert printed[-1].split(": ", 1)[0] == "megatune export" and " ".join(flags) in printed[-1], printed[-1]


@pytest.mark.parametrize("arch", list(CASES))
def test_every_written_model_flag_is_needed(exported, arch):
    """Dropping any one model flag (with its values) from the file gives another model or a refused load. Flags that
    restate Megatron-LM 0.16.1's default (e.g. --norm-epsilon 1e-05) are written anyway, robust to a changed
    default; those are skipped here."""
    if arch not in exported:
        pytest.skip(f"no tiny {arch} model")
    cfg, ckpt, flags, _ = exported[arch]
    args = stored_args(ckpt)
    want = megatron_lm_config(flags, args)
    model_flags = {f.flag for f in MODEL_FLAGS}
    starts = [i for i, w in enumerate(flags) if w in model_flags]
    assert starts, "no model flag written"
    for i in starts:
        j = i + 1
        while j < len(flags) and not flags[j].startswith("--"):
            j += 1
        if vars(megatron_lm_parse(flags[i:j])) == vars(megatron_lm_parse([])):
            continue
        try:
            other = megatron_lm_config(flags[:i] + flags[j:], args)
        except AssertionError:  # check_checkpoint_args refuses the load (parallel sizes)
            continue
        assert other != want, f"{flags[i:j]} changes nothing: it should not be written"


def test_no_flags_gives_another_model(exported):
    """The bug being fixed: --use-checkpoint-args alone loses qk_layernorm / norm_epsilon / the layer names."""
    if "qwen3" not in exported:
        pytest.skip("no tiny qwen3 model")
    cfg, ckpt, _, _ = exported["qwen3"]
    bare = megatron_lm_config(["--load", str(ckpt), "--use-checkpoint-args", "--tensor-model-parallel-size", "2",
                               "--pipeline-model-parallel-size", "2", "--ckpt-format", "torch"], stored_args(ckpt))
    assert (bare["qk_layernorm"], bare["layernorm_epsilon"], bare["transformer_impl"]) == \
        (False, 1e-5, "transformer_engine")
