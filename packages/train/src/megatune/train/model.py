"""Build megatron-core GPTModel chunks for a Llama-like HF architecture, on this rank's TP/PP coordinates.

The TransformerConfig comes from `megatune.convert.arch.megatron_model_args(hf_config)` (the same table the
converter uses), so shapes and names always agree with converted shards: GQA (num_query_groups), qkv bias (Qwen2),
qk RMSNorm (Qwen3), kv_channels = head_dim (Qwen3's head_dim != hidden/heads), SwiGLU, RMSNorm eps, tied
embeddings, and RoPE.

RoPE: megatron-core 0.16's llama3 scaling hard-codes low/high freq factors 1/4 and an 8192 original context, so
we always set `inv_freq` ourselves, reproducing transformers' `_compute_llama3_parameters` (and the default /
linear rope types) exactly. `MegatuneGPTModel` also feeds `position_ids` to the rotary embedding (megatron-core's
RoPE ignores them and uses 0..s-1); with position ids restarting per packed document, each document gets the
rotary phases it would have alone. Layer spec, CPU initialisation, compiled kernels, fused loss and device: from the
device policy (policy.py; spec="native" is ours, spec.py, "te" Transformer Engine's); the document-mask interface
is described in spec.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from megatune.convert.arch import megatron_model_args
from megatune.convert.layout import padded_vocab_size, stage_layers
from megatune.train import fused
from megatune.train.errors import TrainError
from megatune.train.policy import active as active_policy
from megatune.train.spec import native_block_spec, te_block_spec


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """RoPE inverse frequencies exactly as transformers computes them (default, linear, llama3)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default", "linear"):  # linear scales positions instead: see seq_len_interpolation_factor
        return inv_freq
    if kind != "llama3":
        raise TrainError(f"rope_scaling type {kind!r} is not supported by megatune's GPTModel (config.json); "
                         f"supported: default, linear, llama3")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, out)


class PositionRotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding that honours per-token position ids ([b, s]) when MegatuneGPTModel hands them over."""

    position_ids: torch.Tensor | None = None

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        pos = self.position_ids
        if pos is None or packed_seq:
            return super().forward(max_seq_len, offset, packed_seq, cp_group)
        inv_freq = self.inv_freq.to(pos.device)
        seq = pos.to(inv_freq.dtype)
        if self.seq_len_interpolation_factor is not None:
            seq = seq / self.seq_len_interpolation_factor
        freqs = seq[..., None] * inv_freq  # [b, s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [b, s, d]
        return emb.transpose(0, 1)[:, :, None, :]  # [s, b, 1, d]: broadcasts over heads like [s, 1, 1, d]


class MegatuneGPTModel(GPTModel):
    """GPTModel whose rotary embedding uses the position_ids passed to forward (see module docstring), and whose
    loss on GPU is fused.vocab_parallel_cross_entropy (no fp32 copy of the [s, b, vocab] logits kept for backward)."""

    megatune_fused_loss: bool = False

    def compute_language_model_loss(self, labels, logits):
        if not self.megatune_fused_loss:
            return super().compute_language_model_loss(labels, logits)
        group = parallel_state.get_tensor_model_parallel_group()
        loss = fused.vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous(), group)  # [s, b]
        return loss.transpose(0, 1).contiguous()  # [b, s]

    def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
        if isinstance(self.rotary_pos_emb, PositionRotaryEmbedding):
            self.rotary_pos_emb.position_ids = position_ids
        try:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            if isinstance(self.rotary_pos_emb, PositionRotaryEmbedding):
                self.rotary_pos_emb.position_ids = None


def load_config(meta_or_hf_config) -> tuple[dict, dict]:
    """(hf_config, meta) from a megatune.json dict, an HF config dict, or a directory holding either."""
    if isinstance(meta_or_hf_config, (str, Path)):
        d = Path(meta_or_hf_config)
        from megatune.convert import ckpt_layout

        if ckpt_layout.has_meta(d):
            meta_or_hf_config = ckpt_layout.read_meta(d)  # the one megatune.json reader (types checked)
        elif (d / "config.json").is_file():
            meta_or_hf_config = json.loads((d / "config.json").read_text())
        else:
            raise TrainError(f"{d}: neither megatune.json nor config.json found; pass an HF model directory or a "
                             f"megatune/Megatron checkpoint directory")
    if "hf_config" in meta_or_hf_config:
        return dict(meta_or_hf_config["hf_config"]), dict(meta_or_hf_config)
    return dict(meta_or_hf_config), {}


def _pipeline_split(num_layers: int, pp: int, layers_per_stage) -> dict:
    """TransformerConfig fields for an (optionally uneven first/last) split, checked by convert's stage_layers."""
    if not layers_per_stage or len(layers_per_stage) != pp or pp == 1:
        counts = None
    else:
        counts = list(layers_per_stage)
    try:
        even = stage_layers(num_layers, pp)
    except ValueError:
        even = None
    if counts is None or counts == even:
        if even is None:
            raise TrainError(f"{num_layers} layers cannot be split evenly over pp={pp}; choose a pp that divides "
                             f"num_hidden_layers (or convert with uneven layers_per_stage)")
        return {}
    if stage_layers(num_layers, pp, first=counts[0], last=counts[-1]) != counts:
        raise TrainError(f"layers_per_stage {counts} is not expressible in megatron-core (only the first/last stage "
                         f"may differ); re-convert with an even split")
    return {"num_layers_in_first_pipeline_stage": counts[0], "num_layers_in_last_pipeline_stage": counts[-1]}


