"""Conversion throughput and memory on a 7B-shaped checkpoint: HF -> Megatron tp2 -> HF, next to `cp`.

The HF checkpoint (Qwen2-7B shape, random bf16) is written tensor by tensor straight into safetensors shards, so
making it needs no transformers and little memory. Each conversion runs in a fresh subprocess that reports its own
peak RSS (VmHWM). `--scale 0.25` keeps 25% of the layers (embeddings stay full size) for a quicker run.

    python packages/convert/benchmarks/bench_convert.py [--scale 1.0] [--workdir /tmp] [--tp 2]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from megatune.convert.arch import shape_of
from megatune.convert.hf_io import HFWriter
from megatune.convert.plan import hf_shape

QWEN2_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "hidden_act": "silu",
}
LAYER = ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
         "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight",
         "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]

# Peak RSS is VmHWM (this process image's high-water mark), not ru_maxrss: Linux carries ru_maxrss across
# fork + exec, so it would report at least the benchmark parent's RSS (~1.5 GB after making the checkpoint).
CHILD = """
import sys, time, json
from megatune.convert.convert import hf_to_megatron, megatron_to_hf
t = time.perf_counter()
{call}
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"seconds": time.perf_counter() - t, "max_rss_mb": hwm / 1024}}))
"""


def make_checkpoint(out: Path, config: dict) -> int:
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shape = shape_of(config)
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{n}" for i in range(shape.layers) for n in LAYER]
    names += ["model.norm.weight", "lm_head.weight"]
    specs = [(n, hf_shape(n, shape), torch.bfloat16) for n in names]
    # one 64 MiB random block, tiled with a rolling offset: random-looking bytes at memory speed
    block = torch.randn(32 << 20, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    # keep_cache: the source stays in the page cache as it did for earlier runs, so `cp` is measured the same way
    writer = HFWriter(out, specs, max_shard_size=4 * 10**9, keep_cache=True)
    for i, (n, s, _) in enumerate(specs):
        numel = math.prod(s)
        reps = -(-numel // block.numel()) + 1
        t = block.roll(i * 7919).repeat(reps)[:numel].view(s) if reps > 2 else block.roll(i)[:numel].view(s)
        writer.write(n, t)
    writer.close()
    return sum(math.prod(s) * 2 for _, s, _ in specs)


def run_child(call: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD.format(call=call)], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"conversion failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 28 layers to keep")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp")
    args = ap.parse_args()
    config = dict(QWEN2_7B, num_hidden_layers=max(1, round(28 * args.scale)))
    work = Path(tempfile.mkdtemp(prefix="bench_convert-", dir=args.workdir))
    try:
        t = time.perf_counter()
        nbytes = make_checkpoint(work / "hf", config)
        gb = nbytes / 1e9
        print(f"model: Qwen2-7B shape, {config['num_hidden_layers']} layers, bf16, {gb:.2f} GB "
              f"(written in {time.perf_counter() - t:.0f}s)")

        t = time.perf_counter()
        subprocess.run(["cp", "-r", str(work / "hf"), str(work / "cp")], check=True)
        subprocess.run(["sync"], check=True)
        cp_s = time.perf_counter() - t
        shutil.rmtree(work / "cp")
        print(f"cp -r + sync:          {cp_s:6.1f}s  {gb / cp_s:5.2f} GB/s")

        to_meg = run_child(f"hf_to_megatron({str(work / 'hf')!r}, {str(work / 'meg')!r}, tp={args.tp})\n"
                           f"import os; os.sync()")
        print(f"HF -> Megatron tp{args.tp}:   {to_meg['seconds']:6.1f}s  {gb / to_meg['seconds']:5.2f} GB/s "
              f"({gb / to_meg['seconds'] / (gb / cp_s):.2f}x cp)  peak RSS {to_meg['max_rss_mb']:.0f} MB")
        shutil.rmtree(work / "hf")  # disk: keep at most two copies around
        to_hf = run_child(f"megatron_to_hf({str(work / 'meg')!r}, {str(work / 'back')!r})\nimport os; os.sync()")
        print(f"Megatron tp{args.tp} -> HF:   {to_hf['seconds']:6.1f}s  {gb / to_hf['seconds']:5.2f} GB/s "
              f"({gb / to_hf['seconds'] / (gb / cp_s):.2f}x cp)  peak RSS {to_hf['max_rss_mb']:.0f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
