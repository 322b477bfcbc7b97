"""megatune.train — supervised fine-tuning with Megatron-Core (TP/PP/DP), CPU mode for tests."""

__version__ = "0.1.0"
