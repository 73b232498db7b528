"""A small Fashion-MNIST CNN used as the feature network for offline evaluation.

ImageNet Inception is the wrong tool for 28x28 grayscale clothes (and its weights cannot be
downloaded on our machines), so generators trained on Fashion-MNIST are scored with a
classifier trained on that dataset:

* FID on :meth:`FMNISTClassifier.features` (the 128-d penultimate layer),
* IS on :meth:`FMNISTClassifier.probs` (softmax over the 10 classes, so IS <= 10),
* class accuracy of class-conditional samples from :meth:`FMNISTClassifier.forward`.

The trained weights ship in ``argen/assets/fmnist-classifier/`` (written by
``scripts/train_fmnist_classifier.py``, see its ``MODEL_CARD.md``) and load with
``FMNISTClassifier.from_pretrained(path)``; :func:`load_fmnist_classifier` does that for
the shipped copy.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from argen.errors import ArgenError, CheckpointError

__all__ = ["FMNISTClassifier", "ASSET_DIR", "load_fmnist_classifier"]

#: Where the trained classifier ships inside the package.
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "fmnist-classifier"

#: Native resolution of Fashion-MNIST.
IMAGE_SIZE = 28
#: Resolution of the padded images the generators produce (28 + 2 background pixels per side).
PADDED_SIZE = 32


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv -> BatchNorm -> ReLU -> 2x2 max-pool (halves the resolution, rounding down)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),  # bias is redundant before BN
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FMNISTClassifier(ModelMixin, ConfigMixin):
    """Three conv blocks (28 -> 14 -> 7 -> 3) and two linear layers.

    ``features(x)`` is the output of the first linear layer after BatchNorm and ReLU, i.e.
    the input of the final classifier; ``forward(x)`` returns logits ``[B, num_classes]``.

    Input: float images ``[B, 1, H, W]`` in ``[-1, 1]`` (background -1), with H = W = 28
    (Fashion-MNIST itself) or 32 (what argen's generators produce: the 28x28 image padded by
    2 background pixels per side, see ``argen.data.fashion_mnist.pad_image``). 32x32 input
    is center-cropped to 28x28, which exactly undoes that padding, so real and generated
    images go through the same pixels-to-features path. Other sizes raise ``ArgenError``:
    resizing would silently change the features FID is computed on.

    The layers were sized for the CPU training budget (about 7.6 M multiply-adds per image)
    and ~1 MB of float32 weights; the shipped checkpoint's accuracy is in its model card.
    """

    @register_to_config
    def __init__(
        self,
        channels: tuple[int, int, int] = (32, 64, 128),
        feature_dim: int = 128,
        num_classes: int = 10,
        dropout: float = 0.1,
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)  # config.json stores a list
        if len(channels) != 3:
            raise ArgenError(f"channels must list 3 widths, got {channels}")
        self.blocks = nn.Sequential(
            _conv_block(1, channels[0]),
            _conv_block(channels[0], channels[1]),
            _conv_block(channels[1], channels[2]),
        )
        spatial = IMAGE_SIZE // 2 // 2 // 2  # 3: the last pool floors 7 to 3, ignoring the bottom/right edge row and column
        self.embed = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels[2] * spatial * spatial, feature_dim, bias=False),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(inplace=True),
        )
        self.drop = nn.Dropout(dropout)  # not `self.dropout`: diffusers resolves config names first
        self.head = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """Check the input and bring it to 28x28 (center-crop 32x32 padded images)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 1:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ArgenError(f"FMNISTClassifier expects images [B, 1, H, W], got {shape}")
        if not x.is_floating_point():
            raise ArgenError(f"FMNISTClassifier expects float images in [-1, 1], got dtype {x.dtype} "
                             "(convert uint8 with argen.data.fashion_mnist.to_model_range)")
        size = tuple(x.shape[-2:])
        if size == (PADDED_SIZE, PADDED_SIZE):
            border = (PADDED_SIZE - IMAGE_SIZE) // 2
            x = x[:, :, border:border + IMAGE_SIZE, border:border + IMAGE_SIZE]
        elif size != (IMAGE_SIZE, IMAGE_SIZE):
            raise ArgenError(f"FMNISTClassifier takes 28x28 or 32x32 (padded) images, got {size[0]}x{size[1]}")
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, feature_dim]``, the representation FID is computed on."""
        x = self.prepare(x).to(device=self.device, dtype=self.dtype)
        return self.embed(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.head(self.drop(self.features(x)))

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[B, num_classes]`` (softmax of the logits), the input of IS."""
        return F.softmax(self.forward(x), dim=-1)


def load_fmnist_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> FMNISTClassifier:
    """Load a trained classifier (default: the one shipped with argen) in eval mode."""
    path = Path(path) if path is not None else ASSET_DIR
    if not (path / "config.json").is_file():
        raise CheckpointError(f"no Fashion-MNIST classifier at {path} (config.json missing); "
                         "train one with scripts/train_fmnist_classifier.py")
    model = FMNISTClassifier.from_pretrained(path, local_files_only=True)
    return model.to(device).eval()
