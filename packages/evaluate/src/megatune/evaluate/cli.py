"""`megatune infer` and `megatune eval`: swift's flags (parsed by megatune.argmap.cli), then infer.py / runner.py.

Every problem ends in one line on stderr, `megatune <verb>: error: ...`, and the exit code every megatune command
uses (README "Exit codes"): 2 for a usage error (bad flag or value, a path or dataset that does not exist, an extra
the flags need: UsageError, ArgumentError), 1 for a runtime failure (a data file that cannot be read, a model that
does not load, an output that cannot be written: EvalError, OSError), 130 when interrupted (Ctrl-C), 143 when
terminated (SIGTERM). A traceback means a bug in megatune.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megatune.argmap.cli import SwiftArgParser, arg
from megatune.argmap.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    ArgumentError,
)
from megatune.evaluate.engine import Sampling
from megatune.evaluate.engines import load_engine
from megatune.evaluate.errors import EvalError, UsageError

_f = arg


@dataclass
class ModelArguments:
    ckpt_dir: str | None = _f(None, "Hugging Face model folder to load (e.g. output/.../qwen2-7b-instruct-hf)")
    model_type: str | None = _f(None, "model type, e.g. qwen2-7b-instruct (with --model_id_or_path)")
    model_id_or_path: str | None = _f(None, "HF folder or hub id of the weights for --model_type")
    infer_backend: Literal["pt", "vllm"] = _f("pt", "pt = transformers (any machine); vllm = megatune-evaluate[vllm]")
    torch_dtype: str | None = _f(None, "float32|bfloat16|float16; default bf16 on GPU, fp32 on CPU")
    max_batch_size: int = _f(16, "rows per forward pass (pt engine; a row is one prompt, or one context with all "
                                 "its answer continuations)")
    add_bos_token: Literal["auto", "true", "false"] = _f(
        "auto", "BOS before raw-text prompts: auto = the tokenizer's default, as lm-evaluation-harness does "
                "(Llama/Mistral/Gemma tokenizers add it, Qwen's do not); true/false force it. Chat-template "
                "prompts never get an extra one (the template writes it)")
    tensor_parallel_size: int = _f(1, "GPUs per model (vllm engine)")
    gpu_memory_utilization: float = _f(0.9, "fraction of GPU memory vLLM may take")
    max_model_len: int | None = _f(None, "context length; default the model's max_position_embeddings")
    system: str | None = _f(None, "system prompt")
    max_new_tokens: int = _f(2048, "most tokens generated per reply")
    temperature: float = _f(0.0, "0 = greedy decoding (the default)")
    top_p: float = _f(1.0, "nucleus sampling (when temperature > 0)")
    top_k: int = _f(0, "top-k sampling, 0 = off (when temperature > 0)")
    repetition_penalty: float = _f(1.0, "1.0 = off")
    seed: int = _f(42, "sampling seed")
    progress: bool = _f(True, "show progress bars")

    def sampling(self) -> Sampling:
        return Sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                        top_k=self.top_k, repetition_penalty=self.repetition_penalty, seed=self.seed)

    def engine(self, model_dir: Path):
        if self.infer_backend == "vllm":
            kw = dict(tensor_parallel_size=self.tensor_parallel_size, seed=self.seed,
                      gpu_memory_utilization=self.gpu_memory_utilization)
        else:
            kw = dict(batch_size=self.max_batch_size)
        return load_engine(self.infer_backend, model_dir, dtype=self.torch_dtype, max_length=self.max_model_len,
                           add_bos=self.add_bos_token, **kw)

    def model_dir(self) -> Path:
        from megatune.evaluate.source import resolve_model_dir

        return resolve_model_dir(self.ckpt_dir, self.model_type, self.model_id_or_path)


@dataclass
class InferArguments(ModelArguments):
    query: str | None = _f(None, "answer this one question and exit (no REPL)")
    val_dataset: list[str] = _f([], "batch mode: local .jsonl/.json/.csv files (path#N keeps N rows)")
    result_dir: str | None = _f(None, "where batch answers go; default {ckpt_dir}/infer_result (swift's place)")
    stream: bool = _f(True, "print replies while they are decoded (pt engine)")


@dataclass
class EvalArguments(ModelArguments):
    max_new_tokens: int = _f(512, "most tokens generated per answer (llmuses Native: 512)")
    eval_dataset: list[str] = _f(["ceval", "mmlu", "gsm8k", "arc"],
                                 "benchmarks ceval mmlu gsm8k arc, each NAME[:SUBSET[,SUBSET]][#N]: e.g. "
                                 "mmlu:anatomy,virology#20 ceval:computer_network arc:easy,challenge gsm8k#50 "
                                 "(#N = first N samples per subject; arc alone = arc:challenge)")
    eval_backend: Literal["Native", "OpenCompass"] = _f("Native", "only Native is built in")
    eval_protocol: Literal["native", "loglikelihood"] = _f(
        "native", "native = chat + generate + extract (llmuses); loglikelihood = lm-evaluation-harness style")
    eval_few_shot: int = _f(0, "in-context examples from dev/train per question (0 = llmuses Native)")
    eval_limit: int | None = _f(None, "at most N samples per subject, for datasets without their own #N")
    eval_data_dir: str | None = _f(None, "root holding ceval/ mmlu/ gsm8k/ arc/; default $MEGATUNE_EVAL_DATA, else hub")
    eval_output_dir: str | None = _f(None, "default eval_outputs/<model folder name>/<YYYYMMDD-HHMMSS>")


INFER_HELP = ("Chat with a model (`<<< ` prompt; `clear` forgets the history, `exit` leaves), answer one --query, "
              "or answer every row of --val_dataset into a jsonl.")
EVAL_HELP = ("Benchmark a model on C-Eval, MMLU, GSM8K and ARC-Challenge; prints dataset | score and writes "
             "eval_result.json and samples.jsonl.")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that a run's temporary files are removed on the way out (exit 143)."""


