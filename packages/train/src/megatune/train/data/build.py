"""`build_datasets`: specs -> normalised rows -> train/val split -> tokenised `datasets.Dataset`s + stats.

The val split is taken from normalised rows, before tokenisation, so it does not move when max_length changes.
It is seeded like everything else and identical on every rank; each rank builds the same datasets (with a shared
cache_dir, later ranks hit the fingerprint cache of the first).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pyarrow.compute as pc

from .config import DataConfig, DataError, parse_spec
from .loading import load_spec
from .tokenize import BAD, NO_LOSS, OK, TOKEN_FEATURES, TOO_LONG, ChatTokenizer, check_vocabulary

logger = logging.getLogger(__name__)


def _load_many(specs: list[str], cfg: DataConfig):
    import datasets

    parts, bad = [], 0
    for raw in specs:
        ds, n_bad = load_spec(parse_spec(raw), cfg)
        parts.append(ds)
        bad += n_bad
    return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), bad


def split_val(n_rows: int, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): ceil(n * ratio) rows, at least 1 when ratio > 0 and n > 1, never all."""
    if ratio <= 0 or n_rows < 2:
        return np.arange(n_rows), np.arange(0)
    n_val = min(n_rows - 1, max(1, math.ceil(n_rows * ratio)))
    perm = np.random.default_rng([seed, 0x5A1]).permutation(n_rows)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def tokenize_dataset(ds, tokenizer, cfg: DataConfig, what: str = "train"):
    """Tokenise normalised rows; returns (dataset with input_ids/labels/length, counts by status)."""
    import datasets

    if len(ds) == 0:  # `map` over no rows would keep the input columns; callers rely on the output schema
        features = datasets.Features({k: v for k, v in TOKEN_FEATURES.items() if k not in ("status", "error")})
        return datasets.Dataset.from_dict({k: [] for k in features}, features=features), dict.fromkeys(
            (OK, TOO_LONG, NO_LOSS, BAD), 0
        )
    chat = ChatTokenizer(
        tokenizer, max_length=cfg.max_length, truncation_strategy=cfg.truncation_strategy, system=cfg.system
    )
    num_proc = cfg.num_proc if len(ds) >= 256 * cfg.num_proc and cfg.num_proc > 1 else None
    out = ds.map(
        chat,
        batched=True,
        batch_size=256,
        remove_columns=ds.column_names,
        features=TOKEN_FEATURES,
        num_proc=num_proc,
        new_fingerprint=chat.fingerprint(ds._fingerprint),
        desc=f"tokenise {what}",
    )
    status = out.data.column("status").to_numpy()
    counts = {s: int((status == s).sum()) for s in (OK, TOO_LONG, NO_LOSS, BAD)}
    if counts[BAD]:
        first = int(np.flatnonzero(status == BAD)[0])
        message = f"{what} row {first}: {out[first]['error']}"
        if not cfg.skip_bad_rows:
            raise DataError(f"{message} ({counts[BAD]} such rows). Fix the data or pass skip_bad_rows=True.")
        logger.warning("skipping %d %s rows the chat template cannot render; first: %s", counts[BAD], what, message)
    keep = np.flatnonzero(status == OK)
    if len(keep) < len(out):
        # Materialise the filter: later column reads (lengths, batches) then need no index indirection.
        out = out.select(keep).flatten_indices(num_proc=None)
    return out.remove_columns(["status", "error"]), counts


def build_datasets(cfg: DataConfig, tokenizer):
    """(train, val, stats). train/val have `input_ids`, `labels` (unshifted, -100 = no loss) and `length`."""
    if not cfg.dataset:
        raise DataError("no dataset given: pass at least one --dataset spec (a file path or a dataset name)")
    check_vocabulary(tokenizer)
    t0 = time.perf_counter()
    rows, bad_rows = _load_many(cfg.dataset, cfg)
    if cfg.val_dataset:
        train_rows = rows
        val_rows, val_bad = _load_many(cfg.val_dataset, cfg)
        bad_rows += val_bad
    else:
        tr, va = split_val(len(rows), cfg.dataset_test_ratio, cfg.seed)
        train_rows = rows.select(tr) if len(va) else rows
        val_rows = rows.select(va)
    t_load = time.perf_counter() - t0

    t1 = time.perf_counter()
    train, tcounts = tokenize_dataset(train_rows, tokenizer, cfg, "train")
    t_tok = time.perf_counter() - t1
    val, vcounts = tokenize_dataset(val_rows, tokenizer, cfg, "val")
    if len(train) == 0:
        raise DataError(
            f"no training rows left: {tcounts[TOO_LONG]} longer than max_length={cfg.max_length} "
            f"(truncation_strategy={cfg.truncation_strategy!r}), {tcounts[NO_LOSS]} without assistant tokens, "
            f"{bad_rows + tcounts[BAD]} bad. Raise max_length or use truncation_strategy='left'/'right'."
        )
    lengths = train.with_format("arrow")["length"]
    stats = {
        "rows": len(train),
        "val_rows": len(val),
        "dropped": tcounts[TOO_LONG] + tcounts[NO_LOSS] + vcounts[TOO_LONG] + vcounts[NO_LOSS],
        "too_long": tcounts[TOO_LONG] + vcounts[TOO_LONG],
        "no_loss": tcounts[NO_LOSS] + vcounts[NO_LOSS],
        "bad_rows": bad_rows + tcounts[BAD] + vcounts[BAD],
        "tokens": int(pc.sum(lengths).as_py() or 0),
        "max_row_tokens": int(pc.max(lengths).as_py() or 0),
        "rows_per_s": len(train_rows) / max(t_tok, 1e-9),
        "load_s": t_load,
        "tokenize_s": t_tok,
    }
    logger.info(
        "data: %d train rows (%d tokens), %d val rows; dropped %d (%d too long, %d without loss), %d bad rows "
        "skipped; tokenised %.0f rows/s",
        stats["rows"], stats["tokens"], stats["val_rows"], stats["dropped"], stats["too_long"], stats["no_loss"],
        stats["bad_rows"], stats["rows_per_s"],
    )
    return train, val, stats
