"""Random-weight HF checkpoints of every supported architecture (dense and MoE), small enough for CI.

`config.json` is written in the layout real hub checkpoints use (`rope_theta`, `rope_scaling`,
`tie_word_embeddings`), not re-serialised by whatever transformers version is installed, so the converter is
tested against what users download. Weights come from the transformers model class itself (its own init and
parameter names), saved with safetensors exactly as `save_pretrained` lays them out.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .tokenizer import build_tokenizer

# Shape shared by all tiny models: 8 query heads in 2 KV groups lets tests reach tp=8 and the kv_heads < tp case.
_BASE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "use_cache": True,
}

_ARCHS = {
    "llama": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_scaling": None, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    },
    "llama3": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64, "rope_type": "llama3"},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    },
    "mistral": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    },
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": 4, "tie_word_embeddings": True,
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "head_dim": 16, "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": 4, "tie_word_embeddings": False,
    },
    # MoE: a few experts; Qwen2-MoE has a dense layer (mlp_only_layers) and a gated shared expert, and leaves
    # qkv_bias to its class default (true), as the hub's Qwen2-57B-A14B config.json does.
    "qwen2_moe": {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64, "decoder_sparse_step": 1, "mlp_only_layers": [1],
        "norm_topk_prob": False, "router_aux_loss_coef": 0.001, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": 4, "tie_word_embeddings": False,
    },
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "head_dim": 16, "attention_bias": False, "num_experts": 8, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
        "router_aux_loss_coef": 0.001, "use_sliding_window": False, "sliding_window": None, "max_window_layers": 4,
        "tie_word_embeddings": False,
    },
    "mixtral": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.02, "router_jitter_noise": 0.0, "sliding_window": None,
        "tie_word_embeddings": False,
    },
}
MOE_ARCHS = ("qwen2_moe", "qwen3_moe", "mixtral")

TINY_ARCHS = tuple(_ARCHS)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_config(arch: str, vocab_size: int, **overrides) -> dict:
    if arch not in _ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    return {**_BASE, **_ARCHS[arch], "vocab_size": vocab_size, **overrides}


def make_tiny_model(
    arch: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    num_shards: int = 1,
    **overrides,
) -> Path:
    """Write a random-weight HF checkpoint of `arch` with a real tokenizer to `out_dir`; return the path.

    `overrides` replace config.json fields (e.g. `num_hidden_layers=8`). `num_shards > 1` writes
    `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`, as large hub models do.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out)
    im_end, eot = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])

    config = tiny_config(arch, len(tokenizer), torch_dtype=dtype, bos_token_id=eot, eos_token_id=im_end, **overrides)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": eot, "eos_token_id": [im_end, eot], "pad_token_id": eot, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32)
    state = {k: v.detach().to(_DTYPES[dtype]).contiguous() for k, v in _hub_layout(model).items()}
    if config["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)  # tied checkpoints on the hub store only the embedding
    _save_safetensors(state, out, num_shards, save_file)
    return out


def _hub_layout(model) -> dict:
    """The state dict under the names hub checkpoints use: transformers >= 5 keeps MoE experts fused in 3-D tensors
    and splits them back per expert when saving (revert_weight_conversion); older versions store them per expert."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return model.state_dict()
    return revert_weight_conversion(model, model.state_dict())


def _save_safetensors(state: dict, out: Path, num_shards: int, save_file) -> None:
    names = list(state)
    if num_shards <= 1:
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        return
    per = -(-len(names) // num_shards)
    weight_map, total = {}, 0
    for i in range(num_shards):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {n: state[n] for n in names[i * per:(i + 1) * per]}
        save_file(chunk, out / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, fname))
        total += sum(t.numel() * t.element_size() for t in chunk.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
