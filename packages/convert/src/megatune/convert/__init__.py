"""megatune.convert — Hugging Face <-> Megatron-Core checkpoint conversion (torch + safetensors only)."""

__version__ = "0.1.0"
