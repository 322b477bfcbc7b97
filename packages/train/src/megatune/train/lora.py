"""LoRA on megatron-core's tensor-parallel linears (`--sft_type lora`).

An adapter is a `LoraAdapter` child (`.lora`, parameters `A` [r, in] and `B` [out, r] as TP parts) of the linear it
adapts, plus a forward hook that adds `scaling * B @ A @ dropout(x)` to the linear's output. The base module, its
forward and its state-dict names stay untouched, so base weights load and save as before; adapter names are
`decoder.layers.{i}.self_attention.linear_qkv.lora.A` and so on. The base is frozen (any dtype); only A and B
require gradients, so megatron-core's DDP allocates gradient buffers and its optimizers (distributed one included)
hold state for them alone.

Tensor parallelism (the split of A and B comes from megatune.convert.lora, i.e. from the base's split kind):
- column-parallel base (linear_qkv, linear_fc1): A replicated, B split on the output rows like the base.
      z = x @ A.T  [s, b, r];  y += scaling * z @ B_part.T  [s, b, out/tp]
  Every TP rank's B part contributes to dL/dz, so z's gradient is all-reduced (copy_to_tensor_model_parallel_region).
  With sequence parallelism x holds s/tp tokens: z is gathered over the sequence instead (whose backward is the
  reduce-scatter of the partial dL/dz), and A -- which then sees only this rank's tokens -- is tagged
  `sequence_parallel` so finalize_model_grads sums its gradient over TP, as for the norms.
- row-parallel base (linear_proj, linear_fc2): A split on the input columns, B replicated.
      z = reduce(x_part @ A_part.T) [s, b, r];  y += scaling * z @ B.T
  The reduction is the one the base output gets: all-reduce, or reduce-scatter over the sequence under SP (then B
  sees s/tp tokens and is tagged `sequence_parallel`).
Dropout acts on the adapter input. Where that input is the same on every TP rank (column-parallel without SP) the
default RNG stream is used (same mask everywhere); where ranks hold different elements (row-parallel inputs, SP
token slices) the TP-rank stream of megatron-core's RNG tracker, as megatron-core does for its own dropouts.

Initialisation as peft: A kaiming-uniform (a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), B zeros. A is drawn for
the full [r, in] tensor from a generator seeded by (seed, global layer, module) and then cut to this rank's part,
so every (tp, pp, dp) layout starts from the same adapters.

Checkpointed recomputation with a frozen embedding: megatron-core's checkpoint function only produces a gradient
path when an input requires grad, so the embedding output is marked as requiring grad (peft's
`enable_input_require_grads`). The frozen output layer gets its logits gradient in canonical strides (`_canonical`:
otherwise torch.matmul falls back to a per-token batched GEMM, 3x slower steps on a 7B model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import zlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatune.convert import lora as spec
from megatune.convert.errors import ConvertError
from megatune.convert.families import shape_of
from megatune.convert.splits import shard
from megatune.train.errors import TrainError
from megatune.train.states import unwrap


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The adapter hyper-parameters (swift's --lora_* flags)."""

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("DEFAULT",)
    rslora: bool = False
    seed: int = 42

    def __post_init__(self):
        if self.rank < 1:
            raise TrainError(f"--lora_rank must be >= 1, got {self.rank}; e.g. --lora_rank 8")
        if not 0.0 <= self.dropout < 1.0:
            raise TrainError(f"--lora_dropout must be in [0, 1), got {self.dropout}; e.g. --lora_dropout 0.05")
        self.resolved()  # unknown module names fail here, before any model is built

    @property
    def scaling(self) -> float:
        return spec.lora_scaling(self.rank, self.alpha, self.rslora)

    def resolved(self, hf_config: dict | None = None) -> dict[str, tuple[bool, ...]]:
        """{megatron module: which of its HF pieces are targeted} (megatune.convert.lora.resolve_targets), among
        the modules the model family offers (without a config: those of the dense Llama-like layer)."""
        try:
            modules = spec.MODULES if hf_config is None else spec.lora_modules(shape_of(hf_config).row.layer_params)
            return spec.resolve_targets(self.targets, modules)
        except ConvertError as e:
            raise TrainError(str(e)) from None

    def to_json(self, hf_config: dict) -> dict:
        """What megatune.json records under "lora" (export reads it back)."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "rslora": self.rslora,
                "targets": list(self.targets), "seed": self.seed,
                "modules": {k: list(v) for k, v in self.resolved(hf_config).items()}}

    @classmethod
    def from_json(cls, d: dict) -> LoraConfig:
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d["dropout"]),
                   targets=tuple(d["targets"]), rslora=bool(d["rslora"]), seed=int(d.get("seed", 42)))


class LoraAdapter(torch.nn.Module):
    """The adapter of one tensor-parallel linear (see the module docstring for the math and the collectives)."""

    def __init__(self, module: spec.LoraModule, a: torch.Tensor, out_features: int, *, scaling: float,
                 dropout: float, sequence_parallel: bool, mask: torch.Tensor | None):
        super().__init__()
        self.column = module.column_parallel
        self.scaling, self.dropout_p = scaling, dropout
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.sequence_parallel = sequence_parallel and self.tp > 1
        self.A = torch.nn.Parameter(a)  # [r, in or in/tp]
        self.B = torch.nn.Parameter(torch.zeros(out_features, a.shape[0], dtype=a.dtype, device=a.device))
        # the parameter that sees only this rank's tokens under SP needs its gradient summed over TP
        (self.A if self.column else self.B).sequence_parallel = self.sequence_parallel
        # the split one is a TP part: megatron-core counts it on every rank in the gradient norm (a replicated one
        # only on TP rank 0), as for the base weights
        split, dim = (self.B, 0) if self.column else (self.A, 1)
        tensor_parallel.set_tensor_model_parallel_attributes(split, is_parallel=self.tp > 1, dim=dim, stride=1)
        self.register_buffer("mask", mask, persistent=False)  # [out part, 1] 0/1, or None

    def extra_repr(self) -> str:
        kind = "column" if self.column else "row"
        return f"{kind}, A={tuple(self.A.shape)}, B={tuple(self.B.shape)}, scaling={self.scaling:g}"

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout_p == 0.0:
            return x
        distinct = self.tp > 1 and (self.sequence_parallel or not self.column)
        ctx = tensor_parallel.get_cuda_rng_tracker().fork() if distinct else contextlib.nullcontext()
        with ctx:
            return F.dropout(x, self.dropout_p, training=True)

    def b_effective(self) -> torch.Tensor:
        return self.B if self.mask is None else self.B * self.mask.to(self.B.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = parallel_state.get_tensor_model_parallel_group()
        z = F.linear(self._dropout(x), self.A)  # [s(/tp), b, r]
        if self.column:
            if self.sequence_parallel:
                z = tensor_parallel.gather_from_sequence_parallel_region(z, tensor_parallel_output_grad=True,
                                                                         group=group)
            elif self.tp > 1:
                z = tensor_parallel.copy_to_tensor_model_parallel_region(z, group=group)
        elif self.sequence_parallel:
            z = tensor_parallel.reduce_scatter_to_sequence_parallel_region(z, group=group)
        elif self.tp > 1:
            z = tensor_parallel.reduce_from_tensor_model_parallel_region(z, group=group)
        return F.linear(z * self.scaling, self.b_effective())

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """This rank's part of W + scaling * B @ A (fp32 merge, cast to the weight's dtype)."""
        return spec.merge_weight(weight, self.A, self.b_effective(), self.scaling)


def _add_lora(linear, args, kwargs, output):
    x = args[0] if args else kwargs["input_"]
    out, bias = output
    return out + linear.lora(x), bias


def _canonical(grad: torch.Tensor) -> torch.Tensor:
    """`grad` with canonical (row-major) strides, copied only when they differ.

    The loss gradient of the logits [s, 1, v] can carry an odd stride on its size-1 batch dimension (still
    `is_contiguous()`). With the output layer's weight frozen, megatron-core's LinearWithFrozenWeight computes
    `grad.matmul(weight)` with nothing requiring grad, and torch.matmul then does not fold [s, 1, v] into one GEMM
    but runs a batched GEMM that reads the whole weight once per token: 0.93 s of a 1.18 s Qwen2-7B step on an H200.
    (A trainable weight makes torch fold, which is why full fine-tuning never saw it.)"""
    canonical, acc = [], 1
    for n in reversed(grad.shape):
        canonical.append(acc)
        acc *= n
    return grad if grad.stride() == tuple(reversed(canonical)) else grad.clone(memory_format=torch.contiguous_format)


def _canonical_logits_grad(_module, _args, output):
    # a tensor hook: it sees the logits' gradient before the output layer's backward (in-place changes of the
    # logits by a loss function after this point do not move it)
    if output[0].requires_grad:
        output[0].register_hook(_canonical)


def _require_grad_output(_module, _args, output):
    # see the module docstring: recomputed (checkpointed) layers need an input that requires grad
    return output.requires_grad_(True) if torch.is_grad_enabled() and not output.requires_grad else output


def _initial_a(cfg: LoraConfig, layer: int, module: spec.LoraModule, in_features: int) -> torch.Tensor:
    """The full [r, in] A of one layer's module, the same for every parallel layout."""
    g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + layer * 1009 + zlib.crc32(module.name.encode()))
                                      % (2**63))
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on an [r, in] weight
    return torch.empty(cfg.rank, in_features).uniform_(-bound, bound, generator=g)


