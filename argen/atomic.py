"""Atomic file writes: a file appears complete or not at all (temporary file in the same folder,
then `os.replace`), so a killed run never leaves a half-written output behind.
Folders: `argen.models.pretrained.atomic_directory_write`."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path, write: Callable[[BinaryIO], None]) -> Path:
    """Create `path` by calling write(binary file handle); the parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path, data, indent: int = 2, default=None) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent, default=default) + "\n")
