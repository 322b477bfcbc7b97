"""The MoE load-balancing loss equals HF's (`output_router_logits=True`) on the same batch, value and gradient.

HF's `load_balancing_loss_func` couples all MoE layers (counts and probabilities summed over layers before the
product) and leaves padding out through the attention mask. One micro-batch with right padding goes through
megatron-core's real forward/backward schedule at (tp, pp, ep) = (1,1,1), (2,1,2) with sequence parallelism and
(1,2,2); the reported aux loss must equal HF's within 1e-5, and the router weights' gradients (per-token CE mean +
coeff x aux, what HF back-propagates, + z_coeff x megatron-core's z-loss computed on HF's router logits) must
equal HF's: this checks the cross-layer, cross-TP-shard and cross-pipeline-stage count exchange.
"""

from __future__ import annotations

import moe_helpers as H
import pytest
import torch
from megatune.train.distributed import run_local

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
AUX_TOL = 1e-5
GRAD_RTOL = 1e-4
Z_COEFF = 1e-3


@pytest.fixture(scope="module")
def batch():
    ids = torch.randint(0, H.VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    real = torch.ones(2, 16, dtype=torch.bool)
    real[1, 11:] = False  # right padding on the second row
    return ids, real


def _microbatch(ids, real):
    hf_labels = ids.masked_fill(~real, -100)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = hf_labels[:, 1:]
    doc = torch.where(real, 0, -1).to(torch.int32)
    return {"tokens": ids, "labels": labels, "loss_mask": torch.ones(ids.shape), "document_ids": doc,
            "position_ids": torch.arange(ids.shape[1]).expand(ids.shape)}


def aux_worker(rank, world_size, layouts, ids, real):
    from megatron.core import parallel_state as ps
    from megatune.train import moe, steps
    from megatune.train.distributed import init_distributed

    out = {}
    for tp, pp, ep in layouts:
        init_distributed(tp, pp, ep=ep)
        for fam in H.FAMILIES:
            hf, cfg = H.hf_model(fam)
            model = H.build(cfg, tp=tp, pp=pp, settings=moe.MoESettings(ep=ep, z_coeff=Z_COEFF),
                            sequence_parallel=tp > 1)
            model.load_state_dict(H.shard_for_rank(H.megatron_state(hf, cfg), model), strict=True)
            model.config.calculate_per_token_loss = True
            book, mb = model.megatune_moe_book, _microbatch(ids, real)
            book.begin_step([mb])
            step = book.wrap_forward_step(steps.make_forward_step(lambda b: {"attention_mask": None}))
            loss_sum, tokens = steps.forward_backward([model.train()], [mb], step, forward_only=False,
                                                      device=torch.device("cpu"))
            stats = book.end_step()
            grads = {}
            for layer in model.decoder.layers:
                router = getattr(layer.mlp, "router", None)
                if router is None:
                    continue
                g = router.weight.grad.clone()
                if tp > 1:  # sequence parallel: each TP rank holds its tokens' part (finalize_model_grads sums)
                    torch.distributed.all_reduce(g, group=ps.get_tensor_model_parallel_group())
                grads[layer.layer_number - 1] = g / (tokens / ps.get_data_parallel_world_size())  # DP ranks: same batch
            first = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
            out[(tp, pp, ep, fam)] = (stats, grads) if first else None
    return out


def _hf(fam, ids, real):
    hf, cfg = H.hf_model(fam)
    hf.train()
    out = hf(ids, attention_mask=real.long(), labels=ids.masked_fill(~real, -100), output_router_logits=True)
    flat = real.reshape(-1).float()
    # megatron-core's z-loss (HF's families have none): per MoE layer, mean over tokens of logsumexp(logits)^2
    z = sum(((torch.logsumexp(r.float(), -1) ** 2) * flat).sum() / flat.sum() for r in out.router_logits)
    (out.loss + Z_COEFF * z).backward()
    grads = {i: layer.mlp.gate.weight.grad.clone() for i, layer in enumerate(hf.model.layers)
             if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "weight")}
    return float(out.aux_loss), grads, float(z)


def _check(results, layouts, ids, real):
    for fam in H.FAMILIES:
        aux, grads, z = _hf(fam, ids, real)
        for layout in layouts:
            stats = {}
            got = {}
            for r in results:
                if r[(*layout, fam)] is not None:
                    stats, g = r[(*layout, fam)]
                    got.update(g)
            assert abs(stats["moe_aux_loss"] - aux) <= AUX_TOL, \
                f"{fam} at {layout}: aux loss {stats['moe_aux_loss']:.8f}, HF {aux:.8f}"
            assert abs(stats["moe_z_loss"] - z) <= 1e-5 * max(1.0, z), f"{fam} at {layout}: z-loss {stats}, {z}"
            assert sorted(got) == sorted(grads), f"{fam} at {layout}: router layers {sorted(got)} vs {sorted(grads)}"
            for i, g in grads.items():
                diff = (got[i] - g).abs().max().item()
                assert diff <= GRAD_RTOL * g.abs().max().item(), \
                    f"{fam} at {layout}: layer {i} router grad max |diff| {diff:.3g} (max |grad| {g.abs().max():.3g})"
            assert stats["expert_tokens_max"] >= stats["expert_tokens_mean"] > 0


def test_aux_loss_and_router_grads_match_hf_single(batch):
    results = run_local(1, aux_worker, [(1, 1, 1)], *batch, timeout=600)
    _check(results, [(1, 1, 1)], *batch)


def test_aux_loss_and_router_grads_match_hf_tp2_ep2_pp2_ep2(batch):
    layouts = [(2, 1, 2), (1, 2, 2)]
    results = run_local(4, aux_worker, layouts, *batch, timeout=900)
    _check(results, layouts, *batch)
