"""No token may see the future: logits at positions < t are unchanged when tokens at positions >= t change.

Runs the native spec's real attention paths: plain causal (SDPA is_causal; flash/cuDNN kernels on GPU) and
packed documents (flex_attention on GPU, boolean mask on CPU), in bf16 on GPU and fp32 on CPU. A leak here
would let training loss fall on random tokens, which no parity-with-itself test can notice.
"""

from __future__ import annotations

import pytest
import torch

SEQ, CUT = 256, 100


def worker(rank, world, model_dir, cuda):
    from megatune.train.distributed import init_distributed
    from megatune.train.model import build_model
    from megatune.train.spec import document_mask

    init_distributed(1, 1)
    dtype = torch.bfloat16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    model = build_model(model_dir, tp=1, pp=1, params_dtype=dtype, spec="native")[0].to(device).eval()
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 1000, (2, SEQ), generator=gen)
    b = a.clone()
    b[:, CUT:] = torch.randint(0, 1000, (2, SEQ - CUT), generator=gen)  # change only the future
    pos = torch.arange(SEQ).expand(2, SEQ)
    docs = (torch.arange(SEQ) >= SEQ // 2).int().expand(2, SEQ)  # two documents per row
    doc_pos = torch.cat([torch.arange(SEQ // 2), torch.arange(SEQ - SEQ // 2)]).expand(2, SEQ)
    out = {}
    with torch.no_grad():
        for name, masks, positions in (("causal", None, pos), ("packed", document_mask(docs), doc_pos)):
            logits = [model(t.to(device), positions.to(device),
                            None if masks is None else masks.to(device)).float().cpu() for t in (a, b)]
            past = (logits[0][:, :CUT] - logits[1][:, :CUT]).abs().max().item()
            future = (logits[0][:, CUT:] - logits[1][:, CUT:]).abs().max().item()
            out[name] = (past, future)
    return out


@pytest.mark.parametrize("cuda", [False, pytest.param(True, marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_no_attention_to_future_tokens(tmp_path, cuda):
    from megatune.convert.testing import make_tiny_model
    from megatune.train.distributed import run_local

    # head_dim 64 so GPU runs take the flash / flex kernels, not the small-head fallbacks
    model_dir = make_tiny_model("qwen2", tmp_path / "m", hidden_size=256, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=512, num_hidden_layers=2)
    result = run_local(1, worker, str(model_dir), cuda, timeout=600)[0]
    for name, (past, future) in result.items():
        # CPU fp32 is bitwise exact; on GPU allow bf16 kernel noise, far below what any leak would cause
        bound = 0.05 * future if cuda else 0.0
        assert past <= bound, f"{name}: logits before position {CUT} changed by {past} when only later tokens changed"
        assert future > 1e-3, f"{name}: the changed tokens had no effect ({future}); the test would not see a leak"
