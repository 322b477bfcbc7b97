"""Fixtures the train tests share."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """The tiny random Qwen2 HF dir (make_tiny_model, seed 0), one per test module."""
    from megatune.convert.testing import make_tiny_model

    return make_tiny_model("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2", seed=0)
