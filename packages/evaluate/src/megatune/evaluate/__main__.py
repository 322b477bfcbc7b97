"""`python -m megatune.evaluate {infer,eval} [flags]`: the same as `megatune infer/eval`, for when only this
package is installed (the `megatune` command lives in the root distribution)."""

from __future__ import annotations

import sys

from megatune.argmap.errors import EXIT_USAGE, leave
from megatune.evaluate.cli import eval_main, infer_main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbs = {"infer": infer_main, "eval": eval_main}
    if not argv or argv[0] not in verbs:
        print("usage: python -m megatune.evaluate {infer,eval} [flags]   (--help after the verb lists them)",
              file=sys.stderr)
        return EXIT_USAGE
    return verbs[argv[0]](argv[1:])


if __name__ == "__main__":
    leave(main())
