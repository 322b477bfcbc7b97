"""LoRA adapters on megatron-core's tensor-parallel linears (real megatron-core, CPU mode, gloo), fp32:

- with B = 0 the model's logits equal the base model's bit for bit (TP1, TP2, TP2+SP, PP2);
- the same (layout-independent) adapters give the same logits at every layout, and merging them into the base
  weights per TP shard (W + scaling * B @ A in fp32) changes the logits by <= 1e-5;
- the HF base with the adapters merged per HF tensor (what `export --to_hf` writes) matches the Megatron LoRA
  logits (<= 1e-4, the model-parity tolerance), and peft's PeftModel on the HF base with the exported
  adapter_model.safetensors matches that merged HF model (<= 1e-5);
all for every linear (ALL) and for partly targeted fused modules (q_proj, v_proj, up_proj: B row masks). Training
(gradients, optimizer contents, loss curves, resume, exports of real runs) is in test_lora_train.py.
"""

from __future__ import annotations

import pytest
import torch
from megatune.convert import lora as spec
from megatune.convert.testing import make_tiny_model
from megatune.train.distributed import run_local
from test_model_parity import gather_vocab, hf_logits, megatron_logits

TARGETS = ("ALL",)
PARTIAL = ("q_proj", "v_proj", "up_proj", "o_proj")
LAYOUTS = [(1, 1), (2, 1), (2, 1, "sp"), (1, 2)]
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2", seed=0, dtype="float32"))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))


def full_adapters(hf_config: dict, targets) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layout-independent non-zero adapters {layer key: (A, B)} for every targeted module of every layer."""
    from megatune.convert.arch import shape_of

    shape = shape_of(hf_config)
    g = torch.Generator().manual_seed(5)
    out = {}
    for layer in range(shape.layers):
        for name in spec.resolve_targets(targets):
            m = spec.BY_NAME[name]
            n_out, n_in = spec.module_shape(m, shape)
            out[spec.layer_key(layer, m)] = (torch.randn(RANK, n_in, generator=g) * 0.1,
                                             torch.randn(n_out, RANK, generator=g) * 0.1)
    return out


def set_adapters(chunk, full: dict) -> None:
    """Copy this rank's parts of the full adapters into the model's adapters."""
    from megatron.core import parallel_state as ps
    from megatune.train import lora

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for layer in lora.unwrap(chunk).decoder.layers:
        for name, m in spec.BY_NAME.items():
            linear = layer.get_submodule(name)
            if hasattr(linear, "lora"):
                a, b = spec.adapter_parts(m, *full[spec.layer_key(layer.layer_number - 1, m)], tp)[rank]
                with torch.no_grad():
                    linear.lora.A.copy_(a)
                    linear.lora.B.copy_(b)


def _worker(rank, world, layouts, hf_dir, ids):
    from megatron.core import parallel_state as ps
    from megatune.train import lora
    from megatune.train.checkpoint import load_pretrained
    from megatune.train.distributed import init_distributed
    from megatune.train.model import build_model

    out = {}
    for tp, pp, *sp in layouts:
        init_distributed(tp, pp)
        for targets in (TARGETS, PARTIAL):
            chunks = build_model(hf_dir, tp=tp, pp=pp, sequence_parallel=bool(sp), spec="native")
            load_pretrained(chunks, hf_dir)
            model = chunks[0].eval()
            logits = {"base": megatron_logits(model, ids)}
            cfg = lora.LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.1, targets=targets)
            lora.apply_lora(chunks, cfg)
            logits["zero"] = megatron_logits(model, ids)
            set_adapters(model, full_adapters(model.megatune_hf_config, targets))
            logits["lora"] = megatron_logits(model, ids)
            lora.merge_and_unload(model)
            logits["merged"] = megatron_logits(model, ids)
            tp_rank = ps.get_tensor_model_parallel_rank()
            out[(tp, pp, *sp, targets)] = {k: None if v is None else (tp_rank, v) for k, v in logits.items()}
    return out


@pytest.fixture(scope="module")
def results(tiny, ids):
    one = run_local(1, _worker, LAYOUTS[:1], tiny, ids)
    two = run_local(2, _worker, LAYOUTS[1:], tiny, ids, timeout=600)
    return one + two


def _logits(results, layout, kind, vocab=1000):
    return gather_vocab([r[layout][kind] for r in results if layout in r], vocab)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("targets", [TARGETS, PARTIAL], ids=["all", "partial"])
def test_zero_b_is_the_base_and_merge_is_exact(results, layout, targets):
    key = (*layout, targets)
    base, zero = _logits(results, key, "base"), _logits(results, key, "zero")
    assert torch.equal(base, zero), f"{layout}: B = 0 changed the logits by {(base - zero).abs().max():.2e}"
    with_lora, merged = _logits(results, key, "lora"), _logits(results, key, "merged")
    assert (with_lora - base).abs().max() > 1e-2, "the adapters did not change the model: the test cannot fail"
    diff = (with_lora - merged).abs().max().item()
    assert diff <= 1e-5, f"{layout}: merged vs unmerged max |diff| {diff:.2e}"
    reference = _logits(results, (1, 1, targets), "lora")
    assert (with_lora - reference).abs().max().item() <= 1e-4, f"{layout}: LoRA logits differ from TP1"


def _merged_hf_state(hf_dir, targets):
    from megatune.convert.arch import shape_of
    from megatune.convert.hf_io import HFReader, read_config

    cfg = read_config(hf_dir)
    reader = HFReader(hf_dir)
    deltas = spec.hf_deltas(full_adapters(cfg, targets), spec.resolve_targets(targets), shape_of(cfg))
    scaling = spec.lora_scaling(RANK, ALPHA, False)
    state = {n: reader.read(n) for n in reader.names()}
    assert set(deltas) <= set(state)
    return {n: spec.merge_weight(t, *deltas[n], scaling) if n in deltas else t for n, t in state.items()}, cfg


@pytest.mark.parametrize("targets", [TARGETS, PARTIAL], ids=["all", "partial"])
def test_hf_merge_and_peft_adapter_match(results, tiny, ids, tmp_path, targets):
    import shutil

    from megatune.convert.arch import shape_of
    from megatune.convert.lora_export import write_peft
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    state, cfg = _merged_hf_state(tiny, targets)
    merged_dir = tmp_path / "merged"
    shutil.copytree(tiny, merged_dir)
    save_file(state, str(merged_dir / "model.safetensors"))
    merged = hf_logits(str(merged_dir), ids)
    megatron = _logits(results, (1, 1, targets), "lora")
    assert (merged - megatron).abs().max().item() <= 1e-4

    record = {"rank": RANK, "alpha": ALPHA, "dropout": 0.1, "rslora": False,
              "modules": {k: list(v) for k, v in spec.resolve_targets(targets).items()}}
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    write_peft(adapter_dir, full_adapters(cfg, targets), record, shape_of(cfg), str(tiny))
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        got = peft_model(ids).logits
    diff = (got - merged).abs().max().item()
    assert diff <= 1e-5, f"peft on the HF base vs merged HF: max |diff| {diff:.2e}"