def transformer_config(hf_config: dict, *, tp: int, pp: int, params_dtype=torch.float32, sequence_parallel=False,
                       recompute_granularity=None, layers_per_stage=None, **overrides) -> TransformerConfig:
    a = megatron_model_args(hf_config)
    recompute = {}
    if recompute_granularity == "full":
        recompute = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    elif recompute_granularity == "selective":
        recompute = {"recompute_granularity": "selective"}
    elif recompute_granularity is not None:
        raise TrainError(f"recompute_granularity={recompute_granularity!r}: use None, 'full' or 'selective'")
    if sequence_parallel and tp == 1:
        sequence_parallel = False  # megatron-core asserts SP needs tp > 1; it is a no-op there anyway
    fields = dict(
        num_layers=a["num_layers"], hidden_size=a["hidden_size"], ffn_hidden_size=a["ffn_hidden_size"],
        num_attention_heads=a["num_attention_heads"], num_query_groups=a["num_query_groups"],
        kv_channels=a["kv_channels"], layernorm_epsilon=a["norm_epsilon"], normalization=a["normalization"],
        gated_linear_unit=a["swiglu"], activation_func=F.silu if a["swiglu"] else F.gelu,  # the family row's
        add_bias_linear=False, add_qkv_bias=a["add_qkv_bias"],
        qk_layernorm=a["qk_layernorm"], hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=float(hf_config.get("initializer_range", 0.02)),
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sequence_parallel,
        params_dtype=params_dtype, pipeline_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16, use_cpu_initialization=active_policy().cpu_init,
        **recompute, **_pipeline_split(a["num_layers"], pp, layers_per_stage),
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_model(meta_or_hf_config, *, tp: int, pp: int, params_dtype=torch.float32, sequence_parallel: bool = False,
                recompute_granularity: str | None = None, spec: str | None = None, seq_length: int | None = None,
                layers_per_stage=None, make_vocab_size_divisible_by: int | None = None, moe=None,
                **config_overrides) -> list[GPTModel]:
    """One GPTModel chunk for this rank (pre/post process by PP stage), after init_distributed(tp, pp).
    MoE families get moe_spec's layers; `moe`: their run-time choices (moe.MoESettings, default: the HF config's).

    `meta_or_hf_config`: megatune.json dict, HF config.json dict, or a directory holding one. `config_overrides`
    go to TransformerConfig (e.g. variable_seq_lengths=True, hidden_dropout=0.1)."""
    if not parallel_state.model_parallel_is_initialized():
        raise TrainError("build_model called before megatune.train.distributed.init_distributed(tp, pp)")
    if (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size()
            ) != (tp, pp):
        raise TrainError(f"build_model(tp={tp}, pp={pp}) but the process groups were initialised with "
                         f"tp={parallel_state.get_tensor_model_parallel_world_size()}, "
                         f"pp={parallel_state.get_pipeline_model_parallel_world_size()}")
    hf_config, meta = load_config(meta_or_hf_config)
    if layers_per_stage is None and meta.get("pp") == pp:
        layers_per_stage = meta.get("layers_per_stage")
    a = megatron_model_args(hf_config)
    if a["num_attention_heads"] % tp or (a["num_query_groups"] % tp and tp % a["num_query_groups"]):
        raise TrainError(f"cannot split {a['num_attention_heads']} heads / {a['num_query_groups']} KV heads over "
                         f"tp={tp}; choose a tp dividing both")
    policy = active_policy()
    spec = policy.layer_spec if spec in (None, "auto") else spec
    if spec not in ("te", "native"):
        raise TrainError(f"spec={spec!r}: use 'te' or 'native' (None: the device policy's)")
    from megatune.train import moe as moe_mod
    from megatune.train import moe_spec

    shape = moe_mod.moe_shape(hf_config)  # None for a dense model
    if shape is not None:
        if policy.fp8 is not None:
            raise TrainError(f"--fp8_format {policy.fp8.format}: FP8 is not available for MoE models (they train with "
                             f"megatune's native spec); leave --fp8_format unset")
        if spec == "te":
            raise TrainError("MoE models train with megatune's native spec; pass --transformer_impl native")
        moe = (moe or moe_mod.MoESettings(ep=parallel_state.get_expert_model_parallel_world_size())).resolve(hf_config)
        config_overrides = {**moe_mod.transformer_fields(shape, moe, tp=tp), **config_overrides}
    if policy.compiled_kernels and spec == "native":
        # compiled SwiGLU (megatron-core's bias_swiglu_impl) and our compiled RoPE in place of TE's (fused.py)
        fast = {"bias_activation_fusion": True, "apply_rope_fusion": fused.register_rope()}
        config_overrides = {**fast, **config_overrides}
    elif spec == "te" and policy.device_type == "cuda":
        # TE's fused RoPE kernel and megatron-core's compiled SwiGLU: without them the TE spec ran both as chains of
        # eager elementwise kernels (Megatron-LM's --apply-rope-fusion / --bias-swiglu-fusion; BENCHMARKS.md)
        config_overrides = {"bias_activation_fusion": True, "apply_rope_fusion": True, **config_overrides}
    if policy.fp8 is not None:  # TE layers only (the policy refuses FP8 with the native spec)
        config_overrides = {**policy.fp8.transformer_fields(), **config_overrides}
    config = transformer_config(hf_config, tp=tp, pp=pp, params_dtype=params_dtype,
                                sequence_parallel=sequence_parallel, recompute_granularity=recompute_granularity,
                                layers_per_stage=layers_per_stage, **config_overrides)
    book = None
    if shape is not None:
        layer_spec, book = moe_spec.moe_block(config, shape, moe, a["qk_layernorm"])
    else:
        layer_spec = (te_block_spec(a["qk_layernorm"]) if spec == "te"
                      else native_block_spec(config, a["qk_layernorm"]))
    divisible = make_vocab_size_divisible_by or meta.get("make_vocab_size_divisible_by") or 128
    scaling = a["rope_scaling"]
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    model = MegatuneGPTModel(
        config=config, transformer_layer_spec=layer_spec,
        vocab_size=padded_vocab_size(a["vocab_size"], divisible, tp),
        max_sequence_length=max(seq_length or 0, a["max_position_embeddings"]),
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True, share_embeddings_and_output_weights=not a["untie_embeddings_and_output_weights"],
        position_embedding_type="rope", rotary_percent=1.0, rotary_base=a["rotary_base"],
        seq_len_interpolation_factor=float(scaling["factor"]) if kind == "linear" else None,
    )
    if spec == "native":  # TE's fused rope wants [s, 1, 1, d] freqs: keep megatron's class there
        model.rotary_pos_emb.__class__ = PositionRotaryEmbedding
    model.rotary_pos_emb.inv_freq = rope_inv_freq(a["kv_channels"], a["rotary_base"], scaling).to(
        model.rotary_pos_emb.inv_freq.device)
    model.megatune_fused_loss = policy.fused_loss
    model.megatune_spec = spec  # "te" | "native": the state-dict naming, for load_pretrained/save_checkpoint
    model.megatune_hf_config = hf_config
    if book is not None:
        moe_spec.attach(model, book)  # model.megatune_moe_book: the MoE losses and load of each step
        if moe.local_dispatch:
            from megatune.train.moe_dispatch import use_local_dispatch

            use_local_dispatch(model)
    if policy.device_type == "cuda":
        model.cuda(torch.cuda.current_device())
    return [model]
