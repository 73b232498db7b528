"""Evaluation: FID / IS / precision-recall from feature matrices, feature extractors (the
Fashion-MNIST classifier, the 2015 TF-Inception), reference statistics, resumable
distributed sampling and the quality scores used by `argen eval` and `argen bench`.

The metric functions need only numpy and are imported eagerly. Everything that pulls in
torch, diffusers or accelerate is imported on first access (PEP 562), so
``from argen.eval import frechet_distance`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .metrics import feature_statistics, frechet_distance, inception_score, precision_recall

if TYPE_CHECKING:
    from .features import FeatureExtractor, FMNISTExtractor, InceptionExtractor, get_extractor
    from .fmnist_classifier import FMNISTClassifier
    from .npz import read_sample_npz, read_stats_npz, write_sample_npz, write_stats_npz
    from .quality import compute_metrics, evaluate_samples, quality_scorer
    from .reference import RefStats, real_data_floor, reference_stats
    from .sampling import generate_samples

# public name -> submodule that defines it
_LAZY = {
    "FMNISTClassifier": "fmnist_classifier",
    "FeatureExtractor": "features",
    "FMNISTExtractor": "features",
    "InceptionExtractor": "features",
    "get_extractor": "features",
    "read_sample_npz": "npz",
    "write_sample_npz": "npz",
    "read_stats_npz": "npz",
    "write_stats_npz": "npz",
    "RefStats": "reference",
    "reference_stats": "reference",
    "real_data_floor": "reference",
    "generate_samples": "sampling",
    "quality_scorer": "quality",
    "evaluate_samples": "quality",
    "compute_metrics": "quality",
}

__all__ = ["frechet_distance", "inception_score", "precision_recall", "feature_statistics", *_LAZY]


def __getattr__(name: str) -> Any:
    # PEP 562 lazy attribute: `from argen.eval import FMNISTClassifier` works as usual.
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
