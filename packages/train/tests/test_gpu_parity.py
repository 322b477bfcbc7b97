"""GPU parity of megatune (native fast spec: SDPA flash, compiled RMSNorm/RoPE/SwiGLU, fused CE) with HF transformers.

A 4-layer Qwen2-shaped model with the real Qwen2 vocabulary (151936), loaded by megatune straight from HF dirs:
- logits at TP2, PP2 (and TP2xPP2 with 4 GPUs): fp32 max |diff| <= 1e-3, bf16 argmax agreement >= 99%. The model
  is first trained with HF until it has memorised the evaluated sequences (TRAIN_STEPS), so its predictions are
  confident: on the near-flat logits of a briefly trained model even HF's own bf16 and fp32 runs disagree on 10-20%
  of argmaxes (measured on CPU: 80% agreement after 60 steps, 88% after 120), which measures tie-breaking, not
  the implementation. Printed alongside: HF bf16 vs HF fp32 on the same model (the bf16 noise floor);
- 50 training steps at TP2 from the untrained weights, same data and hyperparameters: megatune's real step
  (runtime.wrap_model, optim.build_optimizer with the distributed optimizer, steps.train_step) vs HF's fp32-master +
  bf16 autocast loop, on English text (the demo's Alpaca slice through the tiny tokenizer): mean relative loss
  difference <= 2%. Printed alongside (not asserted): the same on 16 random-token sequences memorised at lr 1e-3, a
  chaotic regime where bf16 rounding (megatune's bf16 residual stream vs autocast's fp32 one) is amplified.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=151936, max_position_embeddings=2048)
SEQ, STEPS, GBS, LR = 128, 50, 4, 1e-3
TRAIN_STEPS = 400  # HF steps at lr 3e-3 that memorise data(16): confident predictions for the logits checks
ALPACA = Path(__file__).resolve().parents[3] / "src/megatune/cli/demo_data/sft/alpaca_en_short.jsonl"


@functools.cache  # one answer per session: the four TE tests ask it
def te_unavailable() -> str | None:
    """Why a fresh process cannot import transformer_engine (policy.te_import_error there), None if it can. Asked in
    a new interpreter because the TE runs happen in run_local's fresh processes: on an H200 (2026-12-01) the TE tests
    skipped as "not importable" when this pytest process asked after its HF fixture had trained on the GPU, while a
    fresh process imported TE."""
    code = "from megatune.train.policy import te_import_error; print(te_import_error() or '')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return f"the check itself failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}"
    return out.stdout.strip() or None


def data(n: int = 16) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (n, SEQ + 1), generator=torch.Generator().manual_seed(0))


def hf_model(d: str, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa").cuda()


def text_data(d: str, n: int = 16) -> torch.Tensor:
    """n sequences of SEQ + 1 tokens of English text: the Alpaca slice, chat-free, through the tokenizer in d."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    ids: list[int] = []
    for line in ALPACA.read_text().splitlines():
        row = json.loads(line)
        ids += tok(f"{row['instruction']} {row['input']} {row['output']}".replace("  ", " "))["input_ids"]
        ids.append(tok.eos_token_id)
    assert len(ids) >= n * (SEQ + 1), f"{ALPACA} gives {len(ids)} tokens, need {n * (SEQ + 1)}"
    return torch.tensor(ids[:n * (SEQ + 1)]).view(n, SEQ + 1)


def hf_train(d: str, steps_n: int, lr: float, seqs: torch.Tensor | None = None) -> list[float]:
    """HF Trainer's recipe: fp32 master weights, bf16 autocast, AdamW (no decay on 1-D params), clip 1.0."""
    model = hf_model(d, torch.float32).train()
    groups = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 0.0},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    seqs, losses = (data() if seqs is None else seqs).cuda(), []
    for i in range(steps_n):
        batch = seqs[[(i * GBS + j) % len(seqs) for j in range(GBS)]]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from megatune.convert.testing import make_tiny_model

    root = tmp_path_factory.mktemp("gpu")
    from transformers import AutoConfig, AutoModelForCausalLM

    # make_tiny_model sizes the vocabulary from its tokenizer: rebuild the weights with Qwen2's real vocabulary
    fresh = make_tiny_model("qwen2", root / "fresh", seed=0, dtype="float32",
                            **{k: v for k, v in SHAPE.items() if k != "vocab_size"})
    config = AutoConfig.from_pretrained(fresh)
    config.vocab_size = SHAPE["vocab_size"]
    torch.manual_seed(0)
    for f in fresh.glob("model*.safetensors*"):
        f.unlink()
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(fresh))
    trained = root / "trained"
    shutil.copytree(fresh, trained)
    losses, model = hf_train(str(fresh), TRAIN_STEPS, 3e-3)
    print(f"logits model: HF loss {losses[0]:.3f} -> {losses[-1]:.4f} after {TRAIN_STEPS} steps")
    model.save_pretrained(str(trained))
    return {"fresh": str(fresh), "trained": str(trained)}


