"""Tiny HF MoE models (Qwen2-MoE, Qwen3-MoE, Mixtral) and an in-memory HF -> megatron-core state dict for tests.

The oracle is deliberately independent of megatune.convert: plain tensor slicing written from megatron-core's
layout (QKV grouped per KV head, gated fc1 = [gate; up] per TP shard, experts contiguous per EP rank).
"""

from __future__ import annotations

import torch

VOCAB = 1024  # a multiple of 128 x tp: no padded vocab rows (they would enter the CE softmax)
_BASE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             max_position_embeddings=512, hidden_act="silu", initializer_range=0.02, vocab_size=VOCAB,
             rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, use_cache=False)
CONFIGS = {
    # shared expert + sigmoid gate, one dense layer, top-k not renormalised
    "qwen2_moe": dict(_BASE, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", intermediate_size=96,
                      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[1],
                      norm_topk_prob=False, router_aux_loss_coef=0.01, qkv_bias=True),
    "qwen3_moe": dict(_BASE, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", intermediate_size=96,
                      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
                      decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, router_aux_loss_coef=0.01,
                      attention_bias=False),
    "mixtral": dict(_BASE, architectures=["MixtralForCausalLM"], model_type="mixtral", intermediate_size=32,
                    num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02, router_jitter_noise=0.0),
}
FAMILIES = tuple(CONFIGS)


def hf_model(family: str, seed: int = 0, **overrides):
    """A random-weight HF model of `family` (fp32, eval mode), with sharper routers than HF's init so top-k choices
    are well separated (parity tests compare routing decisions, not only sums)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(CONFIGS[family], **overrides)
    config = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    return model.eval(), cfg


def _qkv(sd, p, cfg):
    heads, groups = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // heads
    out = []
    for suffix in ("weight", "bias"):
        q = sd.get(f"{p}self_attn.q_proj.{suffix}")
        if q is None:
            continue
        k, v = sd[f"{p}self_attn.k_proj.{suffix}"], sd[f"{p}self_attn.v_proj.{suffix}"]
        per = heads // groups
        q = q.reshape(groups, per * d, *q.shape[1:])
        k, v = k.reshape(groups, d, *k.shape[1:]), v.reshape(groups, d, *v.shape[1:])
        out.append((suffix, torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])))
    return out


def megatron_state(model, cfg: dict) -> dict[str, torch.Tensor]:
    """Full (tp=1, pp=1, ep=1) megatron-core state dict with global layer and expert indices."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": sd["model.norm.weight"], "output_layer.weight": sd["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
        for suffix, t in _qkv(sd, p, cfg):
            out[m + f"self_attention.linear_qkv.{suffix}"] = t
        out[m + "self_attention.linear_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        for hf, mc in (("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")):
            if p + f"self_attn.{hf}.weight" in sd:
                out[m + f"self_attention.{mc}.weight"] = sd[p + f"self_attn.{hf}.weight"]
        if p + "mlp.gate.weight" not in sd:  # dense layer
            out[m + "mlp.linear_fc1.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
            out[m + "mlp.linear_fc2.weight"] = sd[p + "mlp.down_proj.weight"]
            continue
        out[m + "mlp.router.weight"] = sd[p + "mlp.gate.weight"]
        gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]  # [E, 2f, h], [E, h, f]
        for j in range(gate_up.shape[0]):
            out[m + f"mlp.experts.local_experts.{j}.linear_fc1.weight"] = gate_up[j]
            out[m + f"mlp.experts.local_experts.{j}.linear_fc2.weight"] = down[j]
        if p + "mlp.shared_expert.gate_proj.weight" in sd:
            s = p + "mlp.shared_expert."
            out[m + "mlp.shared_experts.linear_fc1.weight"] = torch.cat([sd[s + "gate_proj.weight"],
                                                                         sd[s + "up_proj.weight"]])
            out[m + "mlp.shared_experts.linear_fc2.weight"] = sd[s + "down_proj.weight"]
            out[m + "mlp.shared_experts.gate_weight"] = sd[p + "mlp.shared_expert_gate.weight"]
    return out


def _split(t: torch.Tensor, dim: int, rank: int, parts: int) -> torch.Tensor:
    return t.chunk(parts, dim=dim)[rank].clone()


def shard_for_rank(full: dict, model) -> dict[str, torch.Tensor]:
    """This rank's megatron-core state dict (names from `model.state_dict()`), cut from the full one."""
    from megatron.core import parallel_state as ps

    tp, tr = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    ep, er = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    offset = model.decoder.layers[0].layer_number - 1 if len(model.decoder.layers) else 0
    local = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    out = {}
    for name, want in local.items():
        parts = name.split(".")
        if name.startswith("decoder.layers."):
            parts[2] = str(int(parts[2]) + offset)
        if "local_experts" in parts:
            j = parts.index("local_experts") + 1
            parts[j] = str(int(parts[j]) + er * (model.config.num_moe_experts // ep))
        t = full[".".join(parts)]
        if name.endswith(("word_embeddings.weight", "output_layer.weight")):
            t = torch.cat([t, t.new_zeros(want.shape[0] * tp - t.shape[0], t.shape[1])])
            t = _split(t, 0, tr, tp)
        elif "linear_qkv" in name:
            t = _split(t, 0, tr, tp)
        elif name.endswith("linear_fc1.weight"):
            g, u = t.chunk(2, dim=0)
            t = torch.cat([_split(g, 0, tr, tp), _split(u, 0, tr, tp)])
        elif name.endswith(("linear_fc2.weight", "linear_proj.weight")):
            t = _split(t, 1, tr, tp)
        assert tuple(t.shape) == tuple(want.shape), (name, tuple(t.shape), tuple(want.shape), ep)
        out[name] = t.to(want.dtype)
    return out


def build(cfg: dict, *, tp: int, pp: int, settings=None, sequence_parallel: bool = False, **overrides):
    """One MoE GPTModel chunk for this rank through model.build_model (after init_distributed(tp, pp, ep=...))."""
    from megatune.train.model import build_model

    return build_model(cfg, tp=tp, pp=pp, sequence_parallel=sequence_parallel, moe=settings, **overrides)[0]


def sharpen_routers(model_dir, factor: float = 20.0) -> None:
    """Scale the router weights of a tiny HF MoE checkpoint on disk: with HF's init (std 0.02) many tokens have
    near-tied top-k experts, and a different reduction order (another TP layout) flips a tie now and then, which
    moves the loss and the aux loss by a discrete step (~1e-4 .. 1e-3 at this size) instead of a rounding error."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    path = Path(model_dir) / "model.safetensors"
    state = load_file(path)
    routers = [k for k in state if k.endswith("mlp.gate.weight")]
    assert routers, f"{path}: no router weights (mlp.gate.weight)"
    for k in routers:
        state[k] = state[k] * factor
    save_file(state, path, metadata={"format": "pt"})
