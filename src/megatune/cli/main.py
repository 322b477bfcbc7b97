"""`megatune <verb> [flags]` — one word changed from `swift <verb> [flags]`.

Each verb lives in the package that owns it; this module only dispatches, importing lazily so that
`megatune export` never pays for importing megatron-core and `megatune eval` never needs it installed.
"""

from __future__ import annotations

import importlib
import sys

# verb -> (module, function, distribution to install when the module is missing)
VERBS = {
    "export": ("megatune.convert.cli", "main", "megatune-convert"),
    "sft": ("megatune.train.cli", "main", "megatune-train"),
    "infer": ("megatune.evaluate.cli", "infer_main", "megatune-evaluate"),
    "eval": ("megatune.evaluate.cli", "eval_main", "megatune-evaluate"),
    "demo": ("megatune.cli.demo", "main", "megatune"),
}

USAGE = "usage: megatune {" + ",".join(VERBS) + "} [flags]   (megatune <verb> --help for the flags)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"megatune: unknown command {verb!r}; expected one of {', '.join(VERBS)}", file=sys.stderr)
        return 2
    module_name, func_name, dist = VERBS[verb]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"megatune {verb}: {dist} is not installed; run `pip install {dist}`", file=sys.stderr)
            return 2
        raise
    return int(getattr(module, func_name)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
