"""MoE logits of megatron-core (megatune's MoE spec, CPU mode, gloo) == HF transformers, fp32, max |diff| <= 1e-4.

Families: Qwen2-MoE (shared expert + sigmoid gate, a dense layer, top-k not renormalised), Qwen3-MoE (qk norm,
renormalised top-k), Mixtral. Layouts (tp, pp, ep): (1,1,1), (1,1,2), (2,1,2) with sequence parallelism, (1,2,2)
through megatron-core's pipeline schedule; the alltoall dispatcher with grouped experts everywhere, plus the
allgather dispatcher and megatron-core's SequentialMLP at (1,1,2).
"""

from __future__ import annotations

import moe_helpers as H
import pytest
import torch
from megatune.train.distributed import run_local
from test_model_parity import gather_vocab, megatron_logits

TOL = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, H.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def parity_worker(rank, world_size, layouts, ids):
    from megatron.core import parallel_state as ps
    from megatune.train import moe
    from megatune.train.distributed import init_distributed

    out = {}
    for tp, pp, ep, variant in layouts:
        init_distributed(tp, pp, ep=ep)
        settings = moe.MoESettings(ep=ep, dispatcher="allgather" if variant == "allgather" else "alltoall",
                                   grouped_gemm=variant != "sequential", local_dispatch=variant == "local")
        for fam in H.FAMILIES:
            hf, cfg = H.hf_model(fam)
            model = H.build(cfg, tp=tp, pp=pp, settings=settings, sequence_parallel=tp > 1)
            model.load_state_dict(H.shard_for_rank(H.megatron_state(hf, cfg), model), strict=True)
            logits = megatron_logits(model.eval(), ids)
            keep = logits is not None and ps.get_data_parallel_rank() == 0
            out[(tp, pp, ep, variant, fam)] = (ps.get_tensor_model_parallel_rank(), logits) if keep else None
    return out


def _reference(ids):
    out = {}
    for fam in H.FAMILIES:
        hf, _ = H.hf_model(fam)
        with torch.no_grad():
            out[fam] = hf(ids).logits
    return out


def _check(results, layouts, ref):
    for layout in layouts:
        for fam in H.FAMILIES:
            got = gather_vocab([r[(*layout, fam)] for r in results], H.VOCAB)
            diff = (got - ref[fam]).abs().max().item()
            assert diff <= TOL, f"{fam} at (tp, pp, ep, variant)={layout}: max |logits - HF| = {diff:.3g}"


def test_logits_match_hf_tp1_ep1_ep2(ids):
    layouts = [(1, 1, 2, "grouped"), (1, 1, 2, "allgather"), (1, 1, 2, "sequential")]
    results = run_local(2, parity_worker, layouts, ids, timeout=600)
    single = run_local(1, parity_worker, [(1, 1, 1, "grouped")], ids, timeout=600)
    ref = _reference(ids)
    _check(results, layouts, ref)
    _check(single, [(1, 1, 1, "grouped")], ref)


def test_logits_match_hf_tp2_ep2_and_pp2_ep2(ids):
    layouts = [(2, 1, 2, "grouped"), (1, 2, 2, "grouped")]
    results = run_local(4, parity_worker, layouts, ids, timeout=900)
    _check(results, layouts, _reference(ids))


def fp8_refusal_worker(rank, world_size):
    import dataclasses

    from megatune.train import policy
    from megatune.train.distributed import init_distributed
    from megatune.train.errors import TrainError

    init_distributed(1, 1)
    policy.install(dataclasses.replace(policy.active(), fp8=policy.Fp8()))
    _, cfg = H.hf_model(H.FAMILIES[0])
    try:
        H.build(cfg, tp=1, pp=1)
    except TrainError as e:
        return str(e)
    return None


def test_fp8_is_refused_for_moe_in_one_line():
    message = run_local(1, fp8_refusal_worker)[0]
    assert message is not None and message.startswith("--fp8_format hybrid: FP8 is not available for MoE models")
    assert "\n" not in message


def _both_dispatchers(ids):
    """(family, local, model) per family: megatron-core's alltoall dispatcher (local=False), then
    moe_dispatch.LocalTokenDispatcher, same HF weights, the MoE book's step begun for `ids`. After init_distributed."""
    from megatune.train import moe

    b, s = ids.shape
    for fam in H.FAMILIES:
        hf, cfg = H.hf_model(fam)
        state = H.megatron_state(hf, cfg)
        for local in (False, True):
            model = H.build(cfg, tp=1, pp=1, settings=moe.MoESettings(local_dispatch=local))
            model.load_state_dict(H.shard_for_rank(state, model), strict=True)
            model.megatune_moe_book.begin_step([{"loss_mask": torch.ones(b, s), "labels": ids}])
            yield fam, local, model


