"""Generators behind one contract (`argen.models.base.Generator`)."""

from .base import Generator
from .cache import KVCache
from .gpt import GPT, GPTConfig
from .token_shuffle import TokenShuffleConfig, TokenShuffleGPT

__all__ = ["Generator", "GPT", "GPTConfig", "KVCache", "TokenShuffleConfig", "TokenShuffleGPT"]
