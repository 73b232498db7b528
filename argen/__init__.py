"""argen: fast autoregressive image generation."""

__version__ = "0.1.0"
