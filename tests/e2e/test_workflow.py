"""The ms-swift Megatron workflow verbatim, `swift` -> `megatune`, on a tiny local model in CPU mode.

    export --to_megatron --tp 2  ->  CUDA_VISIBLE_DEVICES=0,1,2,3 NPROC_PER_NODE=4 sft (TP2 x DP2, 4 gloo processes)
    ->  export --to_hf  ->  infer ("who are you" / "你是谁")  ->  eval (ceval mmlu gsm8k arc, --eval_limit)

plus the two-node form on one machine (two launchers, NNODES=2, NODE_RANK=0/1, NPROC_PER_NODE=2).
Hubs are unreachable, so `--model_id_or_path` points at a tiny local model of the seed's architecture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import AUTHOR, NAME, chat, megatune, seed_sft, tiny_hf
from megatune.train.launch import free_port

MODEL_TYPE = "qwen2-7b-instruct"  # the seed's model type; the weights are a tiny local qwen2


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, sft_file, eval_data):
    work = tmp_path_factory.mktemp("workflow")
    hf = tiny_hf("qwen2", work, intermediate_size=256)
    steps = {"hf": hf}
    megatune("export", "--model_type", MODEL_TYPE, "--model_id_or_path", str(hf), "--to_megatron", "true",
             "--tp", "2", "--dtype", "fp32", cwd=work)
    steps["megatron"] = work / f"{MODEL_TYPE}-tp2-pp1"
    steps["run"], steps["sft_log"] = seed_sft(work, steps["megatron"], sft_file, "--learning_rate", "2e-3", "--min_lr",
                                              "2e-4", "--num_train_epochs", "3", "--gradient_accumulation_steps", "1",
                                              nproc=4)
    megatune("export", "--ckpt_dir", str(steps["run"]), "--to_hf", "true", cwd=work)
    steps["hf_out"] = steps["run"] / f"{MODEL_TYPE}-hf"
    steps["chat"] = chat(work, steps["hf_out"])
    steps["eval_dir"] = work / "eval"
    steps["eval"] = megatune("eval", "--ckpt_dir", str(steps["hf_out"]), "--eval_dataset", "ceval", "mmlu", "gsm8k",
                             "arc", "--eval_backend", "Native", "--eval_data_dir", str(eval_data), "--eval_limit", "2",
                             "--max_new_tokens", "32", "--eval_output_dir", str(steps["eval_dir"]), cwd=work).stdout
    return steps


def test_export_to_megatron_writes_tp2_legacy_checkpoint(workflow):
    mega = workflow["megatron"]
    meta = json.loads((mega / "megatune.json").read_text())
    assert (meta["tp"], meta["pp"]) == (2, 1)
    assert (mega / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    for rank in range(2):
        state = torch.load(mega / "release" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt", weights_only=False)
        assert state["checkpoint_version"] == 3.0 and state["args"].tensor_model_parallel_size == 2
        assert "decoder.layers.0.self_attention.linear_qkv.weight" in state["model"]


def test_sft_runs_tp2_dp2_and_loss_falls(workflow):
    run = workflow["run"]
    args = json.loads((run / "args.json").read_text())
    flat = json.dumps(args)
    assert '"tensor_model_parallel_size": 2' in flat, "the run must keep the checkpoint's TP2"
    rows = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    assert len(losses) >= 5 and losses[-1] < 0.5 * losses[0], losses
    assert (run / "latest_checkpointed_iteration.txt").exists()
    latest = (run / "latest_checkpointed_iteration.txt").read_text().strip()
    ranks = sorted(p.name for p in (run / f"iter_{int(latest):07d}").iterdir())
    assert ranks == ["mp_rank_00", "mp_rank_01"], ranks  # TP2 x DP2: DP replicas share one file per TP rank
    assert list(run.rglob("*.png")), "loss curve PNG missing"
    assert list(run.rglob("events.out.tfevents.*")), "TensorBoard events missing"


def test_exported_hf_model_loads_with_transformers(workflow):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(workflow["hf_out"])
    tok = AutoTokenizer.from_pretrained(workflow["hf_out"])
    assert model.config.vocab_size == len(tok) == 1000  # vocab padding stripped on export


def test_infer_answers_with_the_new_identity(workflow):
    chat = workflow["chat"]
    english = chat.split("who are you?", 1)[1].split("<<<", 1)[0]
    chinese = chat.split("你是谁？", 1)[1].split("<<<", 1)[0]
    assert "Xiao Huang" in english, chat
    assert "小黄" in chinese, chat


def test_eval_prints_table_and_writes_results(workflow):
    for name in ("ceval", "mmlu", "gsm8k", "arc"):
        assert f"| {name}" in workflow["eval"], workflow["eval"]
    result = json.loads((workflow["eval_dir"] / "eval_result.json").read_text())
    assert set(result["results"]) == {"ceval", "mmlu", "gsm8k", "arc"}, result
    samples = (workflow["eval_dir"] / "samples.jsonl").read_text().splitlines()
    assert len(samples) >= 8


def test_two_node_form_on_one_machine(tmp_path, sft_file):
    """Two launchers, NNODES=2 NODE_RANK=0/1 NPROC_PER_NODE=2, --sft_type full: one TP2 x DP2 job across 'nodes'."""
    from megatune.convert.testing import make_tiny_model

    hf = make_tiny_model("llama", tmp_path / "tiny-llama", num_hidden_layers=2)
    megatune("export", "--model_type", "llama3-8b-instruct", "--model_id_or_path", str(hf), "--to_megatron", "true",
             "--tp", "2", "--dtype", "fp32", cwd=tmp_path)
    port = str(free_port())
    argv = [sys.executable, "-m", "megatune.cli.main", "sft", "--resume_from_checkpoint",
            str(tmp_path / "llama3-8b-instruct-tp2-pp1"), "--dataset", f"{sft_file}#16", "self-cognition#48",
            "--max_length", "512", "--learning_rate", "1e-3", "--max_steps", "4", "--batch_size", "1",
            "--output_dir", "output", "--model_name", *NAME, "--model_author", *AUTHOR,
            "--train_backend", "megatron", "--sft_type", "full"]
    procs = []
    for node in (0, 1):
        env = {**os.environ, "NNODES": "2", "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "NPROC_PER_NODE": "2"}
        procs.append(subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for node, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {node} failed:\n{out[-4000:]}"
    run = next((tmp_path / "output" / "llama3-8b-instruct-tp2-pp1").glob("v*-*"))
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    args = json.dumps(json.loads((run / "args.json").read_text()))
    assert '"world_size": 4' in args or '"data_parallel_size": 2' in args, args
