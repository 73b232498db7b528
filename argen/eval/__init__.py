"""Evaluation: FID / IS / precision-recall from feature matrices, and the Fashion-MNIST
feature network.

The metric functions need only numpy. ``FMNISTClassifier`` pulls in torch and diffusers
(several seconds of import time), so it is imported on first access instead of here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .metrics import feature_statistics, frechet_distance, inception_score, precision_recall

if TYPE_CHECKING:
    from .fmnist_classifier import FMNISTClassifier

__all__ = ["frechet_distance", "inception_score", "precision_recall", "feature_statistics", "FMNISTClassifier"]


def __getattr__(name: str) -> Any:
    # PEP 562 lazy attribute: `from argen.eval import FMNISTClassifier` works as usual.
    if name == "FMNISTClassifier":
        from .fmnist_classifier import FMNISTClassifier

        return FMNISTClassifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
