"""Refiners: an optional stage that maps generator tokens to tokenizer codes (`Refiner`)."""

from .base import Refiner

__all__ = ["Refiner"]