def logits_worker(rank, world_size, layouts, d, ids, spec="native"):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatune.train.checkpoint import load_pretrained
    from megatune.train.distributed import init_distributed
    from megatune.train.model import build_model

    out = {}
    for tp, pp in layouts:
        init_distributed(tp, pp)
        ref = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            with torch.no_grad():
                ref[name] = hf_model(d, dtype).eval()(ids.cuda()).logits.float()
            model = build_model(d, tp=tp, pp=pp, params_dtype=dtype, spec=spec)
            load_pretrained(model, d)
            b, s = ids.shape
            pos = torch.arange(s, device="cuda").expand(b, s)

            def step(_it, m, pos=pos):
                return m(ids.cuda(), pos, None), lambda o: (o.sum() * 0, {"logits": o.detach()})

            with torch.no_grad():
                store = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]),
                                                    model=[model[0].eval()], num_microbatches=1, seq_length=s,
                                                    micro_batch_size=b, forward_only=True)
            if not ps.is_pipeline_last_stage():
                continue
            shard = store[0]["logits"].float().contiguous()
            shards = [torch.empty_like(shard) for _ in range(tp)]
            torch.distributed.all_gather(shards, shard, group=ps.get_tensor_model_parallel_group())
            full = torch.cat(shards, dim=-1)[..., :SHAPE["vocab_size"]]
            if ps.get_tensor_model_parallel_rank() == 0:
                out[(tp, pp, name)] = {"max_abs": float((full - ref[name]).abs().max()),
                                       "argmax": float((full.argmax(-1) == ref[name].argmax(-1)).float().mean())}
                if name == "bf16":  # how far bf16 itself is from fp32: ours and HF's, same model, same tokens
                    truth = ref["fp32"].argmax(-1)
                    out[(tp, pp, name)].update(
                        ours_vs_fp32=float((full.argmax(-1) == truth).float().mean()),
                        hf_bf16_vs_fp32=float((ref["bf16"].argmax(-1) == truth).float().mean()))
    return out


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (TP2, PP2; 4 for TP2xPP2)")
def test_logits_match_hf_tp2_pp2(dirs):
    from megatune.train.distributed import run_local

    ids = data(4)[:, :SEQ]  # the sequences the trained model has seen: confident predictions
    results = {}
    for world, layouts in ((2, [(2, 1), (1, 2)]), (4, [(2, 2)])):
        if torch.cuda.device_count() >= world:
            for r in run_local(world, logits_worker, layouts, dirs["trained"], ids, timeout=600):
                results.update(r)
    print({k: v for k, v in sorted(results.items())})
    assert results, "no layout ran"
    for (tp, pp, name), m in results.items():
        if name == "fp32":
            assert m["max_abs"] <= 1e-3, f"tp{tp} pp{pp} fp32 logits differ from HF by {m['max_abs']:.2e}"
        else:
            assert m["argmax"] >= 0.99, f"tp{tp} pp{pp} bf16 argmax agreement {m['argmax']:.4f} < 0.99"


@pytest.mark.parametrize("spec", ["native", "te"])
def test_logits_match_hf_one_gpu(dirs, spec):
    """tp1 pp1 on one GPU, for both layer specs (the TE spec with its fused RoPE / SwiGLU, as build_model gives it)."""
    from megatune.train.distributed import run_local

    if spec == "te" and (reason := te_unavailable()):
        pytest.skip(f"transformer_engine is not importable: {reason}")
    results = run_local(1, logits_worker, [(1, 1)], dirs["trained"], data(4)[:, :SEQ], spec, timeout=600)[0]
    print(spec, results)
    assert results[(1, 1, "fp32")]["max_abs"] <= 1e-3, f"{spec} fp32 logits differ from HF: {results}"
    assert results[(1, 1, "bf16")]["argmax"] >= 0.99, f"{spec} bf16 argmax agreement < 0.99: {results}"


