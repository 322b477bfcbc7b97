"""Logits of megatron-core GPTModel (our spec, CPU mode, gloo) == HF transformers logits, fp32, max |diff| <= 1e-4.

Covers qwen2 (qkv bias, tied embeddings), qwen3 (qk norm, head_dim != hidden/heads), llama3 (rope scaling with a
non-default original context) at TP1, TP2, PP2 (real forward through megatron-core's pipeline schedule) and
TP2 with sequence parallelism, TP2xPP2, loading straight from the HF directory. Packed documents (document-id mask + restarting positions) give
the same logits as each document run alone. Each world size is one `run_local` call to keep process start-up low.
"""

from __future__ import annotations

import pytest
import torch
from megatune.convert.testing import make_tiny_model
from megatune.train.distributed import run_local

ARCHS = ("qwen2", "qwen3", "llama3")
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {a: str(make_tiny_model(a, root / a, seed=0, dtype="float32")) for a in ARCHS}


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 1000, (2, 16), generator=g)


def hf_logits(model_dir: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def megatron_logits(model, ids: torch.Tensor, position_ids=None, attention_mask=None):
    """Forward through megatron-core's schedule (real p2p between PP stages); this rank's vocab shard on the last
    stage, None elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = ids.shape
    pos = torch.arange(s).expand(b, s) if position_ids is None else position_ids

    def step(_it, m):
        out = m(ids, pos, attention_mask)
        return out, lambda o: (o.sum() * 0, {"logits": o.detach().clone()})

    with torch.no_grad():
        store = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=[model],
                                            num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    return store[0]["logits"] if parallel_state.is_pipeline_last_stage() else None


def gather_vocab(results: list, vocab: int) -> torch.Tensor:
    """Per-rank (tp_rank, shard) from the last stage -> full logits without vocab padding."""
    shards = sorted((r for r in results if r is not None), key=lambda r: r[0])
    return torch.cat([s for _, s in shards], dim=-1)[..., :vocab]


def parity_worker(rank, world_size, layouts, dirs, ids, packed):
    from megatron.core import parallel_state
    from megatune.train.checkpoint import load_pretrained
    from megatune.train.distributed import init_distributed
    from megatune.train.model import build_model

    out = {}
    for tp, pp, *sp in layouts:
        init_distributed(tp, pp)
        for arch, d in dirs.items():
            model = build_model(d, tp=tp, pp=pp, sequence_parallel=bool(sp))
            load_pretrained(model, d)
            logits = megatron_logits(model[0].eval(), ids)
            rank = parallel_state.get_tensor_model_parallel_rank()
            out[(tp, pp, *sp, arch)] = None if logits is None else (rank, logits)
            if packed and arch == "qwen3" and not sp:  # docs alone have lengths not divisible by tp
                out[(tp, pp, *sp, arch, "packed")] = packed_vs_separate(model[0])
    return out


def packed_vs_separate(model) -> float:
    """Max |logit diff| between one packed row of 3 documents (+ padding) and each document run alone."""
    from megatron.core import parallel_state
    from megatune.train.spec import document_mask

    lengths = (5, 7, 4)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 1000, (1, n), generator=g) for n in lengths]
    pad = torch.zeros(1, 16 - sum(lengths), dtype=torch.long)
    packed = torch.cat([*docs, pad], dim=1)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((pad.shape[1],), -1)])
    positions = torch.cat([torch.arange(n) for n in lengths] + [torch.arange(pad.shape[1])])[None]
    together = megatron_logits(model, packed, positions, document_mask(doc_ids[None]))
    diffs, start = [], 0
    for doc in docs:
        alone = megatron_logits(model, doc)
        if parallel_state.is_pipeline_last_stage():
            diffs.append((together[:, start:start + doc.shape[1]] - alone).abs().max().item())
        start += doc.shape[1]
    return max(diffs) if diffs else 0.0


def check(results, dirs, ids, layouts):
    for layout in layouts:
        for arch in dirs:
            ref = hf_logits(dirs[arch], ids)
            got = gather_vocab([r[(*layout, arch)] for r in results], ref.shape[-1])
            diff = (got - ref).abs().max().item()
            assert diff <= TOL, f"{arch} (tp, pp[, sp])={layout}: max |megatron - hf| = {diff:.2e}"


def test_parity_tp1(tiny_dirs, batch):
    layouts = [(1, 1)]
    results = run_local(1, parity_worker, layouts, tiny_dirs, batch, True)
    check(results, tiny_dirs, batch, layouts)
    assert results[0][(1, 1, "qwen3", "packed")] <= 1e-5


@pytest.mark.slow
def test_parity_tp2_sp_and_pp2(tiny_dirs, batch):
    layouts = [(2, 1), (2, 1, "sp"), (1, 2)]
    results = run_local(2, parity_worker, layouts, tiny_dirs, batch, True)
    check(results, tiny_dirs, batch, layouts)
    for layout in [(2, 1), (1, 2)]:
        assert max(r[(*layout, "qwen3", "packed")] for r in results) <= 1e-5, f"packed documents differ at {layout}"


@pytest.mark.slow
def test_parity_tp2xpp2(tiny_dirs, batch):
    layouts = [(2, 2)]
    results = run_local(4, parity_worker, layouts, tiny_dirs, batch, False)
    check(results, tiny_dirs, batch, layouts)
