"""Shared fixtures: the real benchmark data (skip when absent), tiny random models and a pt engine on them."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parents[3].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "mmlu").is_dir():
        pytest.skip(f"the shared benchmark data is not at {DATA} (see shared/data/README.md)")
    return DATA


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    # tests must never wait on the network: a missing file must fail fast, as offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("MEGATUNE_EVAL_DATA", raising=False)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from megatune.convert.testing import make_tiny_model

    return make_tiny_model("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2", seed=0, dtype="float32")


@pytest.fixture(scope="session")
def engine(tiny_dir):
    from megatune.evaluate.pt_engine import PtEngine

    # fp32 everywhere (the tests compare against plain forward passes); on a GPU machine this runs on the GPU
    return PtEngine(tiny_dir, dtype="float32", batch_size=8)
