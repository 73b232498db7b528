"""Where models live: shipped names (`default-c2i`, ...) or directories written by `save_pretrained`.

Nothing is ever downloaded: a name resolves to a folder inside the installed package.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ArgenError

ASSETS = Path(__file__).resolve().parent / "assets"

# name -> folder under argen/assets
SHIPPED_MODELS = {
    "default-vq": "default-vq",
    "default-c2i": "default-c2i",
    "default-t2i": "default-t2i",
    "fmnist-classifier": "fmnist-classifier",
}


def resolve_model_dir(name_or_path) -> Path:
    """Turn a shipped model name or a directory into an existing directory, or fail in one line."""
    text = os.fspath(name_or_path)
    if text in SHIPPED_MODELS:
        path = ASSETS / SHIPPED_MODELS[text]
        if not path.is_dir():
            raise ArgenError(f"shipped model {text!r} is missing from this install (expected {path})")
        return path
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    names = ", ".join(SHIPPED_MODELS)
    raise ArgenError(f"no model directory {text!r} (give a folder written by save_pretrained, or one of: {names})")
