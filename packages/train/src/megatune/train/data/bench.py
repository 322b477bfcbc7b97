"""Tokenisation throughput of the data pipeline: `python -m megatune.train.data.bench FILE [--num_proc 1 2] [--rows N]`.

Uses the tiny test tokenizer (megatune.convert.testing) unless --tokenizer names an HF tokenizer dir, and a fresh
cache dir per run so the fingerprint cache cannot hide the work.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file")
    parser.add_argument("--num_proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, default=None, help="`#N` sampling: repeat the file up to N rows")
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--tokenizer", default=None)
    args = parser.parse_args(argv)
    logging.getLogger("datasets").setLevel(logging.ERROR)
    import datasets

    datasets.disable_progress_bars()
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from megatune.convert.testing import build_tokenizer

        tok = build_tokenizer()
    from . import DataConfig, build_datasets

    spec = args.file + (f"#{args.rows}" if args.rows else "")
    for num_proc in args.num_proc:
        with tempfile.TemporaryDirectory() as cache:
            cfg = DataConfig(dataset=[spec], max_length=args.max_length, num_proc=num_proc, cache_dir=cache)
            t0 = time.perf_counter()
            _, _, stats = build_datasets(cfg, tok)
            total = time.perf_counter() - t0
        rows = stats["rows"] + stats["val_rows"] + stats["dropped"]
        print(
            f"{spec} num_proc={num_proc}: tokenise {stats['rows_per_s']:.0f} rows/s, end to end "
            f"{rows / total:.0f} rows/s ({rows} rows, {stats['tokens']} tokens, {total:.2f} s)"
        )


if __name__ == "__main__":
    main()
