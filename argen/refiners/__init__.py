"""Refiners: an optional stage that maps generator tokens to tokenizer codes (`Refiner`)."""

from .base import Refiner
from .ctf import CTFRefiner, coarse_labels

__all__ = ["Refiner", "CTFRefiner", "coarse_labels"]