def _terminated(signum, frame):
    raise Terminated()


def _run(verb: str, body: Callable[[list[str] | None], None], argv: list[str] | None) -> int:
    """Run a command body and turn what it raises into one stderr line and an exit code."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminated)
    code, message = EXIT_OK, None
    try:
        body(argv)
    except SystemExit as e:  # --help
        code = int(e.code or 0)
    except (UsageError, ArgumentError) as e:
        code, message = EXIT_USAGE, str(e)
    except EvalError as e:
        code, message = EXIT_FAILURE, str(e)
    except OSError as e:  # permissions, a full disk: still one line naming the file
        code, message = EXIT_FAILURE, f"{e.filename or ''}: {e.strerror or e}"
    except KeyboardInterrupt:
        code, message = EXIT_INTERRUPTED, "interrupted"
    except Terminated:
        code, message = EXIT_TERMINATED, "terminated (SIGTERM)"
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if message is not None:
        first = " ".join(message.split("\n")[0].split()) or "unknown error"
        print(f"megatune {verb}: error: {first}", file=sys.stderr, flush=True)
    return code


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _infer(argv: list[str] | None) -> None:
    args = SwiftArgParser(InferArguments, prog="megatune infer", description=INFER_HELP).parse(argv)
    model_dir = args.model_dir()
    engine = args.engine(model_dir)
    from megatune.evaluate import infer

    stream = args.stream and args.infer_backend == "pt"
    if args.val_dataset:
        base = Path(args.result_dir) if args.result_dir else (
            Path(args.ckpt_dir) / "infer_result" if args.ckpt_dir else Path("infer_result"))
        infer.batch_infer(engine, args.val_dataset, args.sampling(), args.system, base / f"{_timestamp()}.jsonl",
                          progress=args.progress)
    elif args.query is not None:
        infer.one_shot(engine, args.query, args.sampling(), args.system, stream=stream)
    else:
        infer.repl(engine, args.sampling(), args.system, stream=stream)


def _eval(argv: list[str] | None) -> None:
    args = SwiftArgParser(EvalArguments, prog="megatune eval", description=EVAL_HELP).parse(argv)
    if args.eval_backend != "Native":
        raise UsageError(f"--eval_backend {args.eval_backend} is not built in; use --eval_backend Native "
                         "(and --eval_protocol loglikelihood for lm-evaluation-harness-style scores)")
    from megatune.evaluate import report, runner

    settings = runner.EvalSettings(
        datasets=args.eval_dataset, protocol=args.eval_protocol, few_shot=args.eval_few_shot,
        limit=args.eval_limit, data_dir=args.eval_data_dir, max_new_tokens=args.max_new_tokens,
        system=args.system, progress=args.progress)
    model_dir = args.model_dir()
    prepared = runner.prepare(settings)  # data problems surface before minutes of weight loading
    out = report.OutputDir(args.eval_output_dir or Path("eval_outputs") / model_dir.name / _timestamp())
    try:
        engine = args.engine(model_dir)
        start = time.perf_counter()
        results = runner.evaluate(engine, settings, prepared, on_samples=out.add_samples)
        seconds = time.perf_counter() - start
        path = out.commit({
            "model": str(model_dir), "infer_backend": args.infer_backend, "eval_backend": args.eval_backend,
            "protocol": args.eval_protocol, "few_shot": args.eval_few_shot, "limit": args.eval_limit,
            "datasets": [str(p.spec) for p in prepared.values()],
            "protocol_detail": runner.describe_protocol(settings, prepared), "engine": engine.describe(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 2),
            "args": {k: v for k, v in dataclasses.asdict(args).items() if v is not None},
            "results": results,
        })
    finally:
        out.discard()  # nothing left after a commit; an interrupted run leaves the previous results as they were
    print(report.breakdown(results))
    print(f"\nmodel: {model_dir}   protocol: {args.eval_protocol} ({args.eval_few_shot}-shot)   "
          f"time: {seconds:.1f}s")
    print(report.score_table(results))
    print(f"results: {path}\nsamples: {out.samples}")


def infer_main(argv: list[str] | None = None) -> int:
    return _run("infer", _infer, argv)


def eval_main(argv: list[str] | None = None) -> int:
    return _run("eval", _eval, argv)
