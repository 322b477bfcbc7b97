from __future__ import annotations

import pytest
from megatune.convert.testing import TINY_ARCHS, make_tiny_model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """arch -> HF dir of a tiny fp32 model, built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(arch, root / arch, seed=0) for arch in TINY_ARCHS}
