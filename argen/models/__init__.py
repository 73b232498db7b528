"""Generators behind one contract (`argen.models.base.Generator`)."""

from .base import Generator
from .cache import KVCache
from .gpt import GPT, GPTConfig

__all__ = ["Generator", "GPT", "GPTConfig", "KVCache"]
