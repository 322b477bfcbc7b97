"""Test support shared by every megatune package: tiny random HF models with a real tokenizer.

Hypothesis strategies for layout shapes live in `megatune.convert.testing.strategies` (imports hypothesis); the
reference paths and an in-memory Reader in `megatune.convert.testing.oracle`.
Needs the `testing` extra: `pip install megatune-convert[testing]`.
"""

from .signals import default_sigint
from .tiny import MOE_ARCHS, TINY_ARCHS, make_tiny_model, tiny_config
from .tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer

__all__ = ["TINY_ARCHS", "MOE_ARCHS", "make_tiny_model", "tiny_config", "build_tokenizer", "CHAT_TEMPLATE",
           "SPECIAL_TOKENS", "default_sigint"]
