"""Datasets: Fashion-MNIST from the Debian package, users' image folders, and captions.

Names are loaded on first use, so `argen.data.classes` and `argen.data.captions` (pure Python)
can be imported without torch (the command line checks `--class` before heavy imports).
"""

import importlib

_EXPORTS = {
    "ATTRIBUTES": "captions",
    "HELDOUT_PROMPTS": "captions",
    "all_train_captions": "captions",
    "attribute_for": "captions",
    "train_caption": "captions",
    "CLASS_NAMES": "classes",
    "resolve_class": "classes",
    "FashionMNIST": "fashion_mnist",
    "default_root": "fashion_mnist",
    "load_fashion_mnist": "fashion_mnist",
    "ImageFolderDataset": "image_folder",
}

__all__ = sorted(_EXPORTS, key=str.upper)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"argen.data.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'argen.data' has no attribute {name!r}")
