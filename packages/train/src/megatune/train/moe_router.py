"""HF's routing and HF's load-balancing loss inside megatron-core's MoELayer, exact across TP/SP/PP/EP/DP.

Routing (`HFRouter`, a megatron-core TopKRouter): softmax over all experts in fp32, top-k, renormalised when the
family does (`norm_topk_prob`; Mixtral always), cast to the router logits' dtype -- the numbers HF's
`*TopKRouter.forward` computes. Dropless: every token reaches its k experts.

The load-balancing loss is HF's `load_balancing_loss_func` for one micro-batch: with C_e the number of top-k
assignments to expert e and P_e the sum of router softmax probabilities of e, both summed over ALL MoE layers and
all (non-padding) tokens, N tokens and L MoE layers,

    aux = E * sum_e (C_e / (L N)) * (P_e / (L N))

It couples all layers through C, so megatron-core's per-layer losses ("aux_loss", "seq_aux_loss",
"global_aux_loss") cannot express it. C carries no gradient, so d aux / d P_e = E C_e / (L N)^2: each router
only needs the final C before its backward runs. Each stage keeps a `Record` per micro-batch (counts and
probability sums of its layers). When the stage's forward of a micro-batch ends it sums its counts over the TP
ranks (sequence parallelism splits the tokens), receives the counts of all earlier pipeline stages from the
previous stage and sends them, plus its own, to the next. When its backward starts (`StageSync`, on the decoder's
output) it receives the counts of all later stages from the next stage and sends them, plus its own, to the
previous one; every router of the stage then turns the total into its gradient (`_LossHook`). These messages are
E floats on a gloo side group per pipeline (host tensors: they never mix with megatron-core's activation p2p or
its CUDA streams), and each arrives before it is awaited: a stage's forward (backward) message is sent before its
activation (gradient) that the receiver needs first. Backward order is forward order on every stage, so no
bookkeeping of micro-batch ids is needed; with full activation recomputation the routers re-run inside the
backward and attach to the record being back-propagated.

Objective: cross-entropy mean over the global batch's loss tokens + coeff * mean over micro-batches and DP ranks
of each micro-batch's aux (HF's Trainer gives every micro-batch its own aux in the same way) + z_coeff * sum over
MoE layers of mean_t logsumexp(logits_t)^2 (megatron-core's z-loss). megatron-core's per-token loss divides all
gradients by the global loss-token count N_loss; the extra losses are therefore scaled by N_loss / (M * DP),
set per step by `MoEBook.begin_step`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import TopKRouter
from megatune.train.errors import TrainError


@dataclasses.dataclass
class Record:
    """One micro-batch on this stage (tensors are this rank's partial sums, detached)."""

    counts: dict = dataclasses.field(default_factory=dict)  # layer_number -> [E] top-k assignments
    psums: dict = dataclasses.field(default_factory=dict)  # layer_number -> [E] sum of softmax probabilities
    zsums: dict = dataclasses.field(default_factory=dict)  # layer_number -> sum of logsumexp^2
    token_mask: torch.Tensor | None = None  # [b, s] bool, True = not padding; None = every token counts
    tokens: float = 0.0  # N: non-padding tokens of the whole micro-batch (all TP ranks)
    stage_counts: torch.Tensor | None = None  # [E] this stage's layers, summed over TP ranks
    earlier_counts: torch.Tensor | None = None  # [E] (host) all earlier pipeline stages
    aux_grad: torch.Tensor | None = None  # d(scaled aux)/d psum, set when the stage's backward starts
    z_grad: torch.Tensor | float = 0.0


class MoEBook:
    """Per model chunk: the records of the current step, the loss coefficients and the pipeline side channel."""

    def __init__(self, *, num_experts: int, topk: int, norm_topk: bool, num_layers: int, moe_layers: int,
                 aux_coeff: float, z_coeff: float | None, sequence_parallel: bool, device: torch.device):
        self.num_experts, self.topk, self.norm_topk = num_experts, topk, norm_topk
        self.num_layers, self.moe_layers = num_layers, moe_layers
        self.aux_coeff, self.z_coeff = float(aux_coeff), float(z_coeff or 0.0)
        self.sequence_parallel, self.device = sequence_parallel, device
        self.records: list[Record] = []
        self.forward_record: Record | None = None
        self.backward_record: Record | None = None
        self.token_mask: torch.Tensor | None = None  # [b, s] bool (host) of the micro-batch being run; None: all
        self.step_scale: float | None = None
        self.side_group = None  # set by moe_spec.attach when pp > 1
        self.pending: list = []

    # ---------------------------------------------------------------------------------------------- per step
    def begin_step(self, microbatches: list[dict]) -> None:
        """Scale for this step's extra losses: N_loss (loss tokens of the global batch) / (micro-batches x DP)."""
        local = sum(float(((mb["loss_mask"] != 0) & (mb["labels"] != -100)).sum()) for mb in microbatches)
        t = torch.tensor([local, float(len(microbatches))], dtype=torch.float64, device=self.device)
        if ps.get_data_parallel_world_size() > 1:
            torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
        self.records, self.step_scale = [], float(t[0]) / max(float(t[1]), 1.0)

    def wrap_forward_step(self, forward_step):
        """`forward_step` whose data iterator notes each micro-batch's padding mask (document_ids >= 0) as the
        schedule draws it, so the routers leave padding out of the aux loss as HF's attention_mask does."""
        book = self

        class Noting:
            def __init__(self, it):
                self.it = it

            def __iter__(self):
                return self

            def __next__(self):
                mb = next(self.it)
                doc = mb.get("document_ids") if isinstance(mb, dict) else None
                book.token_mask = None if doc is None else (doc >= 0)  # the batch is still on the host here
                return mb

        def step(data_iterator, model):
            return forward_step(Noting(data_iterator), model)

        return step

    # ---------------------------------------------------------------------------------------------- forward
    def open_record(self) -> Record:
        rec = Record()
        if self.token_mask is not None:  # kept per record: recomputation re-runs the routers after later forwards
            rec.tokens = float(self.token_mask.sum())  # a host tensor: no device sync
            rec.token_mask = self.token_mask.to(self.device, non_blocking=True)
        self.records.append(rec)
        self.forward_record = rec
        return rec

    def close_record(self, rec: Record, output: torch.Tensor) -> None:
        """End of this stage's forward of a micro-batch: token count, stage counts, counts of earlier stages."""
        if rec.token_mask is None:
            sp = ps.get_tensor_model_parallel_world_size() if self.sequence_parallel else 1
            rec.tokens = float(output.shape[0] * output.shape[1] * sp)  # [s/sp, b, h]
        counts = torch.zeros(self.num_experts, dtype=torch.float32, device=self.device)
        for c in rec.counts.values():
            counts += c
        if self.sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(counts, group=ps.get_tensor_model_parallel_group())
        rec.stage_counts = counts
        if self.side_group is not None:
            rec.earlier_counts = self._exchange(counts, backward=False)

    @staticmethod
    def local_mask(rec: Record, s_local: int) -> torch.Tensor | None:
        """This rank's slice of a record's token mask in the router's [s_local * b] token order (sequence-first)."""
        if rec.token_mask is None:
            return None
        mask = rec.token_mask.t()  # [s, b]
        if mask.shape[0] != s_local:  # sequence parallel: this TP rank holds one contiguous chunk of the sequence
            start = ps.get_tensor_model_parallel_rank() * s_local
            mask = mask[start:start + s_local]
        return mask.reshape(-1).to(torch.float32)

    def current_record(self) -> Record | None:
        # inside a backward pass the routers run again only under activation recomputation
        return self.backward_record if torch._C._current_graph_task_id() != -1 else self.forward_record

    # ---------------------------------------------------------------------------------------------- backward
    def start_backward(self, rec: Record) -> None:
        """Counts of every layer of the model for this micro-batch -> each router's gradient (module docstring)."""
        self.backward_record = rec
        counts = rec.stage_counts
        if self.side_group is not None:
            later = self._exchange(counts, backward=True)
            counts = counts + (rec.earlier_counts + later).to(self.device)
        if self.step_scale is None:
            raise TrainError("MoE losses: no step scale; call MoEBook.begin_step(microbatches) before the backward "
                             "pass (megatune.train.steps.train_step does)")
        loss_scale = MoEAuxLossAutoScaler.main_loss_backward_scale  # fp16 loss scale, 1 otherwise (a device tensor)
        scale = self.step_scale if loss_scale is None else loss_scale.reshape(()).float() * self.step_scale
        n = max(rec.tokens, 1.0)
        rec.aux_grad = counts * (scale * self.aux_coeff * self.num_experts / (self.moe_layers * n) ** 2)
        rec.z_grad = scale * self.z_coeff / n

    def _exchange(self, stage_counts: torch.Tensor, *, backward: bool) -> torch.Tensor:
        """Forward: receive the counts of all earlier stages from the previous stage and send them, plus this
        stage's, to the next. Backward: the same with the later stages, towards the previous stage. Host tensors
        on the gloo side group; the send is not awaited before end_step."""
        prev = (ps.get_pipeline_model_parallel_prev_rank(), not ps.is_pipeline_first_stage())
        nxt = (ps.get_pipeline_model_parallel_next_rank(), not ps.is_pipeline_last_stage())
        (src, has_src), (dst, has_dst) = (nxt, prev) if backward else (prev, nxt)
        received = torch.zeros(self.num_experts, dtype=torch.float32)
        if has_src:
            torch.distributed.recv(received, src=src, group=self.side_group, tag=int(backward))
        if has_dst:
            out = received + stage_counts.cpu()
            self.pending.append((torch.distributed.isend(out, dst=dst, group=self.side_group, tag=int(backward)),
                                 out))
        return received

    def end_step(self) -> dict:
        """Aux loss, z-loss and expert load of the step, reduced over TP (SP), PP and DP; same on every rank."""
        for work, _tensor in self.pending:
            work.wait()
        self.pending = []
        e, m = self.num_experts, len(self.records)
        per_mb = torch.zeros(m, 2 * e + 1, dtype=torch.float64, device=self.device)  # [C | P | zsum]
        load = torch.zeros(self.num_layers, e, dtype=torch.float64, device=self.device)
        for i, rec in enumerate(self.records):
            for layer, c in rec.counts.items():
                per_mb[i, :e] += c.double()
                load[layer - 1] += c.double()
            for p in rec.psums.values():
                per_mb[i, e:2 * e] += p.double()
            for z in rec.zsums.values():
                per_mb[i, 2 * e] += z.double()
        if self.sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(per_mb, group=ps.get_tensor_model_parallel_group())
            torch.distributed.all_reduce(load, group=ps.get_tensor_model_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(per_mb, group=ps.get_pipeline_model_parallel_group())
            torch.distributed.all_reduce(load, group=ps.get_pipeline_model_parallel_group())
        n = torch.tensor([max(r.tokens, 1.0) for r in self.records], dtype=torch.float64, device=self.device)
        ln = self.moe_layers * n
        aux = e * (per_mb[:, :e] * per_mb[:, e:2 * e]).sum(1) / ln ** 2
        z = per_mb[:, 2 * e] / n
        totals = torch.stack([aux.sum(), z.sum(), torch.tensor(float(m), dtype=torch.float64, device=self.device)])
        if ps.get_data_parallel_world_size() > 1:
            torch.distributed.all_reduce(totals, group=ps.get_data_parallel_group())
            torch.distributed.all_reduce(load, group=ps.get_data_parallel_group())
        moe_rows = load[load.sum(1) > 0]
        out = {"moe_aux_loss": float(totals[0] / totals[2])}
        if self.z_coeff:
            out["moe_z_loss"] = float(totals[1] / totals[2])
        if len(moe_rows):
            mean = moe_rows.mean(1)
            out.update(expert_tokens_max=float(moe_rows.max()), expert_tokens_mean=float(mean.mean()),
                       expert_load_max_over_mean=float((moe_rows.max(1).values / mean).max()))
        self.records, self.forward_record, self.backward_record, self.step_scale = [], None, None, None
        return out


def book_of(model_chunks: list) -> MoEBook | None:
    """The MoEBook of a (DDP / Float16Module wrapped) model built by model.build_model; None for a dense model."""
    module = model_chunks[0]
    while hasattr(module, "module"):
        module = module.module
    return getattr(module, "megatune_moe_book", None)


class _LossHook(torch.autograd.Function):
    """Identity on the routing probabilities; in backward, hands each router its aux / z-loss gradient."""

    @staticmethod
    def forward(ctx, probs, psum, zsum, rec: Record):
        ctx.rec = rec
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        rec = ctx.rec
        if rec.aux_grad is None:
            raise TrainError("MoE aux loss: a router's backward ran before its stage's (decoder output hook "
                             "missing; build the model with megatune.train.moe_spec)")
        z_grad = torch.as_tensor(rec.z_grad, dtype=torch.float32, device=grad_probs.device)
        return grad_probs, rec.aux_grad, z_grad, None


class StageSync(torch.autograd.Function):
    """Identity on the decoder's output; its backward is the first of the stage: it finalises the counts."""

    @staticmethod
    def forward(ctx, hidden, book: MoEBook, rec: Record):
        ctx.book, ctx.rec = book, rec
        return hidden

    @staticmethod
    def backward(ctx, grad):
        ctx.book.start_backward(ctx.rec)
        return grad, None, None


class HFRouter(TopKRouter):
    """TopKRouter computing HF's routing; its losses go through the MoEBook (module docstring)."""

    def __init__(self, config, pg_collection=None, *, book: MoEBook):
        super().__init__(config=config, pg_collection=pg_collection)
        self.book = book

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        # megatron-core's router_gating_linear needs Transformer Engine in 0.16 (NameError without it)
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
        return F.linear(input.to(dtype), self.weight.to(dtype))

    def forward(self, input: torch.Tensor, padding_mask=None):
        logits = self.gating(input)  # [s, b, E] in the input's dtype, as HF's F.linear
        s_local = logits.shape[0]
        logits = logits.reshape(-1, self.config.num_moe_experts)
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top, idx = torch.topk(scores, self.topk, dim=-1)
        if self.book.norm_topk:
            top = top / top.sum(dim=-1, keepdim=True)
        probs = torch.zeros_like(scores).scatter(1, idx, top).to(logits.dtype)
        routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, idx, True)
        if self.training:
            probs = self._account(logits, scores, routing_map, probs, s_local)
        return probs, routing_map

    def _account(self, logits, scores, routing_map, probs, s_local: int):
        rec = self.book.current_record()
        if rec is None:
            return probs
        mask = self.book.local_mask(rec, s_local)
        w = routing_map.float() if mask is None else routing_map.float() * mask[:, None]
        rec.counts[self.layer_number] = w.sum(0).detach()
        psum = scores.sum(0) if mask is None else (scores * mask[:, None]).sum(0)
        if self.book.z_coeff:
            lse2 = torch.logsumexp(logits.float(), dim=-1).square()
            zsum = lse2.sum() if mask is None else (lse2 * mask).sum()
        else:
            zsum = torch.zeros((), dtype=torch.float32, device=logits.device)
        rec.psums[self.layer_number], rec.zsums[self.layer_number] = psum.detach(), zsum.detach()
        if torch.is_grad_enabled():
            probs = _LossHook.apply(probs, psum, zsum, rec)
        return probs
