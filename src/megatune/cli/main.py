"""`megatune <verb> [flags]` — one word changed from `swift <verb> [flags]`.

Each verb lives in the package that owns it; this module only dispatches, importing lazily so that
`megatune export` never pays for importing megatron-core and `megatune eval` never needs it installed.

Exit codes, the same for every command (README "Exit codes"): 0 success, 2 usage error (bad command, flag or flag
value), 1 runtime failure (bad data or checkpoint, a missing package, a bug), 130 interrupted (Ctrl-C), 143
terminated (SIGTERM). The verbs return their own codes; a Ctrl-C or SIGTERM that reaches this level is turned into
130 / 143 with one line.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading

from megatune.argmap.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_USAGE, leave

# verb -> (module, function, distribution to install when the module is missing)
VERBS = {
    "export": ("megatune.convert.cli", "main", "megatune-convert"),
    "sft": ("megatune.train.cli", "main", "megatune-train"),
    "infer": ("megatune.evaluate.cli", "infer_main", "megatune-evaluate"),
    "eval": ("megatune.evaluate.cli", "eval_main", "megatune-evaluate"),
    "demo": ("megatune.cli.demo", "main", "megatune"),
}

USAGE = "usage: megatune {" + ",".join(VERBS) + "} [flags]   (megatune <verb> --help for the flags)"


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the command's `finally` blocks still run."""


def _terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return EXIT_OK if argv else EXIT_USAGE
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"megatune: unknown command {verb!r}; expected one of {', '.join(VERBS)}", file=sys.stderr)
        return EXIT_USAGE
    module_name, func_name, dist = VERBS[verb]
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                print(f"megatune {verb}: {dist} is not installed; run `pip install {dist}`", file=sys.stderr)
                return EXIT_FAILURE
            raise
        return int(getattr(module, func_name)(rest) or 0)
    except KeyboardInterrupt:
        print(f"megatune {verb}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"megatune {verb}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    """The `megatune` console script: main's code, a stopped command leaving without interpreter teardown (leave)."""
    leave(main())


if __name__ == "__main__":
    entry()
