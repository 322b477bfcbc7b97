"""megatune.evaluate — chat with and benchmark models (transformers or vLLM engines)."""

__version__ = "0.1.0"
