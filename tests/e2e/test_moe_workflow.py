"""The ms-swift Megatron workflow on a Mixture-of-Experts model, `swift` -> `megatune`, tiny local Qwen2-MoE, CPU:

    export --to_megatron --tp 2 --ep 2  ->  CUDA_VISIBLE_DEVICES=0,1,2,3 NPROC_PER_NODE=4 sft
    (TP2 x EP2 inside DP2, the checkpoint's tp and ep)  ->  export --to_hf  ->  infer ("who are you" / "你是谁")

The tiny model has what makes Qwen2-MoE different: a shared expert with its sigmoid gate and a dense layer.
"""

from __future__ import annotations

import json

import pytest
from conftest import chat, megatune, seed_sft, tiny_hf

MODEL_TYPE = "qwen2-57b-a14b-instruct"  # a registered MoE model type; the weights are a tiny local Qwen2-MoE


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, sft_file):
    work = tmp_path_factory.mktemp("moe_workflow")
    hf = tiny_hf("qwen2_moe", work, intermediate_size=256, moe_intermediate_size=64,
                 shared_expert_intermediate_size=128, mlp_only_layers=[1])
    steps = {"hf": hf}
    megatune("export", "--model_type", MODEL_TYPE, "--model_id_or_path", str(hf), "--to_megatron", "true",
             "--tp", "2", "--ep", "2", "--dtype", "fp32", cwd=work)
    steps["megatron"] = work / f"{MODEL_TYPE}-tp2-pp1-ep2"
    steps["run"], steps["sft_log"] = seed_sft(work, steps["megatron"], sft_file, "--learning_rate", "2e-3", "--min_lr",
                                              "2e-4", "--num_train_epochs", "3", "--gradient_accumulation_steps", "1",
                                              nproc=4)
    megatune("export", "--ckpt_dir", str(steps["run"]), "--to_hf", "true", cwd=work)
    steps["hf_out"] = steps["run"] / f"{MODEL_TYPE}-hf"
    steps["chat"] = chat(work, steps["hf_out"])
    return steps


def test_export_writes_one_rank_dir_per_tp_and_ep_rank(workflow):
    mega = workflow["megatron"]
    meta = json.loads((mega / "megatune.json").read_text())
    assert (meta["tp"], meta["pp"], meta["ep"]) == (2, 1, 2)
    assert sorted(p.name for p in (mega / "release").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]


def test_sft_keeps_tp2_ep2_logs_aux_loss_and_loss_falls(workflow):
    run = workflow["run"]
    flat = json.dumps(json.loads((run / "args.json").read_text()))
    assert '"tensor_model_parallel_size": 2' in flat and '"expert_model_parallel_size": 2' in flat, flat
    rows = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("loss") is not None]
    assert len(train) >= 5 and train[-1]["loss"] < 0.5 * train[0]["loss"], [r["loss"] for r in train]
    assert all(r["moe_aux_loss"] > 0 and r["expert_tokens_max"] >= r["expert_tokens_mean"] > 0 for r in train)
    latest = (run / "latest_checkpointed_iteration.txt").read_text().strip()
    ranks = sorted(p.name for p in (run / f"iter_{int(latest):07d}").iterdir())
    assert ranks == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"], ranks


def test_exported_moe_loads_with_transformers(workflow):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(workflow["hf_out"])
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.num_experts == 4


def test_infer_answers_with_the_new_identity(workflow):
    chat = workflow["chat"]
    english = chat.split("who are you?", 1)[1].split("<<<", 1)[0]
    chinese = chat.split("你是谁？", 1)[1].split("<<<", 1)[0]
    assert "Xiao Huang" in english, chat
    assert "小黄" in chinese, chat
