"""megatune.convert — Hugging Face <-> Megatron-Core checkpoint conversion (torch + safetensors only).

Python API: `megatune.convert.api` (one rank in memory), `megatune.convert.convert` (whole directories, streamed),
`megatune.convert.arch` (architecture tables, `megatron_model_args`), `megatune.convert.layout` (pure functions).
"""

from megatune.convert.errors import ConvertError

__version__ = "0.1.0"
__all__ = ["ConvertError", "__version__"]