def apply_lora(model_chunks: list, cfg: LoraConfig) -> int:
    """Freeze every parameter, then attach adapters to the targeted linears of each chunk (GPTModels, before the
    DDP wrap). Returns the number of adapter parameters (elements) on this rank."""
    tp, tp_rank = (parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_tensor_model_parallel_rank())
    count = 0
    for chunk in model_chunks:
        model = unwrap(chunk)
        if getattr(model, "megatune_spec", "native") != "native":
            raise TrainError("LoRA adapters need megatune's native layer spec (Transformer Engine fuses the norm into "
                             "linear_qkv/linear_fc1); build the model with spec='native'")
        shape = shape_of(model.megatune_hf_config)
        targets = cfg.resolved(model.megatune_hf_config)
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.decoder.layers:
            index = layer.layer_number - 1  # global, 0-based
            for name, pieces in targets.items():
                m = spec.BY_NAME[name]
                linear = layer.get_submodule(m.name)
                want = ColumnParallelLinear if m.column_parallel else RowParallelLinear
                if type(linear) is not want:
                    raise TrainError(f"decoder.layers.{index}.{m.name} is a {type(linear).__name__}, LoRA expects "
                                     f"megatron-core's {want.__name__}; the layer spec does not match the table")
                out_full, in_full = spec.module_shape(m, shape)
                a = shard(m.a_kind, _initial_a(cfg, index, m, in_full), tp)[tp_rank]
                mask = spec.row_mask(m, pieces, shape)
                if mask is not None:
                    mask = shard(m.b_kind, mask, tp)[tp_rank].to(linear.weight.device)
                out_part = linear.weight.shape[0]
                assert (out_part * (tp if m.column_parallel else 1), a.shape[1] * (1 if m.column_parallel else tp)
                        ) == (out_full, in_full), (m.name, tuple(linear.weight.shape), out_full, in_full)
                linear.lora = LoraAdapter(m, a.to(linear.weight.device, linear.weight.dtype), out_part,
                                          scaling=cfg.scaling, dropout=cfg.dropout,
                                          sequence_parallel=model.config.sequence_parallel, mask=mask
                                          ).train(linear.training)
                linear.lora_hook = linear.register_forward_hook(_add_lora, with_kwargs=True)
                count += linear.lora.A.numel() + linear.lora.B.numel()
        if model.pre_process:
            model.embedding.register_forward_hook(_require_grad_output)
        if model.post_process:
            model.output_layer.register_forward_hook(_canonical_logits_grad)
    return count


