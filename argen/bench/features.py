"""Feature-extraction throughput: images per second of an `argen.eval` extractor on real images.

FID at scale is sampling plus feature extraction; this measures the second part on Fashion-MNIST
test images, after a warm-up batch, as the median of several timed passes.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ..eval.features import get_extractor, write_random_inception_weights


def bench_features(extractor: str = "fmnist", num_images: int = 1000, batch_size: int = 0, rounds: int = 3,
                   protocol=None, inception_weights=None, random_weights: bool = False, images=None) -> dict:
    """Returns {extractor, protocol, batch_size, num_images, images_per_second, seconds_rounds}."""
    if images is None:
        from ..data.fashion_mnist import load_fashion_mnist

        images = load_fashion_mnist("test")[0][:num_images].numpy()
    images = np.asarray(images)[:num_images]
    with tempfile.TemporaryDirectory() as scratch:
        if extractor == "inception" and random_weights:
            # same architecture and file format as the real weights, so the same speed
            inception_weights = write_random_inception_weights(Path(scratch) / "random-inception.pth")
        ext = get_extractor(extractor, protocol=protocol, inception_weights=inception_weights)
        bs = batch_size or ext.batch_size
        ext.extract(images[:bs], bs)  # warm-up
        seconds = []
        for _ in range(rounds):
            start = time.perf_counter()
            ext.extract(images, bs)
            seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {"extractor": ext.name, "protocol": ext.protocol, "batch_size": bs, "num_images": len(images),
            "images_per_second": len(images) / median, "seconds_rounds": seconds,
            "random_weights": bool(extractor == "inception" and random_weights)}
