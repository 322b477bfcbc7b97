"""Checkpoints: loading converted Megatron dirs (resharded), save -> resume equality, export back to HF, errors.

Real megatron-core over gloo in CPU mode. One `run_local(2, ...)` call does all the distributed work.
"""

from __future__ import annotations

import json

import pytest
import torch
from megatune.convert.convert import hf_to_megatron, megatron_to_hf
from megatune.convert.testing import make_tiny_model
from megatune.train.checkpoint import _torch_load
from megatune.train.distributed import run_local
from safetensors.torch import load_file
from test_model_parity import gather_vocab, hf_logits, megatron_logits

VOCAB = 1000


def _train_step(model, optimizer, ids):
    """One real fwd/bwd through megatron-core's schedule + DDP grad sync + optimizer step; returns the loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = ids.shape
    pos = torch.arange(s).expand(b, s)

    def step(_it, m):
        losses = m(ids, pos, None, labels=ids)  # [b, s] per-token loss
        return losses, lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})

    model.zero_grad_buffer()
    optimizer.zero_grad()
    out = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None, None]), model=[model],
                                      num_microbatches=2, seq_length=s, micro_batch_size=b, forward_only=False)
    _, grad_norm, _ = optimizer.step()
    assert grad_norm > 0.01, "grad clipping (clip_grad=0.01) must be exercised"
    return float(out[0]["loss"]) if out else None


def _trainable(hf_dir, seed_ids):
    """qwen2 at the current tp/pp, wrapped in megatron-core DDP, fp32 Adam with grad clipping, lr scheduler."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatune.train.checkpoint import load_pretrained
    from megatune.train.model import build_model

    [gpt] = build_model(hf_dir, tp=2, pp=1, hidden_dropout=0.1)  # dropout: RNG restore must matter
    load_pretrained([gpt], hf_dir)
    model = DistributedDataParallel(gpt.config, DistributedDataParallelConfig(), gpt)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.01, bf16=False), [model])
    sched = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=1e-2, min_lr=1e-3, lr_warmup_steps=2,
                                    lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.0, end_wd=0.0,
                                    wd_incr_steps=10, wd_incr_style="constant")
    return model, opt, sched


def worker(rank, world_size, hf_dir, legacy_dir, saved_dir, bad_dir, other_hf, ids):
    from megatron.core import parallel_state
    from megatune.train.checkpoint import load_checkpoint, load_pretrained, save_checkpoint
    from megatune.train.distributed import init_distributed
    from megatune.train.errors import TrainError
    from megatune.train.model import build_model

    out = {}
    # 1. legacy dir converted at tp2 -> loaded at tp1 x pp2 (resharded in memory): logits still match HF.
    init_distributed(1, 2)
    model = build_model(legacy_dir, tp=1, pp=2)
    load_pretrained(model, legacy_dir)
    logits = megatron_logits(model[0].eval(), ids)
    out["pp2_from_tp2"] = None if logits is None else (0, logits)
    # 2. errors are one clear line
    for name, src in (("empty", bad_dir), ("wrong_arch", other_hf)):
        try:
            load_pretrained(model, src)
            out[name] = "no error"
        except TrainError as e:
            out[name] = str(e)

    # 3. train 1 step, save, train 1 more; resume from the save in a fresh model: the same step 2.
    init_distributed(2, 1, seed=7)
    model, opt, sched = _trainable(hf_dir, ids)
    _train_step(model, opt, ids)
    sched.step(1)
    meta = {"hf_config": json.load(open(f"{hf_dir}/config.json")), "model_type": "qwen2"}
    save_checkpoint(saved_dir, 1, [model], optimizer=opt, scheduler=sched, extra={"consumed_samples": 4},
                    meta=meta, tokenizer_dir=hf_dir)
    save_checkpoint(saved_dir, 1, [model], optimizer=opt, scheduler=sched, extra={"consumed_samples": 4},
                    meta=meta, tokenizer_dir=hf_dir)  # re-saving the same iteration replaces it cleanly
    loss2 = _train_step(model, opt, ids)
    w2 = model.module.decoder.layers[0].mlp.linear_fc1.weight.detach().clone()

    torch.manual_seed(123)  # disturb every RNG the resume must restore
    init_distributed(2, 1, seed=99)
    model, opt, sched = _trainable(hf_dir, ids)
    info = load_checkpoint(saved_dir, [model], opt, sched)
    resumed = _train_step(model, opt, ids)
    w2_resumed = model.module.decoder.layers[0].mlp.linear_fc1.weight.detach()
    out["resume"] = (info["iteration"], info["extra"], loss2, resumed, (w2 - w2_resumed).abs().max().item(),
                     sched.num_steps, parallel_state.get_tensor_model_parallel_rank())
    return out


@pytest.mark.slow
def test_legacy_load_save_resume_export(tmp_path):
    hf = make_tiny_model("qwen2", tmp_path / "hf", seed=0, dtype="float32")
    other = make_tiny_model("qwen3", tmp_path / "other", seed=0, dtype="float32")
    legacy = hf_to_megatron(hf, tmp_path / "legacy", tp=2, pp=1, model_type="qwen2")
    (tmp_path / "empty").mkdir()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    saved = tmp_path / "run"
    results = run_local(2, worker, str(hf), str(legacy), str(saved), str(tmp_path / "empty"), str(other), ids,
                        timeout=240)

    ref = hf_logits(str(hf), ids)
    diff = (gather_vocab([r["pp2_from_tp2"] for r in results], VOCAB) - ref).abs().max().item()
    assert diff <= 1e-4, f"tp2 legacy dir loaded at pp2: max |diff| = {diff:.2e}"

    for r in results:
        assert r["empty"].count("\n") == 0 and "empty" in r["empty"] and "Megatron checkpoint" in r["empty"]
        assert r["wrong_arch"].count("\n") == 0 and "do not match" in r["wrong_arch"], r["wrong_arch"]
        iteration, extra, loss2, resumed, wdiff, steps, _ = r["resume"]
        assert (iteration, extra, steps) == (1, {"consumed_samples": 4}, 1)
        assert resumed == pytest.approx(loss2, abs=1e-6), "resumed step differs: optimizer/RNG state not restored"
        assert wdiff <= 1e-6

    # Layout on disk: Megatron-LM legacy, tracker last, no temporaries, meta of *this* run.
    assert (saved / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert sorted(p.name for p in saved.iterdir() if p.name.startswith(".")) == []
    meta = json.loads((saved / "megatune.json").read_text())
    assert (meta["tp"], meta["pp"], meta["naming"], meta["layers_per_stage"]) == (2, 1, "local", [4])
    assert (saved / "tokenizer.json").is_file()
    f = _torch_load(saved / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt")  # weights_only + allow-list
    assert f["checkpoint_version"] == 3.0 and f["iteration"] == 1
    assert f["args"].tensor_model_parallel_size == 2 and f["args"].padded_vocab_size == meta["padded_vocab_size"]
    assert {"optimizer", "opt_param_scheduler", "rng_state", "extra"} <= set(f)

    # `megatune export --to_hf` reads what we saved; weights changed by training, names/shapes are HF's.
    out = megatron_to_hf(saved)
    exported, original = load_file(out / "model.safetensors"), load_file(hf / "model.safetensors")
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in original.items()}
