"""Users' own images: a folder with one sub-folder per class, or a JSONL of captions.

Items have the same dict shape as :class:`argen.data.FashionMNIST` (``image`` in [-1, 1],
plus ``label`` or ``caption``), so the training loop does not care where data came from.
Images are opened lazily (datasets can be large), but the file list and JSONL are checked
up front so a typo fails before training starts, with the file and line to fix.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from argen.data import captions as caption_lib
from argen.errors import ArgenError, DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_PIL_MODE = {1: "L", 3: "RGB"}


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _scan_class_folders(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """List (image path, class id) pairs; class ids follow the sorted sub-folder names."""
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_names:
        loose = [p for p in root.iterdir() if _is_image(p)]
        hint = " (images must be in one sub-folder per class, or listed in a .jsonl)" if loose else ""
        raise DatasetError(f"{root} has no class sub-folders{hint}")
    samples = []
    for label, name in enumerate(class_names):
        files = sorted(p for p in (root / name).rglob("*") if _is_image(p))
        if not files:
            raise DatasetError(f"class folder {root / name} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
        samples.extend((path, label) for path in files)
    return class_names, samples


def _parse_jsonl_line(line: str, where: str, base: Path) -> tuple[Path, str]:
    """Validate one JSONL record and return (absolute image path, caption)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: invalid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected an object like {{\"image\": ..., \"caption\": ...}}")
    for key in ("image", "caption"):
        if key not in record:
            raise DatasetError(f"{where}: missing key {key!r}")
        if not isinstance(record[key], str) or not record[key].strip():
            raise DatasetError(f"{where}: {key!r} must be a non-empty string")
    path = base / record["image"]  # an absolute "image" path replaces base
    if not path.is_file():
        raise DatasetError(f"{where}: image file not found: {path}")
    return path, record["caption"]


def _read_jsonl(path: Path) -> list[tuple[Path, str]]:
    samples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                samples.append(_parse_jsonl_line(line, f"{path} line {number}", path.parent))
    if not samples:
        raise DatasetError(f"{path} lists no images")
    return samples


def load_image(path: Path, image_size: int, channels: int) -> torch.Tensor:
    """Open, centre-crop to a square, resize and map to a [C, S, S] float tensor in [-1, 1].

    Cropping instead of squashing keeps object proportions, which matter more to a small
    generator than the few border pixels lost.
    """
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert(_PIL_MODE[channels])
            img = ImageOps.fit(img, (image_size, image_size), method=Image.Resampling.BICUBIC)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    array = np.asarray(img, dtype=np.float32).reshape(image_size, image_size, channels)
    return torch.from_numpy(array.transpose(2, 0, 1).copy()) / 127.5 - 1.0


class ImageFolderDataset(Dataset):
    """Images from ``root``: a directory of class sub-folders or a ``.jsonl`` caption file.

    * Class folders: items are ``{"image", "label"}``; ids follow sorted folder names,
      available as ``class_names``. With ``captions=True`` items also get a ``caption``
      made from the folder name with the training templates (``_`` reads as a space),
      chosen deterministically from (seed, index).
    * JSONL: one ``{"image": path, "caption": text}`` per line, paths relative to the JSONL
      file's folder; items are ``{"image", "caption"}`` and ``class_names`` is empty.
    """

    def __init__(self, root, image_size: int, channels: int = 3, captions: bool = False, seed: int = 0):
        if channels not in _PIL_MODE:
            raise ArgenError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if image_size < 1:
            raise ArgenError(f"image_size must be positive, got {image_size}")
        self.root = Path(os.path.expanduser(root))
        self.image_size = image_size
        self.channels = channels
        self.captions = captions
        self.seed = seed
        self.class_names: list[str] = []
        self.labels: list[int] = []
        self.texts: list[str] = []
        self.paths: list[Path] = []
        if self.root.is_dir():
            self.class_names, samples = _scan_class_folders(self.root)
            self.paths = [p for p, _ in samples]
            self.labels = [label for _, label in samples]
        elif self.root.is_file() and self.root.suffix.lower() == ".jsonl":
            samples = _read_jsonl(self.root)
            self.paths = [p for p, _ in samples]
            self.texts = [text for _, text in samples]
        elif self.root.exists():
            raise DatasetError(f"{self.root} is neither a folder of class sub-folders nor a .jsonl file")
        else:
            raise DatasetError(f"dataset path does not exist: {self.root}")

    @property
    def is_captioned(self) -> bool:
        """True for the JSONL layout, where every item comes with its own caption."""
        return bool(self.texts)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        item = {"image": load_image(self.paths[index], self.image_size, self.channels)}
        if self.is_captioned:
            item["caption"] = self.texts[index]
            return item
        item["label"] = self.labels[index]
        if self.captions:
            rng = random.Random(f"image-folder:{self.seed}:{index}")
            item["caption"] = caption_lib.caption_for_name(self.class_names[item["label"]], rng)
        return item
