"""megatune.argmap — ms-swift SftArguments <-> Megatron-LM arguments (standard library only)."""

__version__ = "0.1.0"
