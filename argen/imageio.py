"""Writing images atomically: a file appears complete or not at all."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from PIL import Image

from .atomic import atomic_directory_write, atomic_write
from .errors import ArgenError


def check_png_path(path) -> Path:
    """Validate an output path before any work is done, so a bad one costs nothing."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".png":
        raise ArgenError(f"output must be a .png file, got {str(path)!r}")
    if path.is_dir():
        raise ArgenError(f"output {str(path)!r} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ArgenError(f"output folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise ArgenError(f"output folder {str(parent)!r} is not writable")
    return path


def save_png_atomic(image: Image.Image, path) -> None:
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))


def make_grid(images: Sequence[Image.Image], columns: int = 0, scale: int = 1, pad: int = 2) -> Image.Image:
    """Tile equally sized images row by row (columns: 0 = as square as possible)."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    w, h = w * scale, h * scale
    grid = Image.new(images[0].mode, (columns * (w + pad) + pad, rows * (h + pad) + pad), color=255 if images[0].mode == "L" else (255, 255, 255))
    for i, image in enumerate(images):
        if scale != 1:
            image = image.resize((w, h), Image.NEAREST)
        grid.paste(image, (pad + (i % columns) * (w + pad), pad + (i // columns) * (h + pad)))
    return grid


def save_images_folder(images: Sequence[Image.Image], folder, names: Sequence[str]) -> None:
    """Write every image into `folder` (replaced as a whole, atomically)."""

    def write(tmp: Path):
        for image, name in zip(images, names):
            image.save(tmp / name, format="PNG")

    atomic_directory_write(Path(folder), write)
