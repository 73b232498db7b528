from .cache import KVCache
from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "KVCache"]
