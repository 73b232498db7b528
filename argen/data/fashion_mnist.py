"""Fashion-MNIST read straight from Debian's ``dataset-fashion-mnist`` package.

The package ships the four original IDX files, gzip-compressed, under
``/usr/share/datasets/fashion-mnist``. Reading them with gzip + numpy avoids a torchvision
download step (there is no internet on the training machines) and lets every malformed
file be reported as a one-line :class:`~argen.errors.DatasetError` instead of a numpy
traceback deep inside a data loader.
"""

from __future__ import annotations

import functools
import gzip
import os
import random
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from argen.data import captions
from argen.data.classes import CLASS_NAMES, resolve_class  # noqa: F401  (re-exported; pure Python)
from argen.errors import ArgenError, DatasetError


ENV_VAR = "ARGEN_FASHION_MNIST_DIR"
DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "install it with `apt-get install -y dataset-fashion-mnist`"

IMAGE_SIZE = 28
IMAGES_MAGIC = 2051  # IDX: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # IDX: unsigned bytes, 1 dimension

# File prefix per split, as in the original release (and the Debian package).
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}



def default_root() -> Path:
    """Where the IDX files live: ``$ARGEN_FASHION_MNIST_DIR`` if set, else the Debian path."""
    return Path(os.environ.get(ENV_VAR) or DEBIAN_ROOT)


def _split_files(split: str, root: Path) -> tuple[Path, Path]:
    if split not in _SPLIT_PREFIX:
        raise DatasetError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    prefix = _SPLIT_PREFIX[split]
    return root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"


def _read_gzip(path: Path) -> bytes:
    """Decompress one file, turning every way it can be missing or broken into DatasetError."""
    if not path.parent.is_dir():
        raise DatasetError(f"Fashion-MNIST not found: no directory {path.parent}; {INSTALL_HINT} or set {ENV_VAR}")
    if not path.is_file():
        raise DatasetError(f"Fashion-MNIST file missing: {path}; {INSTALL_HINT} or set {ENV_VAR}")
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DatasetError(f"{path} is not a readable gzip file ({reason}); reinstall with "
                           "`apt-get install --reinstall -y dataset-fashion-mnist`") from None


def _parse_idx(data: bytes, path: Path, magic: int, ndim: int) -> np.ndarray:
    """Check the IDX header (magic, dims) and payload length, and return a uint8 array."""
    header_len = 4 * (1 + ndim)
    if len(data) < header_len:
        raise DatasetError(f"{path} is truncated: {len(data)} bytes, shorter than its IDX header")
    header = np.frombuffer(data[:header_len], dtype=">u4")
    if int(header[0]) != magic:
        raise DatasetError(f"{path} has IDX magic number {int(header[0])}, expected {magic}; wrong or corrupt file")
    shape = tuple(int(d) for d in header[1:])
    expected = int(np.prod(shape))
    payload = len(data) - header_len
    if payload != expected:
        kind = "truncated" if payload < expected else "too long"
        raise DatasetError(f"{path} is {kind}: header says {shape} ({expected} bytes) but has {payload} bytes")
    array = np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)
    array.setflags(write=False)
    return array


@functools.lru_cache(maxsize=4)
def _load_arrays(split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one split once per process; several components (training, FID reference
    statistics, tests) load the same 47 MB of pixels."""
    images_path, labels_path = _split_files(split, Path(root))
    images = _parse_idx(_read_gzip(images_path), images_path, IMAGES_MAGIC, ndim=3)
    labels = _parse_idx(_read_gzip(labels_path), labels_path, LABELS_MAGIC, ndim=1)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DatasetError(f"{images_path} holds {images.shape[1]}x{images.shape[2]} images, expected 28x28")
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise DatasetError(f"{labels_path} contains label {int(labels.max())}; Fashion-MNIST labels are 0-9")
    return images, labels


def load_fashion_mnist(split: str, root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images uint8 [N, 28, 28], labels int64 [N])`` for "train" (60000) or "test" (10000).

    The arrays are decoded once per (split, root) and cached; each call returns fresh
    tensors so a caller modifying them in place cannot corrupt the cache. Headers, payload
    sizes and image/label counts are verified; the official split sizes are not enforced,
    so a small directory of IDX files (e.g. a test fixture via ``root``) also loads.
    """
    root_path = Path(root) if root is not None else default_root()
    images, labels = _load_arrays(split, str(root_path.expanduser().absolute()))
    return torch.tensor(images, dtype=torch.uint8), torch.tensor(labels, dtype=torch.int64)


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels to floats in [-1, 1] (0 -> -1, the background)."""
    return images_uint8.float() / 127.5 - 1.0


def pad_image(image: torch.Tensor, pad_to: int | None) -> torch.Tensor:
    """Pad a [C, 28, 28] image in [-1, 1] symmetrically to ``pad_to`` with background (-1).

    Tokenizers downsample by powers of two, so 28 is awkward and 32 is the usual target.
    An odd amount of padding puts the extra pixel at the bottom/right.
    """
    if pad_to is None or pad_to == image.shape[-1]:
        return image
    extra = pad_to - image.shape[-1]
    before = extra // 2
    after = extra - before
    return F.pad(image, (before, after, before, after), value=-1.0)


class FashionMNIST(Dataset):
    """Fashion-MNIST items as dicts: ``image`` [1, S, S] in [-1, 1], ``label`` and maybe ``caption``.

    Captions are drawn from ``random.Random`` seeded by (seed, index), so the same item
    always gets the same caption for a given seed, independent of worker or epoch order.
    """

    class_names = CLASS_NAMES

    def __init__(self, split: str = "train", root=None, pad_to: int | None = 32, captions: bool = False, seed: int = 0):
        if pad_to is not None and pad_to < IMAGE_SIZE:
            raise ArgenError(f"pad_to must be None or at least {IMAGE_SIZE}, got {pad_to}")
        self.split = split
        self.pad_to = pad_to
        self.captions = captions
        self.seed = seed
        self.images, self.labels = load_fashion_mnist(split, root)

    def __len__(self) -> int:
        return len(self.labels)

    def caption(self, index: int) -> str:
        """The deterministic training caption of item ``index`` for this dataset's seed."""
        rng = random.Random(f"fashion-mnist:{self.seed}:{index}")
        return captions.train_caption(int(self.labels[index]), self.images[index].numpy(), rng)

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        image = pad_image(to_model_range(self.images[index]).unsqueeze(0), self.pad_to)
        item = {"image": image, "label": int(self.labels[index])}
        if self.captions:
            item["caption"] = self.caption(index)
        return item
