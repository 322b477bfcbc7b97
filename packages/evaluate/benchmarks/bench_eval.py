"""megatune's pt engine vs lm-evaluation-harness on the same requests, in one run (lm-eval as a peer process).

    python packages/evaluate/benchmarks/bench_eval.py --lmeval_python /tmp/lmeval/bin/python     # CPU, tiny model
    python packages/evaluate/benchmarks/bench_eval.py --model qwen2-1.5b --datasets mmlu arc:challenge,easy \\
        --protocols loglikelihood native --batch_size 32 --lmeval_python /tmp/lmeval/bin/python  # GPU
    nox -s bench_eval -- --lmeval_python /tmp/lmeval/bin/python

The requests are built once by megatune's tasks (the loglikelihood protocol's contexts and continuations, the Native
protocol's chat prompts rendered by the tokenizer's template) from --data_dir and written to a file; megatune's
PtEngine and lm-eval's `HFLM` (model `hf`, run by --lmeval_python, a virtualenv with lm-eval; it imports nothing
from megatune) each score them, with the same dtype, device and batch size, after a short warm-up, in --repeat
rounds that alternate the two sides (both models stay loaded; loading is not timed); the fastest round counts. The scores are compared (max |log-likelihood difference|, share of questions where both pick the same
choice, share of identical generations) and a Markdown block for BENCHMARKS.md is printed; --out writes the JSON.

--model tiny: the 1000-token test model (make_tiny_model qwen2, fp32: attention is most of its compute). --model
small: hidden 512, 4 layers, vocab 32000, a small LLM's share of the output layer (fp32). --model qwen2-1.5b: Qwen2-1.5B's shape
(28 layers, hidden 1536, vocab 151936) with random weights built from a config (speed only, no accuracy) and the
tiny test tokenizer (no hub access needed; its BPE makes ~1.5-2x more tokens per text than Qwen's). Or a HF folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
SMALL = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 2, "vocab_size": 32000, "tie_word_embeddings": False}  # a small LLM's proportions
QWEN2_1_5B = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
              "num_key_value_heads": 2, "max_position_embeddings": 32768, "max_window_layers": 28,
              "vocab_size": 151936, "tie_word_embeddings": True}


# ---------------------------------------------------------------- megatune side
def build_model(kind: str, root: Path, device: str) -> Path:
    if Path(kind).is_dir():
        return Path(kind)
    import torch
    from megatune.convert.testing import make_tiny_model
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind == "tiny":
        return make_tiny_model("qwen2", root / "tiny-qwen2", seed=0, dtype="float32")
    shapes = {"small": (SMALL, torch.float32), "qwen2-1.5b": (QWEN2_1_5B, torch.bfloat16)}
    if kind not in shapes:
        raise SystemExit(f"bench_eval: error: --model {kind}: expected tiny, small, qwen2-1.5b or a HF folder")
    shape, dtype = shapes[kind]
    # the test tokenizer and config layout, then the shape (vocab size included) and fresh random weights
    out = make_tiny_model("qwen2", root / kind, seed=0, dtype=str(dtype).removeprefix("torch."), num_hidden_layers=1)
    (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()), **shape}, indent=2))
    (out / "model.safetensors").unlink()
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes on the CPU
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=dtype)
    model.save_pretrained(out)
    return out


def build_requests(args) -> dict:
    from megatune.evaluate.engine import render
    from megatune.evaluate.runner import EvalSettings, prepare
    from megatune.evaluate.tasks import MultipleChoiceTask
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    ll, questions, native = [], [], []
    settings = EvalSettings(datasets=args.datasets, data_dir=args.data_dir, limit=args.limit, few_shot=args.few_shot)
    for name, p in prepare(settings).items():
        examples = [ex for rows in p.data.values() for ex in rows if not ex.defect]
        for ex in examples:
            shots = p.shots.get(ex.subject, [])
            if isinstance(p.task, MultipleChoiceTask):
                context, conts = p.task.ll_context(ex, shots), p.task.continuations(ex)
                questions.append([name, len(ll), len(conts)])
                ll += [[context, c] for c in conts]
            messages = [{"role": "user", "content": p.task.native_prompt(ex, shots)}]
            native.append(render(tok, messages))
    return {"loglikelihood": ll, "questions": questions, "native": native[:args.native_limit]}


class Megatune:
    """megatune's PtEngine, in this process."""

    def __init__(self, args, work: dict) -> None:
        import torch
        from megatune.evaluate.engine import Sampling
        from megatune.evaluate.pt_engine import PtEngine

        self.engine = PtEngine(args.model_dir, dtype=args.dtype, batch_size=args.batch_size)
        self.info = {"device": str(self.engine.device), "torch": torch.__version__}
        self.requests = [tuple(r) for r in work["loglikelihood"]]
        self.prompts, self.sampling = work["native"], Sampling(max_new_tokens=args.max_new_tokens)
        for protocol in args.protocols:  # warm-up: allocator, kernel selection
            self.run(protocol, 64 if protocol == "loglikelihood" else 8)

    def run(self, protocol: str, n: int | None = None) -> tuple[float, list]:
        start = time.perf_counter()
        if protocol == "loglikelihood":
            out = self.engine.loglikelihood(self.requests[:n])
        else:  # raw strings: the chat template is already applied
            out = self.engine.generate(self.prompts[:n], self.sampling)
        return time.perf_counter() - start, out

    def close(self) -> None:
        del self.engine


