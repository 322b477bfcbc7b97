"""One optimizer step and one evaluation pass, through megatron-core's forward/backward schedules.

Loss = mean cross-entropy over the loss tokens of the WHOLE global batch. Micro-batches differ in how many
assistant tokens they hold, so averaging per-micro-batch means (Megatron-LM's default) would weight tokens
unequally. We use megatron-core's `calculate_per_token_loss=True` path instead: the loss function returns
(sum of per-token losses, number of loss tokens); backward runs on the sum; `finalize_model_grads` all-reduces the
token count over DP (after broadcasting it along PP) and scales the gradients by 1/count. The reported loss is
sum/count of the same global batch, so it is identical for any (tp, pp, dp) split of the same samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch

# keys of a micro-batch dict that become model inputs; anything else is bookkeeping (num_tokens, ...)
_TENSOR_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "document_ids")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and k in _TENSOR_KEYS else v)
            for k, v in batch.items()}


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """(loss sum, loss-token count, [sum, count] for reporting) — megatron-core's 3-tuple per-token contract."""
    losses = output_tensor.float().view(-1)  # (B*S,) per-token CE from GPTModel when labels are given
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.float()])
    return loss_sum, num_tokens, {"lm loss": report}


def make_forward_step(forward_kwargs):
    """A `forward_step_func(data_iterator, model)` for megatron-core's schedules.

    `forward_kwargs(batch) -> dict` turns a micro-batch into GPTModel keyword arguments (attention mask or packed
    document boundaries, as model.py wants them); it is passed in so the schedule code stays model-agnostic.
    """

    def forward_step(data_iterator: Iterator[dict], model):
        batch = next(data_iterator)
        device = next(model.parameters()).device
        batch = _to_device(batch, device)
        loss_mask = batch["loss_mask"]
        # -100 marks "no loss"; the vocab-parallel CE needs an in-range index there (its loss is masked out anyway)
        labels = batch["labels"].clamp(min=0)
        loss_mask = loss_mask * (batch["labels"] != -100)
        output = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], labels=labels,
                       **forward_kwargs(batch))
        return output, partial(loss_func, loss_mask)

    return forward_step


def _reduce_report(losses: list[dict], device: torch.device) -> tuple[float, int]:
    """Sum [loss_sum, tokens] over micro-batches (last PP stage), then over PP (others hold 0) and DP."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64, device=device)
    for item in losses:  # empty list on stages other than the last
        total += item["lm loss"].to(device=device, dtype=torch.float64)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    if ps.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(total, group=ps.get_data_parallel_group())
    return float(total[0]), int(round(float(total[1])))


def _shape_args(microbatches: list[dict]) -> dict[str, Any]:
    """seq_length / micro_batch_size for the pipeline's p2p buffers (all micro-batches of a step share a shape)."""
    tokens = microbatches[0]["tokens"]
    return {"seq_length": int(tokens.shape[1]), "micro_batch_size": int(tokens.shape[0])}


def forward_backward(model: list, microbatches: list[dict], forward_step, *, forward_only: bool,
                     device: torch.device) -> tuple[float, int]:
    """Run one global batch (this DP rank's micro-batches) through the 1F1B / no-pipelining schedule."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    shapes = {tuple(mb["tokens"].shape) for mb in microbatches}
    config = model[0].config if hasattr(model[0], "config") else None
    if config is not None:
        # the 1F1B p2p buffers are sized per step; mixed shapes in one step need shape exchange first
        config.variable_seq_lengths = len(shapes) > 1
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=model,
        num_microbatches=len(microbatches),
        forward_only=forward_only,
        **_shape_args(microbatches),
    )
    return _reduce_report(losses, device)


def train_step(model: list, optimizer, scheduler, microbatches: list[dict], forward_step, *, increment: int,
               device: torch.device) -> dict[str, Any]:
    """Zero grads, forward+backward every micro-batch, clip + step, advance the LR schedule. MoE models add their
    load-balancing / z-loss through the model's MoEBook (moe_router.py) and report them under "moe"."""
    from megatune.train.moe_router import book_of

    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    book = book_of(model)
    if book is not None:
        book.begin_step(microbatches)
        forward_step = book.wrap_forward_step(forward_step)
    loss_sum, tokens = forward_backward(model, microbatches, forward_step, forward_only=False, device=device)
    ok, grad_norm, _ = optimizer.step()
    if ok:  # fp16 overflow skips the update; Megatron-LM then leaves the schedule where it was
        scheduler.step(increment=increment)
    out = {"loss": loss_sum / max(tokens, 1), "loss_tokens": tokens, "grad_norm": grad_norm, "skipped": not ok}
    if book is not None:
        out["moe"] = book.end_step()  # aux loss, z-loss, expert load of this step (the same on every rank)
    return out


@torch.no_grad()
def eval_step(model: list, microbatches: list[dict], forward_step, *, device: torch.device) -> tuple[float, int]:
    """(loss sum, loss tokens) of one global validation batch."""
    for chunk in model:
        chunk.eval()
    try:
        return forward_backward(model, microbatches, forward_step, forward_only=True, device=device)
    finally:
        for chunk in model:
            chunk.train()
