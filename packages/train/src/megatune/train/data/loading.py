"""Read each dataset spec into normalised `messages` rows: local files, hub datasets, built-in self-cognition.

Files are read with `datasets.load_dataset("json"/"csv"/"parquet")`. Rows are normalised before `#N` sampling so
an error can name the row's place in its file (a .jsonl line is row index + 1). Sampling draws from a generator
seeded by (seed, crc32(spec)), never from global state, so every rank and node selects the same rows.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from .config import DataConfig, DataError, DatasetSpec
from .files import TEXT_SUFFIXES, check_text_file, diagnose
from .formats import MESSAGE_FEATURES, normalize_batch
from .registry import load_hub

logger = logging.getLogger(__name__)

SELF_COGNITION_FILE = Path(__file__).with_name("self_cognition.jsonl")
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def row_place(spec: DatasetSpec, index: int) -> str:
    """Where row `index` (0-based) of a spec's source lives, in the words a user would search the file with."""
    if spec.kind != "file":
        return f"dataset {spec.raw!r} row {index}"
    suffix = Path(spec.name).suffix.lower()
    if suffix == ".jsonl":
        return f"{spec.name} line {index + 1}"
    if suffix == ".csv":
        return f"{spec.name} line {index + 2} (after the header)"
    if suffix == ".json":
        return f"{spec.name} row {index + 1} of the JSON array"
    return f"{spec.name} row {index + 1}"


def load_raw(spec: DatasetSpec, cfg: DataConfig):
    """One spec's rows exactly as stored (a `datasets.Dataset`)."""
    import datasets

    if spec.kind == "self-cognition":
        return self_cognition(cfg)
    if spec.kind == "hub":
        return load_hub(spec, cfg.cache_dir)
    path = Path(spec.name)
    if not path.is_file():
        raise DataError(f"dataset file {spec.name!r} does not exist (from spec {spec.raw!r})")
    builder = _BUILDERS[path.suffix.lower()]
    if path.suffix.lower() in TEXT_SUFFIXES:
        check_text_file(path)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cfg.cache_dir)
    except Exception as e:  # malformed JSON/CSV, mixed column types: say where, else which file and the cause
        where = diagnose(path) if path.suffix.lower() in TEXT_SUFFIXES else None
        if where:
            raise DataError(where) from None
        cause = _root_cause(e)
        raise DataError(f"dataset file {spec.name}: could not be read as {builder} "
                        f"({cause.__class__.__name__}: {' '.join(str(cause).split())})") from e


def _root_cause(e: BaseException) -> BaseException:
    """`datasets` wraps the reader's error in DatasetGenerationError("An error occurred ..."): the inner one says more."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    return e


def _name_pair(value, what: str) -> tuple[str, str]:
    """[中文, English] -> (zh, en); one value serves both languages."""
    if isinstance(value, str):
        value = [value]
    values = [v for v in (value or []) if v]
    if not values:
        raise DataError(
            f"the self-cognition dataset needs {what}: pass e.g. --{what} 小黄 'Xiao Huang' "
            "(first value for Chinese rows, second for English rows; one value serves both)"
        )
    if len(values) > 2:
        raise DataError(f"{what} takes one or two values ([Chinese, English]), got {len(values)}: {values}")
    return values[0], values[-1]


def self_cognition(cfg: DataConfig):
    """The packaged question/answer pairs with {{NAME}}/{{AUTHOR}} filled by language tag."""
    import datasets

    names = _name_pair(cfg.model_name, "model_name")
    authors = _name_pair(cfg.model_author, "model_author")
    ds = datasets.load_dataset("json", data_files=str(SELF_COGNITION_FILE), split="train", cache_dir=cfg.cache_dir)

    def fill(batch):
        out = {"query": [], "response": []}
        for q, r, tag in zip(batch["query"], batch["response"], batch["tag"]):
            lang = 0 if tag == "zh" else 1
            for key, text in (("query", q), ("response", r)):
                out[key].append(text.replace("{{NAME}}", names[lang]).replace("{{AUTHOR}}", authors[lang]))
        return out

    return ds.map(fill, batched=True, desc="self-cognition")


def sample_indices(n_rows: int, n: int, seed: int, key: str) -> np.ndarray:
    """`#N`: N <= rows draws N without replacement; N > rows repeats the data whole, then draws the remainder."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])
    if n <= n_rows:
        return np.sort(rng.permutation(n_rows)[:n])
    reps, rem = divmod(n, n_rows)
    return np.concatenate([np.tile(np.arange(n_rows), reps), np.sort(rng.permutation(n_rows)[:rem])])


def load_spec(spec: DatasetSpec, cfg: DataConfig):
    """(normalised rows with `messages`/`tools`, number of bad rows skipped). Bad rows raise unless skipped."""
    raw = load_raw(spec, cfg)
    if len(raw) == 0:
        raise DataError(f"dataset {spec.raw!r} has no rows")
    ds = raw.map(
        normalize_batch,
        batched=True,
        remove_columns=raw.column_names,
        features=MESSAGE_FEATURES,
        num_proc=cfg.num_proc if len(raw) >= 1000 * cfg.num_proc else None,
        desc=f"normalise {spec.raw}",
    )
    errors = ds.data.column("error")
    bad = np.flatnonzero(pc.not_equal(errors, "").to_numpy(zero_copy_only=False))
    if len(bad):
        first = int(bad[0])
        message = f"{row_place(spec, first)}: {ds[first]['error']}"
        if not cfg.skip_bad_rows:
            more = f" ({len(bad) - 1} more bad rows in this dataset)" if len(bad) > 1 else ""
            raise DataError(f"{message}{more}. Fix the data or pass skip_bad_rows=True to skip such rows.")
        logger.warning("skipping %d bad rows of %s; first: %s", len(bad), spec.raw, message)
        keep = np.setdiff1d(np.arange(len(ds)), bad)
        if len(keep) == 0:
            raise DataError(f"dataset {spec.raw!r}: every row is bad; first: {message}")
        ds = ds.select(keep)
    ds = ds.remove_columns("error")
    if spec.sample is not None:
        ds = ds.select(sample_indices(len(ds), spec.sample, cfg.seed, spec.raw))
    return ds, len(bad)