def local_dispatch_worker(rank, world_size, ids):
    """Logits and every parameter's gradient of one forward/backward, megatron-core's alltoall dispatcher vs
    moe_dispatch.LocalTokenDispatcher, same weights, same tokens, per family."""
    from megatune.train.distributed import init_distributed
    from megatune.train.moe_dispatch import LocalTokenDispatcher

    init_distributed(1, 1)
    b, s = ids.shape
    runs = {}
    for fam, local, model in _both_dispatchers(ids):
        kinds = {type(m.token_dispatcher).__name__ for m in model.modules() if hasattr(m, "token_dispatcher")}
        logits = model(ids, torch.arange(s).expand(b, s), None)
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
        (logits * weights).sum().backward()
        runs[(fam, local)] = (kinds, logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    out = {}
    for fam in H.FAMILIES:
        ref, new = runs[(fam, False)], runs[(fam, True)]
        assert new[0] == {LocalTokenDispatcher.__name__} and LocalTokenDispatcher.__name__ not in ref[0]
        grads_ref, grads = ref[2], new[2]
        assert grads_ref.keys() == grads.keys() and all(g is not None for g in grads.values())
        out[fam] = ((new[1] - ref[1]).abs().max().item(),
                    max((grads[n] - grads_ref[n]).abs().max().item() for n in grads))
    return out


def test_local_dispatch_equals_megatron_dispatcher_and_hf(ids):
    """ep = expert tp = 1: the host-sync-free dispatcher gives megatron-core's logits and gradients (fp32, <= 1e-6;
    only the order of each token's k-term sum differs) and HF's logits (<= 1e-4)."""
    for fam, (logits_diff, grad_diff) in run_local(1, local_dispatch_worker, ids, timeout=600)[0].items():
        assert logits_diff <= 1e-6 and grad_diff <= 1e-6, f"{fam}: logits {logits_diff:.3g}, grads {grad_diff:.3g}"
    single = run_local(1, parity_worker, [(1, 1, 1, "local")], ids, timeout=600)
    _check(single, [(1, 1, 1, "local")], _reference(ids))


# aten ops that make the host wait for the GPU (the result's size or value is read back); a boolean-mask index is one
_HOST_SYNC = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
              "aten.repeat_interleave.Tensor", "aten._unique2.default", "aten.unique_consecutive.default",
              "aten.is_nonzero.default", "aten.equal.default"}


def host_sync_worker(rank, world_size, ids):
    """Host-synchronising ops (by name, with the MoE frame that issued them) in one forward + backward of each
    family, megatron-core's dispatcher vs moe_dispatch's, with the experts on their grouped-GEMM path (what an
    H200 takes: device offsets) -- on the CPU nothing waits, but the same ops would stop the host on a GPU."""
    import traceback

    from megatune.train import moe_experts
    from megatune.train.distributed import init_distributed
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostSyncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            masked = name == "aten.index.Tensor" and any(
                getattr(i, "dtype", None) == torch.bool for i in args[1] if i is not None)
            if name in _HOST_SYNC or masked:
                moe_frames = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in traceback.extract_stack()
                              if "/moe" in f.filename]
                self.seen.append((name, moe_frames[-1] if moe_frames else "outside MoE code"))
            return func(*args, **(kwargs or {}))

    moe_experts.use_grouped_mm = lambda x: True  # this process only (run_local's child)
    init_distributed(1, 1)
    b, s = ids.shape
    out = {}
    for fam, local, model in _both_dispatchers(ids):
        with HostSyncs() as mode:
            model(ids, torch.arange(s).expand(b, s), None).float().square().mean().backward()
        out[(fam, local)] = mode.seen
    return out


def test_local_dispatch_queues_the_whole_step_without_host_sync(ids):
    """The claim of moe_dispatch's docstring, checked where CI can: with grouped GEMMs a forward + backward of the
    model issues no op that reads a GPU value back, while megatron-core's dispatcher (the control) does."""
    seen = run_local(1, host_sync_worker, ids, timeout=600)[0]
    for fam in H.FAMILIES:
        assert seen[(fam, True)] == [], f"{fam}: {sorted(set(seen[(fam, True)]))}"
        assert seen[(fam, False)], f"{fam}: megatron-core's dispatcher showed no host sync: the check sees nothing"