def train_worker(rank, world_size, d, tp, datasets: dict, spec: str = "native", fp8: str | None = None) -> dict:
    from megatune.argmap import MegatronArguments
    from megatune.train import optim, runtime, steps
    from megatune.train.checkpoint import load_pretrained
    from megatune.train.distributed import init_distributed
    from megatune.train.model import build_model
    from megatune.train.policy import Fp8, Machine, Request, install, resolve_policy

    dist = init_distributed(tp, 1)
    policy = install(resolve_policy(Request(precision="bf16", transformer_impl=spec,
                                            fp8=Fp8("hybrid", fp8) if fp8 else None), Machine.detect(), dist.dp))
    margs = MegatronArguments(bf16=True, fp16=False, use_distributed_optimizer=True, optimizer="adam", lr=LR,
                                  min_lr=LR, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
                                  clip_grad=1.0, global_batch_size=GBS, train_iters=STEPS, lr_decay_style="constant",
                                  lr_warmup_iters=0, loss_scale=None)
    curves = {}
    for name, seqs in datasets.items():
        chunks = build_model(d, tp=tp, pp=1, params_dtype=torch.bfloat16, sequence_parallel=tp > 1)
        load_pretrained(chunks, d)
        model = runtime.wrap_model(chunks, policy)
        optimizer = optim.build_optimizer(model, margs, policy)
        scheduler = optim.build_scheduler(optimizer, margs)
        forward_step = steps.make_forward_step(lambda batch: {"attention_mask": None})
        losses = []
        for i in range(STEPS):
            batch = seqs[[(i * GBS + j) % len(seqs) for j in range(GBS)]]
            mbs = GBS // dist.dp
            mine = batch[dist.dp_rank * mbs:(dist.dp_rank + 1) * mbs]
            labels = mine[:, 1:SEQ].clone()
            labels = torch.cat([labels, torch.full((mbs, 1), -100)], dim=1)  # HF shifts inside: last position no loss
            mb = {"tokens": mine[:, :SEQ], "labels": labels, "loss_mask": torch.ones(mbs, SEQ),
                  "position_ids": torch.arange(SEQ).expand(mbs, SEQ)}
            out = steps.train_step(model, optimizer, scheduler, [mb], forward_step, increment=GBS, device=dist.device)
            losses.append(out["loss"])
        curves[name] = losses
    return curves


def test_training_curve_matches_hf(dirs):
    from megatune.train.distributed import run_local

    tp = 2 if torch.cuda.device_count() >= 2 else 1
    datasets = {"text": text_data(dirs["fresh"]), "random tokens": data()}
    ours = run_local(tp, train_worker, dirs["fresh"], tp, datasets, timeout=600)[0]
    mean_rel = {}
    for name, seqs in datasets.items():
        ref, _ = hf_train(dirs["fresh"], STEPS, LR, seqs)
        rel = [abs(a - b) / b for a, b in zip(ours[name], ref)]
        mean_rel[name] = sum(rel) / len(rel)
        print(f"{name}: tp{tp} megatune {[round(x, 3) for x in ours[name][::10]]} HF {[round(x, 3) for x in ref[::10]]}"
              f" mean rel diff {mean_rel[name]:.4f}")
        assert ref[-1] < 0.8 * ref[0], f"{name}: HF loss did not fall ({ref[0]:.3f} -> {ref[-1]:.3f}): no signal"
    assert mean_rel["text"] <= 0.02, f"text: mean relative loss difference {mean_rel['text']:.4f} > 2%"


@pytest.mark.parametrize("fp8", [None, "delayed", "tensorwise"])
def test_te_training_curve_matches_hf(dirs, fp8):
    """The TE spec (`--transformer_impl te`), in bf16 and with FP8 GEMMs (`--fp8_format hybrid --fp8_recipe R`),
    on the text curve of test_training_curve_matches_hf: mean relative loss difference to HF <= 2%, the bar of the
    native spec; the FP8 curve's distance to the TE bf16 curve is printed (the issue's aim: <= 1%)."""
    from megatune.train.distributed import run_local

    if reason := te_unavailable():
        pytest.skip(f"transformer_engine is not importable: {reason}")
    if fp8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need an Ada/Hopper-or-newer GPU")
    seqs = {"text": text_data(dirs["fresh"])}
    ours = run_local(1, train_worker, dirs["fresh"], 1, seqs, "te", fp8, timeout=600)[0]["text"]
    ref, _ = hf_train(dirs["fresh"], STEPS, LR, seqs["text"])
    rel = [abs(a - b) / b for a, b in zip(ours, ref)]
    print(f"te fp8={fp8}: {[round(x, 3) for x in ours[::10]]} HF {[round(x, 3) for x in ref[::10]]} "
          f"mean rel diff {sum(rel) / len(rel):.4f}")
    if fp8:
        bf16 = run_local(1, train_worker, dirs["fresh"], 1, seqs, "te", None, timeout=600)[0]["text"]
        vs = [abs(a - b) / b for a, b in zip(ours, bf16)]
        print(f"te fp8={fp8} vs te bf16: mean rel diff {sum(vs) / len(vs):.4f}, max {max(vs):.4f}")
    assert sum(rel) / len(rel) <= 0.02, f"te fp8={fp8}: mean relative loss difference to HF {sum(rel) / len(rel):.4f}"
