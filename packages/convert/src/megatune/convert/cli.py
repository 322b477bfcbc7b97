"""`megatune export` (ms-swift's `swift export` flags): HF -> Megatron (--to_megatron true) and back (--to_hf true).

Bad input never produces a traceback: one line `megatune export: error: ...` on stderr and no output directory or
temporary left behind. Exit codes (as every megatune command): 2 usage error, 1 runtime failure, 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM); an interrupted or terminated export removes its temporary output.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from megatune.convert.errors import ConvertError, UsageError

PROG = "megatune export"


def str2bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def parse_size(v: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", v.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 5GB or 500MB, got {v!r}")
    unit = (m.group(2) or "B").replace("IB", "B")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[unit])


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + error (two lines); we want one line
        raise UsageError(message)

    def parse_args(self, args=None, namespace=None):  # unknown flags: exit 2 with the closest known name
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            flag = next((a for a in extra if a.startswith("-")), extra[0])
            if not flag.startswith("-"):
                raise UsageError(f"unexpected value {flag!r}; flags take one value each (--flag VALUE)")
            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            guess = difflib.get_close_matches(flag.split("=")[0], known, n=1, cutoff=0.6)
            raise UsageError(f"unknown flag {flag}; " + (f"did you mean {guess[0]}?" if guess else
                                                           "run `megatune export --help` to list the flags"))
        return parsed


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    b = dict(type=str2bool, nargs="?", const=True, default=False, metavar="true|false")
    p.add_argument("--to_megatron", **b)
    p.add_argument("--to_hf", **b)
    p.add_argument("--merge_lora", type=str2bool, nargs="?", const=True, default=True, metavar="true|false",
                   help="LoRA run: true = merged HF weights, false = a peft adapter dir (RUN/{model_type}-lora); "
                        "--model_id_or_path then names the base (moved base checkpoint / peft's base model)")
    p.add_argument("--model_type", help="e.g. qwen2-7b-instruct; with --model_id_or_path any name is recorded")
    p.add_argument("--model_id_or_path", help="HF model dir (or hub repo id, read from the local HF cache)")
    p.add_argument("--tp", "--tensor_model_parallel_size", dest="tp", type=int, default=1)
    p.add_argument("--pp", "--pipeline_model_parallel_size", dest="pp", type=int, default=1)
    p.add_argument("--ep", "--expert_model_parallel_size", dest="ep", type=int, default=1,
                   help="expert parallelism of an MoE model: its routed experts split over ep rank files")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: the HF weights' dtype")
    p.add_argument("--megatron_output_dir", help="default ./{model_type}-tp{tp}-pp{pp}")
    p.add_argument("--ckpt_dir", help="Megatron checkpoint dir (or training run dir) to export to HF")
    p.add_argument("--hf_output_dir", help="default CKPT_DIR/{model_type}-hf")
    p.add_argument("--overwrite", **b)
    p.add_argument("--naming", choices=["local", "te"], default="local",
                   help="megatron-core layer spec parameter names: local, or Transformer Engine (te)")
    p.add_argument("--make_vocab_size_divisible_by", type=int, default=128)
    p.add_argument("--ckpt_format", choices=["torch", "torch_dist"], default="torch",
                   help="Megatron checkpoint format of --to_megatron: torch (legacy rank files, streamed) or "
                        "torch_dist (megatron-core distributed checkpoint; needs megatune-train); --to_hf reads both")
    p.add_argument("--decoder_first_pipeline_num_layers", type=int, default=None)
    p.add_argument("--decoder_last_pipeline_num_layers", type=int, default=None)
    p.add_argument("--max_shard_size", type=parse_size, default=5 * 10**9, help="HF output shard size, e.g. 5GB")
    p.add_argument("--allow_nonfinite", **b, help="export tensors holding NaN/Inf instead of refusing them")
    p.add_argument("--progress", type=str2bool, nargs="?", const=True, default=None, metavar="true|false",
                   help="progress bar on stderr (default: when stderr is a terminal)")
    return p


def normalize_flags(argv: list[str]) -> list[str]:
    """--to-megatron -> --to_megatron (dash spelling accepted, as swift does)."""
    out = []
    for a in argv:
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            a = name.replace("-", "_").replace("__", "--", 1) + eq + value
        out.append(a)
    return out


def _run(args: argparse.Namespace) -> str:
    from megatune.convert import convert
    from megatune.convert.layout import stage_layers

    progress = sys.stderr.isatty() if args.progress is None else args.progress
    if args.to_megatron == args.to_hf:
        raise UsageError("give exactly one of --to_megatron true or --to_hf true")
    if args.tp < 1 or args.pp < 1 or args.ep < 1:
        raise UsageError(f"--tp, --pp and --ep must be >= 1, got tp={args.tp}, pp={args.pp}, ep={args.ep}")
    if args.make_vocab_size_divisible_by < 1:
        raise UsageError(f"--make_vocab_size_divisible_by must be >= 1, got {args.make_vocab_size_divisible_by}")
    if args.to_megatron:
        from megatune.convert.arch import shape_of
        from megatune.convert.hf_io import read_config
        from megatune.convert.registry import canonical_model_type, resolve_weights

        hf_dir = resolve_weights(args.model_type, args.model_id_or_path)
        model_type = canonical_model_type(args.model_type) if args.model_type else Path(hf_dir).name.lower()
        counts = None
        if args.decoder_first_pipeline_num_layers is not None or args.decoder_last_pipeline_num_layers is not None:
            layers = shape_of(read_config(hf_dir)).layers
            try:
                counts = stage_layers(layers, args.pp, args.decoder_first_pipeline_num_layers,
                                      args.decoder_last_pipeline_num_layers)
            except ValueError as e:  # name the flags: layout speaks of first/last stages only
                raise UsageError(f"--decoder_first_pipeline_num_layers/--decoder_last_pipeline_num_layers: {e}") from None
        ep = f"-ep{args.ep}" if args.ep > 1 else ""
        out = Path(args.megatron_output_dir or f"{model_type}-tp{args.tp}-pp{args.pp}{ep}")
        if args.ckpt_format == "torch_dist":
            from megatune.convert import torch_dist

            return str(torch_dist.hf_to_torch_dist(
                hf_dir, out, tp=args.tp, pp=args.pp, dtype=args.dtype, model_type=model_type, naming=args.naming,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, layers_per_stage=counts,
                ep=args.ep, overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite))
        return str(convert.hf_to_megatron(
            hf_dir, out, tp=args.tp, pp=args.pp, dtype=args.dtype, model_type=model_type, naming=args.naming,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, layers_per_stage=counts,
            overwrite=args.overwrite, progress=progress, allow_nonfinite=args.allow_nonfinite, ep=args.ep))
    if not args.ckpt_dir:
        raise UsageError("--to_hf true needs --ckpt_dir DIR (a Megatron checkpoint written by megatune)")
    if not Path(args.ckpt_dir).is_dir():
        raise ConvertError(f"--ckpt_dir {args.ckpt_dir}: no such directory")
    from megatune.convert import lora_export

    if lora_export.read_lora_meta(args.ckpt_dir)[1] is not None:
        return str(lora_export.export(args.ckpt_dir, args.hf_output_dir, merge=args.merge_lora,
                                      base=args.model_id_or_path, max_shard_size=args.max_shard_size,
                                      overwrite=args.overwrite))
    from megatune.convert import torch_dist

    if torch_dist.is_torch_dist(args.ckpt_dir):
        return str(torch_dist.torch_dist_to_hf(args.ckpt_dir, args.hf_output_dir, max_shard_size=args.max_shard_size,
                                               overwrite=args.overwrite))
    return str(convert.megatron_to_hf(args.ckpt_dir, args.hf_output_dir, max_shard_size=args.max_shard_size,
                                      overwrite=args.overwrite, progress=progress,
                                      allow_nonfinite=args.allow_nonfinite))


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the temporary output is removed on the way out (exit 143)."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    argv = normalize_flags(list(sys.argv[1:] if argv is None else argv))
    try:
        with _sigterm_raises():
            args = build_parser().parse_args(argv)
            start = time.perf_counter()
            out = _run(args)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except ConvertError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except OSError as e:  # permissions and the like: still one line
        print(f"{PROG}: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output written (temporary files removed)", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{PROG}: terminated; no output written (temporary files removed)", file=sys.stderr)
        return 143
    print(f"{PROG}: wrote {out} in {time.perf_counter() - start:.1f}s")
    if args.to_megatron:
        from megatune.convert.megatron_flags import output_lines

        print(*output_lines(out, PROG), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
