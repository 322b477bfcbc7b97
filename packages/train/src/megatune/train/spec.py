"""megatune's torch-native layer spec for megatron-core's GPTModel (the default: `--transformer_impl native`).

It is megatron-core's local spec (`get_gpt_layer_local_spec`) with three modules swapped, keeping every
state-dict name identical (`input_layernorm`, `self_attention.linear_qkv`, `self_attention.q_layernorm`, ...,
`pre_mlp_layernorm`, `mlp.linear_fc1`, `decoder.final_layernorm`) so `naming="local"` checkpoints load unchanged:

- `RMSNorm`: `F.rms_norm` computed in fp32 like HF's LlamaRMSNorm (one torch.compile'd kernel on CUDA, fused.py), and usable with sequence parallelism
  (megatron-core's WrappedTorchNorm refuses SP). Under SP its weight is tagged `sequence_parallel=True` so
  megatron-core's finalize_model_grads all-reduces its gradient over the TP group.
- `SDPAttention`: core attention through `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU,
  GQA without materialising repeated K/V), instead of megatron-core's unfused baddbmm + softmax.

Document masking (packed sequences) -- the interface for the training loop:
    GPTModel.forward(input_ids, position_ids, attention_mask, ...) passes `attention_mask` unchanged down to
    core attention. With this spec `attention_mask` may be
      * None                              -> plain causal attention (SDPA is_causal=True, no mask tensor);
      * an integer tensor [b, s]          -> document ids: token i attends to token j iff j <= i and
                                             doc[i] == doc[j] (block-causal). Build it with `document_mask(ids)`.
                                             Position ids should restart at 0 for each document; then every
                                             document's logits equal those of running it alone.
      * a bool tensor [b or 1, 1, s, s]   -> megatron-core convention, True = masked out.
    It is a plain tensor (not a custom object) so it passes through megatron-core's pipeline schedules and
    activation recomputation unchanged. On GPU, document ids use flex_attention with a BlockMask (no S x S float
    mask; needs head_dim >= 16 and no attention dropout); otherwise an explicit boolean [b, 1, s, s] mask is
    built. Padding tokens may carry any id (give them their own, e.g. -1); every token attends at least to
    itself, so no row is fully masked. With the Transformer Engine spec document ids are not supported (TE needs
    packed_seq_params).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatune.train import fused
from megatune.train.errors import TrainError
from megatune.train.policy import active as active_policy


class RMSNorm(torch.nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), computed in fp32 then cast back (as HF's LlamaRMSNorm)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.config = config
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype,
                                                    device="cpu" if config.use_cpu_initialization else None))
        # finalize_model_grads sums grads of params tagged sequence_parallel over TP (each rank saw s/tp tokens).
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.rms_norm(x, self.weight, self.eps)  # torch.compile'd on CUDA, eager on CPU


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """The `attention_mask` to pass for a packed batch: document ids [b, s] as int32 (see module docstring)."""
    if document_ids.dim() != 2 or document_ids.is_floating_point() or document_ids.dtype == torch.bool:
        raise TrainError(f"document ids must be an integer tensor [batch, seq], got {tuple(document_ids.shape)} "
                         f"{document_ids.dtype}; pass one document id per token")
    return document_ids.to(torch.int32)


def _block_causal_bool(doc: torch.Tensor) -> torch.Tensor:
    """doc [b, s] -> bool [b, 1, s, s], True = may attend (SDPA convention)."""
    s = doc.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc.device).tril()
    return (doc[:, :, None] == doc[:, None, :]) & causal  # [b, s, s]


_BLOCK_MASK_CACHE: dict = {}


def _flex_block_mask(doc: torch.Tensor, heads: int):
    """BlockMask for flex_attention, cached per document-id tensor (all layers of one forward share it)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (doc.data_ptr(), doc._version, tuple(doc.shape), heads)
    if key not in _BLOCK_MASK_CACHE:
        _BLOCK_MASK_CACHE.clear()  # one live batch at a time is enough; keeps memory bounded

        def mask_mod(b, h, q, kv):
            return (doc[b, q] == doc[b, kv]) & (q >= kv)

        _BLOCK_MASK_CACHE[key] = create_block_mask(mask_mod, doc.shape[0], None, doc.shape[1], doc.shape[1],
                                                   device=doc.device)
    return _BLOCK_MASK_CACHE[key]


