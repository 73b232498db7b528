"""Datasets: Fashion-MNIST from the Debian package, users' image folders, and captions."""

from argen.data.captions import (
    ATTRIBUTES,
    HELDOUT_PROMPTS,
    all_train_captions,
    attribute_for,
    train_caption,
)
from argen.data.fashion_mnist import (
    CLASS_NAMES,
    FashionMNIST,
    default_root,
    load_fashion_mnist,
    resolve_class,
)
from argen.data.image_folder import ImageFolderDataset

__all__ = [
    "ATTRIBUTES",
    "CLASS_NAMES",
    "HELDOUT_PROMPTS",
    "FashionMNIST",
    "ImageFolderDataset",
    "all_train_captions",
    "attribute_for",
    "default_root",
    "load_fashion_mnist",
    "resolve_class",
    "train_caption",
]