def adapters(chunk) -> dict[str, LoraAdapter]:
    """{module path in the GPTModel: adapter} of one chunk (wrappers removed)."""
    return {name.removesuffix(".lora"): m for name, m in unwrap(chunk).named_modules() if isinstance(m, LoraAdapter)}


def adapter_state_dict(chunk) -> dict[str, torch.Tensor]:
    """Only the adapters' tensors of one chunk: {"decoder.layers.{local i}.{module}.lora.A": ..., ...}."""
    return {k: v for k, v in unwrap(chunk).state_dict().items() if ".lora." in k}


def load_adapter_state_dict(chunk, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load of adapter tensors (names and shapes) into one chunk."""
    own = adapter_state_dict(chunk)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise TrainError(f"{source}: LoRA adapter names do not match the model (missing {missing[:2]}, unexpected "
                         f"{unexpected[:2]}); resume with the --lora_target_modules and tp/pp the run was saved with")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise TrainError(f"{source}: adapter {k} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(own[k].shape)}; resume with the --lora_rank and tp the run was saved with")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


@torch.no_grad()
def merge_and_unload(chunk) -> None:
    """Fold every adapter into its base weight (this rank's part, fp32 merge) and remove the adapters."""
    for path, adapter in adapters(chunk).items():
        linear = unwrap(chunk).get_submodule(path)
        linear.weight.copy_(adapter.merged_weight(linear.weight))
        linear.lora_hook.remove()
        del linear.lora, linear.lora_hook


def trainable_numel(model_chunks: list) -> int:
    return sum(p.numel() for c in model_chunks for p in unwrap(c).parameters() if p.requires_grad)


def optimizer_numel(optimizer) -> int:
    """Elements the optimizer updates on this model-parallel rank (summed over the DP shards of the distributed
    optimizer): with LoRA this must be the adapters' count, never the base's."""
    from megatune.train.fused import torch_optimizers

    n = sum(p.numel() for opt in torch_optimizers(optimizer) for g in opt.param_groups for p in g["params"])
    from megatune.train.states import is_distributed_optimizer

    if is_distributed_optimizer(optimizer) and parallel_state.get_data_parallel_world_size() > 1:
        t = torch.tensor([n], dtype=torch.int64, device=next(iter(
            p for opt in torch_optimizers(optimizer) for g in opt.param_groups for p in g["params"])).device)
        torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
        n = int(t.item())
    return n


def check_optimizer(optimizer, model_chunks: list) -> int:
    """Raise unless the optimizer holds exactly the adapter parameters; returns their element count."""
    want, got = trainable_numel(model_chunks), optimizer_numel(optimizer)
    if want != got:
        raise TrainError(f"LoRA: the optimizer holds {got} parameter elements on this rank, the adapters have {want};"
                         f" the base model must be frozen before the optimizer is built (apply_lora before wrap)")
    return got
