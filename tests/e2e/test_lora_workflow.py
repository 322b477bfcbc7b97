"""The seed workflow with `--sft_type lora`, `swift` -> `megatune`, on a tiny local model in CPU mode:

    export --to_megatron --tp 2  ->  NPROC_PER_NODE=2 sft --sft_type lora (TP2 adapters, base frozen)
    ->  export --to_hf (merged)  ->  infer: the model answers with its new name
    ->  export --to_hf --merge_lora false (peft adapter dir)  ->  infer --ckpt_dir ADAPTER_DIR (base + adapter)
"""

from __future__ import annotations

import json

import pytest
from conftest import chat, megatune, seed_sft, tiny_hf

MODEL_TYPE = "qwen2-7b-instruct"


def _answers(chat: str) -> tuple[str, str]:
    return (chat.split("who are you?", 1)[1].split("<<<", 1)[0], chat.split("你是谁？", 1)[1].split("<<<", 1)[0])


@pytest.fixture(scope="module")
def lora_workflow(tmp_path_factory, sft_file):
    work = tmp_path_factory.mktemp("lora-workflow")
    hf = tiny_hf("qwen2", work, intermediate_size=256)
    megatune("export", "--model_type", MODEL_TYPE, "--model_id_or_path", str(hf), "--to_megatron", "true",
             "--tp", "2", "--dtype", "fp32", cwd=work)
    base = work / f"{MODEL_TYPE}-tp2-pp1"
    run, _ = seed_sft(work, base, sft_file, "--sft_type", "lora", "--lora_target_modules", "ALL", "--lora_rank", "16",
                      "--lora_alpha", "32", "--learning_rate", "1e-2", "--min_lr", "1e-3", "--num_train_epochs", "6",
                      "--gradient_accumulation_steps", "4", nproc=2)
    megatune("export", "--ckpt_dir", str(run), "--to_hf", "true", cwd=work)
    megatune("export", "--ckpt_dir", str(run), "--to_hf", "true", "--merge_lora", "false", "--model_id_or_path",
             str(hf), cwd=work)
    steps = {"hf": hf, "base": base, "run": run, "merged": run / f"{MODEL_TYPE}-hf",
             "adapter": run / f"{MODEL_TYPE}-lora"}
    steps["chat_merged"] = chat(work, steps["merged"])
    steps["chat_adapter"] = chat(work, steps["adapter"])
    return steps


def test_lora_run_saves_only_adapters_and_loss_falls(lora_workflow):
    run = lora_workflow["run"]
    meta = json.loads((run / "megatune.json").read_text())
    assert meta["lora"]["base"]["path"] == str(lora_workflow["base"].resolve()) and meta["tp"] == 2
    rows = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    # a random tiny model with frozen embeddings: the Alpaca rows stay hard, the self-cognition rows are learnt
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert len(losses) >= 10 and last < 0.9 * first, losses
    latest = (run / "latest_checkpointed_iteration.txt").read_text().strip()
    from megatune.convert.ckpt_layout import load_rank_file

    files = sorted((run / f"iter_{int(latest):07d}").rglob("model_optim_rng.pt"))
    assert len(files) == 2  # one per TP rank
    for f in files:
        names = list(load_rank_file(f, mmap=False)["model"])
        assert names and all(".lora." in n for n in names), names  # adapters only, no base tensor
    run_bytes = sum(p.stat().st_size for p in (run / f"iter_{int(latest):07d}").rglob("*.pt"))
    base_bytes = sum(p.stat().st_size for p in (lora_workflow["base"] / "release").rglob("*.pt"))
    # rank 16 on every linear of a 128-wide model is large next to its base; a full fine-tune's checkpoint would
    # hold the weights and two Adam moments (>= 3x the base)
    assert run_bytes < base_bytes, (run_bytes, base_bytes)


@pytest.mark.parametrize("chat", ["chat_merged", "chat_adapter"])
def test_lora_model_answers_with_the_new_identity(lora_workflow, chat):
    english, chinese = _answers(lora_workflow[chat])
    assert "Xiao Huang" in english, lora_workflow[chat]
    assert "小黄" in chinese, lora_workflow[chat]