class LmEval:
    """lm-eval's HFLM in a peer process (--lmeval_python): `run <protocol>` lines in, `BENCH <seconds>` lines out,
    results in a file at the end."""

    def __init__(self, args, work_file: Path, tmp: Path) -> None:
        self.out_file = tmp / "lmeval.json"
        cmd = [args.lmeval_python, __file__, "--peer", str(work_file), "--peer_out", str(self.out_file),
               "--model_dir", str(args.model_dir), "--dtype", args.dtype, "--batch_size", str(args.batch_size),
               "--threads", str(args.threads), "--max_new_tokens", str(args.max_new_tokens),
               "--protocols", *args.protocols]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._answer()  # "ready": model loaded, warmed up

    def _answer(self) -> str:
        for line in self.proc.stdout:
            if line.startswith("BENCH "):
                return line.split(None, 1)[1].strip()
        raise SystemExit(f"bench_eval: error: the lm-eval peer stopped (exit {self.proc.wait()}); see its stderr")

    def run(self, protocol: str) -> tuple[float, None]:
        self.proc.stdin.write(f"run {protocol}\n")
        self.proc.stdin.flush()
        return float(self._answer()), None

    def close(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self._answer()
        self.proc.wait()
        return json.loads(self.out_file.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- lm-eval side (runs in lm-eval's virtualenv)
def peer(args) -> int:
    import torch
    from lm_eval import __version__
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    if args.threads:
        torch.set_num_threads(args.threads)
    work = json.loads(Path(args.peer).read_text(encoding="utf-8"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = HFLM(pretrained=str(args.model_dir), dtype=args.dtype, batch_size=args.batch_size, device=device)
    gen = {"until": [], "max_gen_toks": args.max_new_tokens, "do_sample": False}
    requests = {"loglikelihood": [Instance("loglikelihood", {}, tuple(r), i)
                                  for i, r in enumerate(work["loglikelihood"])],
                "native": [Instance("generate_until", {}, (p, gen), i) for i, p in enumerate(work["native"])]}
    calls = {"loglikelihood": lm.loglikelihood, "native": lm.generate_until}
    out = {"lm_eval": __version__, "device": device}
    for protocol in args.protocols:  # warm-up, as on megatune's side
        calls[protocol](requests[protocol][:64 if protocol == "loglikelihood" else 8], disable_tqdm=True)
    print("BENCH ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        protocol = line.split()[1]
        start = time.perf_counter()
        out[protocol] = calls[protocol](requests[protocol], disable_tqdm=True)
        print(f"BENCH {time.perf_counter() - start}", flush=True)
    Path(args.peer_out).write_text(json.dumps(out), encoding="utf-8")
    print("BENCH done", flush=True)
    return 0


# ---------------------------------------------------------------- comparison and report
def compare(work: dict, ours: dict, theirs: dict, protocol: str) -> dict:
    if protocol == "native":
        same = sum(a == b for a, b in zip(ours["native"], theirs["native"]))
        return {"n": len(work["native"]), "same_text": same / max(1, len(work["native"]))}
    a = [x[0] for x in ours["loglikelihood"]]
    b = [x[0] for x in theirs["loglikelihood"]]
    picks = sum(max(range(n), key=lambda i: a[s + i]) == max(range(n), key=lambda i: b[s + i])
                for _, s, n in work["questions"])
    return {"n": len(a), "questions": len(work["questions"]), "max_abs_diff": max(abs(x - y) for x, y in zip(a, b)),
            "same_pick": picks / max(1, len(work["questions"]))}


def report(args, work: dict, ours: dict, theirs: dict) -> str:
    import torch

    lines = [f"### megatune pt engine vs lm-evaluation-harness {theirs['lm_eval']} ({time.strftime('%Y-%m-%d %H:%M')})",
             "", f"- machine: {platform.machine()}, {os.cpu_count()} cores, device {ours['device']}"
             f"{' (' + torch.cuda.get_device_name() + ')' if ours['device'].startswith('cuda') else ''}, "
             f"torch {ours['torch']}, {args.threads or torch.get_num_threads()} CPU threads",
             f"- command: `python packages/evaluate/benchmarks/bench_eval.py {' '.join(args.argv)}`",
             f"- model: {args.model} ({args.dtype}); data: {' '.join(args.datasets)}, {args.few_shot}-shot"
             f"{f' (first {args.limit} per subject)' if args.limit else ''}; batch size {args.batch_size} both; "
             f"best of {args.repeat} alternating rounds",
             "", "| protocol | requests | megatune s | lm-eval s | megatune req/s | lm-eval req/s | speed-up | agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for protocol in args.protocols:
        c = compare(work, ours, theirs, protocol)
        t_m, t_l = ours[f"{protocol}_s"], theirs[f"{protocol}_s"]
        agree = (f"same text {c['same_text']:.1%}" if protocol == "native" else
                 f"same pick {c['same_pick']:.2%}, max abs dll {c['max_abs_diff']:.1e}")
        lines.append(f"| {protocol} | {c['n']} | {t_m:.2f} | {t_l:.2f} | {c['n'] / t_m:.1f} | {c['n'] / t_l:.1f} | "
                     f"{t_l / t_m:.2f}x | {agree} |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny | small | qwen2-1.5b | a HF folder")
    p.add_argument("--datasets", nargs="+", default=["mmlu#3", "arc#150"], help="--eval_dataset specs")
    p.add_argument("--limit", type=int, default=None, help="samples per subject for specs without #N")
    p.add_argument("--few_shot", type=int, default=0, help="solved examples per prompt (first k of dev/train)")
    p.add_argument("--protocols", nargs="+", default=["loglikelihood"], choices=["loglikelihood", "native"])
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in both processes (0 = default)")
    p.add_argument("--max_new_tokens", type=int, default=32, help="Native protocol: tokens generated per prompt")
    p.add_argument("--repeat", type=int, default=1, help="rounds, alternating the two sides; the fastest counts")
    p.add_argument("--native_limit", type=int, default=None, help="Native protocol: at most this many prompts")
    p.add_argument("--lmeval_python", default=os.environ.get("LMEVAL_PYTHON", "/tmp/lmeval/bin/python"))
    p.add_argument("--data_dir", default=os.environ.get("MEGATUNE_EVAL_DATA") or str(DEFAULT_DATA))
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    p.add_argument("--peer", help=argparse.SUPPRESS)
    p.add_argument("--peer_out", help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.peer:
        return peer(args)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if not Path(args.lmeval_python).is_file():
        print(f"bench_eval: error: --lmeval_python {args.lmeval_python}: not found; make one with `python3 -m venv "
              f"/tmp/lmeval && /tmp/lmeval/bin/pip install 'lm-eval[hf]==0.4.13'`", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        args.model_dir = build_model(args.model, Path(tmp), device)
        work = build_requests(args)
        work_file = Path(tmp) / "requests.json"
        work_file.write_text(json.dumps(work, ensure_ascii=False), encoding="utf-8")
        sides = {"megatune": Megatune(args, work), "lmeval": LmEval(args, work_file, Path(tmp))}
        times: dict = {(side, p): [] for side in sides for p in args.protocols}
        ours: dict = dict(sides["megatune"].info)
        for _ in range(args.repeat):  # alternate the two sides, so a busy spell on a shared machine hits both
            for protocol in args.protocols:
                for name, side in sides.items():
                    seconds, result = side.run(protocol)
                    times[(name, protocol)].append(seconds)
                    if result is not None:
                        ours[protocol] = result
        sides["megatune"].close()
        theirs = sides["lmeval"].close()
    for protocol in args.protocols:  # the fastest of the rounds on each side
        ours[f"{protocol}_s"], theirs[f"{protocol}_s"] = (min(times[(s, protocol)]) for s in ("megatune", "lmeval"))
    text = report(args, work, ours, theirs)
    print("\n" + text + "\n")
    if args.out:
        figures = {p: {"megatune_s": ours[f"{p}_s"], "lmeval_s": theirs[f"{p}_s"], **compare(work, ours, theirs, p)}
                   for p in args.protocols}
        Path(args.out).write_text(json.dumps({"argv": args.argv, "figures": figures, "report": text}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