_compiled_flex = None


def _flex_attention(q, k, v, block_mask, scale):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


class SDPAttention(MegatronModule):
    """Core attention via F.scaled_dot_product_attention; drop-in for megatron-core's DotProductAttention."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise TrainError("context parallelism needs the Transformer Engine spec; install transformer-engine "
                             "or set --context_parallel_size 1")
        self.attn_mask_type = attn_mask_type
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else self.head_dim ** -0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.policy = active_policy()  # which SDPA kernels; flex_attention for document masks or not

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise TrainError("SDPAttention: packed_seq_params/attention_bias are not supported by the native spec; "
                             "pass document ids as attention_mask instead (see megatune.train.spec)")
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        sq, b = query.shape[0], query.shape[1]
        dropout_p = self.dropout_p if self.training else 0.0
        gqa = q.shape[1] != k.shape[1]
        with self._rng_context(dropout_p), self.policy.attention_kernels():
            if attention_mask is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p,
                                                     scale=self.softmax_scale, enable_gqa=gqa)
            elif attention_mask.dtype != torch.bool:  # document ids [b, s]
                # flex_attention needs head_dim >= 16 and has no dropout; otherwise an explicit bool mask
                if self.policy.flex_documents and attention_mask.is_cuda and dropout_p == 0.0 and q.shape[-1] >= 16:
                    out = _flex_attention(q, k, v, _flex_block_mask(attention_mask, q.shape[1]), self.softmax_scale)
                else:
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_block_causal_bool(attention_mask)[:, None],
                                                         dropout_p=dropout_p, scale=self.softmax_scale,
                                                         enable_gqa=gqa)
            else:  # megatron-core convention: True = masked out
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, dropout_p=dropout_p,
                                                     scale=self.softmax_scale, enable_gqa=gqa)
        # [b, heads, s, d] -> [s, b, heads * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _rng_context(self, dropout_p: float):
        # Attention dropout acts on TP-sharded heads: use the TP-rank-specific RNG stream (as DotProductAttention).
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()


NORMS = {"RMSNorm": RMSNorm}  # the family row's `normalization` -> the native spec's module


def norm_module(normalization: str) -> type[torch.nn.Module]:
    """The native spec's module for a family row's `normalization` (TransformerConfig.normalization)."""
    try:
        return NORMS[normalization]
    except KeyError:
        raise ValueError(f"normalization {normalization!r} has no module in the native layer spec "
                         f"(it has: {', '.join(NORMS)}); add one to spec.NORMS") from None


def native_layer_spec(qk_layernorm: bool, normalization: str = "RMSNorm") -> ModuleSpec:
    """megatron-core's local GPT layer spec with megatune's norm (the family row's) and SDPA core attention."""
    norm = norm_module(normalization)
    spec = copy.deepcopy(get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization))
    layer = spec.submodules
    layer.input_layernorm = norm
    layer.pre_mlp_layernorm = norm
    attn = layer.self_attention.submodules
    attn.core_attention = SDPAttention
    if qk_layernorm:
        attn.q_layernorm = norm
        attn.k_layernorm = norm
    return spec


def native_block_spec(config: TransformerConfig, qk_layernorm: bool, vp_stage: int | None = None
                      ) -> TransformerBlockSubmodules:
    """The decoder block for this PP stage: our layer spec x local layer count, final norm of the same kind."""
    layer = native_layer_spec(qk_layernorm, config.normalization)
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=norm_module(config.normalization))


def te_block_spec(qk_layernorm: bool):
    """Transformer Engine layer spec (fused layernorm+linear: names differ, naming="te")."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
