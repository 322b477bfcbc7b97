"""`megatune sft` — ms-swift's `swift sft --train_backend megatron` command line on megatron-core.

    megatune sft --resume_from_checkpoint qwen2-7b-instruct-tp2-pp1 --dataset self-cognition#500 \
                 --model_name 小黄 'Xiao Huang' --model_author 魔搭 ModelScope --max_length 2048 --output_dir output
    NPROC_PER_NODE=4 megatune sft ... --tp 2     # re-launches itself under torchrun (launch.py)

Flags are parsed (and rejected) before any process is spawned, so a typo costs one process, not N. Every
user-fixable problem ends as ONE line `megatune sft: error: ...` on rank 0. Exit codes (README "Exit codes", the
same for every command): 2 for a usage error (a bad flag or flag value, or flags that do not fit together:
ArgumentError, as argparse exits); 1 for a runtime failure (bad data: DataError, bad checkpoint: ConvertError, bad
parallel layout or run state: TrainError, or a bug, which keeps its traceback); 130 when interrupted (Ctrl-C); 143
when terminated (SIGTERM; under torchrun the launcher reports signals, see launch.py).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _user_errors() -> tuple[type[BaseException], ...]:
    from megatune.argmap import ArgumentError
    from megatune.convert.errors import ConvertError
    from megatune.train.data import DataError
    from megatune.train.errors import TrainError

    return (TrainError, ArgumentError, ConvertError, DataError)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that `finally` blocks (process groups, the logger) still run."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _fail(message: str, code: int = 1) -> int:
    if _rank() == 0:
        first = " ".join(str(message).split("\n")[0].split()) or "unknown error"
        print(f"megatune sft: error: {first}", file=sys.stderr, flush=True)
    return code


def _quiet_libraries() -> None:
    """megatron-core logs its config at INFO and warns about TE/apex on every import; users need neither."""
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*apex.*", category=UserWarning)
    # advice aimed at TE/CUDA setups (core_attn recompute, CUDA_DEVICE_MAX_CONNECTIONS, cuda graph scope)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core\..*")
    warnings.filterwarnings("ignore", message=r"barrier\(\): using the device under current context")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    if _rank() != 0:
        logging.getLogger("megatune").setLevel(logging.ERROR)


def run(argv: list[str], *, progress: bool = True) -> dict:
    """Parse, build and train in this process (already one rank of the job). Raises the user errors above."""
    from megatune.argmap import parse_sft_args
    from megatune.train import distributed, runtime, trainer

    sft = parse_sft_args(argv)
    try:
        t0 = time.time()
        run_state, info = runtime.build_run(sft, progress=progress)
        run_state.logger.message(
            f"megatune sft: {info['source_kind']} weights from {info['source']}; tp={info['tp']} pp={info['pp']} "
            f"dp={info['dp']}; {info['train_rows']} train / {info['val_rows']} val rows; global batch "
            f"{info['global_batch_size']}; iterations {info['start_iteration']}..{info['train_iters']}; "
            f"run dir {info['run_dir']}")
        try:
            result = trainer.train(run_state)
        finally:
            run_state.logger.close()
        run_state.logger.message(f"megatune sft: done in {time.time() - t0:.1f}s; checkpoint and logs in "
                                 f"{info['run_dir']}")
        from megatune.convert.ckpt_layout import MEGATRON_ARGS
        from megatune.convert.megatron_flags import output_lines

        if os.path.isfile(os.path.join(info["run_dir"], MEGATRON_ARGS)):  # a Megatron checkpoint was saved
            for line in output_lines(info["run_dir"], "megatune sft"):
                run_state.logger.message(line)
        return {**info, **result}
    finally:
        distributed.destroy()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from megatune.argmap import ArgumentError, parse_sft_args
    from megatune.argmap.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_USAGE
    from megatune.train import launch
    from megatune.train.plan import refuse_unsupported

    try:
        # validate before re-launching: a bad flag should fail once, before N processes start
        refuse_unsupported(parse_sft_args(argv))
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except ArgumentError as e:
        return _fail(str(e), EXIT_USAGE)
    if launch.should_relaunch():
        return launch.relaunch(argv)

    _quiet_libraries()
    previous = None
    if "LOCAL_RANK" not in os.environ and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)  # under torchrun the agent reports signals
    try:
        run(argv)
    except _user_errors() as e:
        return _fail(str(e), EXIT_USAGE if isinstance(e, ArgumentError) else EXIT_FAILURE)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except Terminated:
        return _fail("terminated (SIGTERM)", EXIT_TERMINATED)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return EXIT_OK


def rank_main(argv: list[str]) -> int:
    """One rank under torchrun: `main` bound to the agent's lifetime (launch.relaunch); a rank whose peer died exits
    quietly with launch.PEER_LOST_EXIT so that the agent's one line names the rank that died."""
    from megatune.train import launch

    if os.environ.get(launch.AGENT_PID):  # absent under a plain `torchrun -m megatune.train.cli`
        launch.die_with_parent(int(os.environ[launch.AGENT_PID]))
    try:
        return main(argv)
    except RuntimeError as e:  # gloo/NCCL errors (DistBackendError is one); not OSError such as a broken stdout
        if os.environ.get(launch.AGENT_PID) and launch.peer_lost(e):
            return launch.PEER_LOST_EXIT
        raise


if __name__ == "__main__":  # torchrun runs this module as each rank: LOCAL_RANK is set
    from megatune.argmap.errors import leave

    leave(rank_main(sys.argv[1:]) if "LOCAL_RANK" in os.environ else main())
