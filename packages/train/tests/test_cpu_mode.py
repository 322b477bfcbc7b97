"""CPU mode: a no-op when CUDA is present; on CPU, megatron-core's CUDA-only paths run (patched in one module)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from megatune.train.distributed import run_local


def _run(code: str) -> str:
    """Fresh interpreter: enable() patches process-wide state, so never in the pytest process itself."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_noop_when_cuda_available():
    out = _run("""
        from unittest import mock
        import torch
        import megatron.core.tensor_parallel.random as r
        from megatron.core.optimizer import clip_grads
        with mock.patch.object(torch.cuda, "is_available", return_value=True):
            from megatune.train import cpu_mode
            before = (torch.cuda.current_device, torch.cuda.synchronize, r.CudaRNGStatesTracker,
                      clip_grads.clip_grad_by_total_norm_fp32, clip_grads.get_grad_norm_fp32)
            enabled = cpu_mode.enable()
            after = (torch.cuda.current_device, torch.cuda.synchronize, r.CudaRNGStatesTracker,
                     clip_grads.clip_grad_by_total_norm_fp32, clip_grads.get_grad_norm_fp32)
        print(enabled, cpu_mode.is_cpu_mode(), all(a is b for a, b in zip(before, after)))
    """)
    assert out == "False False True"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU mode only exists without CUDA")
def test_enable_patches_cuda_paths():
    out = _run("""
        import torch
        from megatune.train import cpu_mode
        assert cpu_mode.enable() and cpu_mode.enable()  # idempotent
        from megatron.core.fusions import fused_softmax
        from megatron.core.optimizer import clip_grads
        from megatron.core.tensor_parallel import random as r
        mask = fused_softmax.get_default_causal_mask(4)
        # the scoped mode maps literal device="cuda" to the CPU
        t = cpu_mode.on_cpu(lambda: torch.zeros(2, device="cuda", pin_memory=True).cuda())()
        p = torch.nn.Parameter(torch.ones(4)); p.grad = torch.full((4,), 2.0)
        norm = clip_grads.get_grad_norm_fp32([p.grad]) if torch.distributed.is_initialized() else 4.0
        clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=norm)
        r.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
        tracker = r.get_cuda_rng_tracker()
        with tracker.fork():
            a = torch.rand(3)
        with tracker.fork():
            b = torch.rand(3)  # the forked stream advanced: a != b; the default stream is untouched
        print(str(torch.cuda.current_device()), mask.device.type, mask.tolist()[0], t.device.type,
              round(p.grad.norm().item(), 4), bool((a != b).all()))
    """)
    assert out == "cpu cpu [False, True, True, True] cpu 1.0 True"


def _tp2_dropout_worker(rank, world_size):
    """Dropout under the model-parallel RNG fork differs per TP rank, like on GPU; the default stream does not."""
    from megatron.core import tensor_parallel
    from megatune.train.distributed import init_distributed

    init_distributed(2, 1, seed=3)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        forked = torch.rand(4)
    return forked, torch.rand(4)


@pytest.mark.slow
def test_rng_tracker_per_tp_rank():
    (f0, d0), (f1, d1) = run_local(2, _tp2_dropout_worker)
    assert not torch.equal(f0, f1), "TP ranks must draw different model-parallel random numbers"
    assert torch.equal(d0, d1), "the default (data-parallel) stream must agree across TP ranks"
