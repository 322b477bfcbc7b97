"""CPU mode for megatron-core's alltoall MoE token dispatcher (tests, CUDA-less machines; never active on GPU).

Two things in megatron-core 0.16 stop the alltoall dispatcher on a CPU-only torch over gloo:
1. `MoEAlltoAllTokenDispatcher` copies its split sizes to the host on a CUDA side stream (`torch.cuda.Stream()` in
   `__init__`, stream/event calls in `_maybe_dtoh_and_synchronize`). Here the sizes already live on the host: the
   replacement only converts them to numpy at the same point, as the CUDA path does.
2. With expert tensor parallelism > 1 it all-gathers / reduce-scatters uneven per-rank token counts over TP
   (`torch.distributed.all_gather` / `reduce_scatter` with unequal tensors), which gloo refuses. The replacements
   compute the same results with even collectives: the uneven gather pads every rank's part to the largest and
   slices after an even all-gather; the uneven reduce-scatter all-reduces the whole input and keeps this rank's
   rows (every rank holds the full input of a reduce-scatter, so this is exact).
`enable()` is idempotent and a no-op when CUDA is available.
"""

from __future__ import annotations

import torch

_DONE = False


def enable() -> None:
    global _DONE
    if _DONE or torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher as A2A

    A2A.cuda_dtoh_stream = "host"  # __init__ creates a torch.cuda.Stream() while this is None
    A2A._maybe_dtoh_and_synchronize = _host_splits
    even_gather, even_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return even_gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        padded = input_.new_zeros(max(sizes), *input_.shape[1:])
        padded[:input_.shape[0]] = input_
        everything = even_gather(padded, group).split(max(sizes))
        return torch.cat([part[:n] for part, n in zip(everything, sizes)])

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return even_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        return total.split([int(s) for s in input_split_sizes])[group.rank()].clone()

    mappings._gather_along_first_dim = gather
    mappings._reduce_scatter_along_first_dim = reduce_scatter
    _DONE = True


def _host_splits(self, point, tokens_per_expert=None):
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name)
            if torch.is_tensor(value):
                setattr(self, name, value.numpy())
    return tokens_per_expert
