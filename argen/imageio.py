"""Writing images atomically: a file appears complete or not at all."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import __version__
from .atomic import SIGNATURE, atomic_directory_write, atomic_write, check_output_file


def check_png_path(path, flag: str = "--out") -> Path:
    """Validate a PNG output path before any work is done, so a bad one costs nothing: a .png
    name, not a folder, in a writable place, and not a file argen did not write."""
    return check_output_file(path, (".png",), flag)


def save_png_atomic(image: Image.Image, path) -> None:
    """Write a PNG atomically, signed as argen's (a text chunk `argen` = version), so a later run
    may replace it and nothing else."""
    info = PngInfo()
    info.add_text(SIGNATURE, __version__)
    atomic_write(path, lambda handle: image.save(handle, format="PNG", pnginfo=info))


def save_grey_figure(pixels, path, scale: int = 2) -> None:
    """A grey [H, W] tensor in [-1, 1] as a PNG with each pixel scale x scale, written atomically: the
    sample and reconstruction figures training leaves beside its exports."""
    img = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    save_png_atomic(Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST), path)


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


def save_images_folder(images: Sequence[Image.Image], folder, names: Sequence[str], kind: str = "images") -> None:
    """Write every image into `folder` (replaced as a whole, atomically, and only if argen wrote it)."""

    info = PngInfo()
    info.add_text(SIGNATURE, __version__)

    def write(tmp: Path):
        for image, name in zip(images, names):
            image.save(tmp / name, format="PNG", pnginfo=info)

    atomic_directory_write(Path(folder), write, kind=kind)
