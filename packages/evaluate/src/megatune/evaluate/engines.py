"""Pick and build an engine by its --infer_backend name. Kept apart from engine.py (the interface), which the
engines themselves import: engine.py never imports an engine, so there is no import cycle."""

from __future__ import annotations

from pathlib import Path

from megatune.evaluate.engine import Engine
from megatune.evaluate.errors import UsageError

BACKENDS = ("pt", "vllm")
VLLM_MISSING = (
    "--infer_backend vllm needs vLLM, which is not installed; "
    "run `pip install 'megatune-evaluate[vllm]'` (a CUDA machine), or use --infer_backend pt, which works everywhere"
)


def load_engine(backend: str, model_dir: str | Path, **kwargs) -> Engine:
    """`pt` (transformers, any machine) or `vllm` (optional extra, CUDA). kwargs go to the engine's constructor."""
    if backend == "pt":
        from megatune.evaluate.pt_engine import PtEngine

        return PtEngine(model_dir, **kwargs)
    if backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise UsageError(VLLM_MISSING) from e
        from megatune.evaluate.vllm_engine import VllmEngine

        return VllmEngine(model_dir, **kwargs)
    raise UsageError(f"--infer_backend {backend!r} is not one of: {', '.join(BACKENDS)}")
