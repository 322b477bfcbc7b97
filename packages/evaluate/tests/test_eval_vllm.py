"""The vllm engine against the pt engine on the same tiny model. Runs where vLLM imports and CUDA is present."""

from __future__ import annotations

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (optional extra megatune-evaluate[vllm])")
torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs a CUDA GPU"),
]

REQUESTS = [
    ("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"),
    ("Question: Which gas do plants take in?\nAnswer:", " A"),
    ("Hi", " there, how are you today?"),
]


@pytest.fixture(scope="module")
def vllm_engine(tiny_dir):
    from megatune.evaluate.vllm_engine import VllmEngine

    return VllmEngine(tiny_dir, dtype="float32", gpu_memory_utilization=0.3)


def test_vllm_loglikelihood_matches_pt(vllm_engine, tiny_dir):
    from megatune.evaluate.pt_engine import PtEngine

    pt = PtEngine(tiny_dir, dtype="float32")
    for (a, ga), (b, gb) in zip(vllm_engine.loglikelihood(REQUESTS), pt.loglikelihood(REQUESTS)):
        assert a == pytest.approx(b, abs=2e-3) and ga == gb


def test_vllm_generation_greedy_and_deterministic(vllm_engine):
    from megatune.evaluate.engine import Sampling

    prompts = [[{"role": "user", "content": "who are you?"}], "Question: 1+1?\nAnswer:"]
    first = vllm_engine.generate(prompts, Sampling(max_new_tokens=8))
    assert first == vllm_engine.generate(prompts, Sampling(max_new_tokens=8))
    assert all(isinstance(t, str) for t in first)
