"""ADM-evaluator ``.npz`` files: sample batches (``arr_0``) and reference statistics (``mu``/``sigma``).

The ADM evaluator (``evaluations/evaluator.py`` in guided-diffusion, copied by LlamaGen) reads

* a **sample batch**: ``arr_0`` = uint8 ``[N, H, W, 3]`` images, and
* a **reference batch**: ``arr_0`` reference images (for precision/recall) and, optionally,
  precomputed ``mu``/``sigma`` (FID) with ``mu_s``/``sigma_s`` (sFID). When ``mu`` exists the
  evaluator also requires ``mu_s``/``sigma_s``.

argen's own statistics files use the same ``mu``/``sigma`` keys (float64; readable by
pytorch-fid and clean-fid style code) plus ``argen_meta``, a JSON string recording the
extractor that produced them, and optionally ``feats`` / ``probs`` (float32) for
precision-recall and the reference IS. Everything is written atomically (temporary file +
``os.replace``) and read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from argen.atomic import SIGNATURE, atomic_write
from argen.errors import ArgenError

__all__ = ["write_sample_npz", "read_sample_npz", "write_stats_npz", "read_stats_npz", "META_KEY"]

META_KEY = "argen_meta"


def _atomic_savez(path, arrays: dict) -> Path:
    path = Path(path)
    if path.suffix != ".npz":
        raise ArgenError(f"npz output must end in .npz, got {str(path)!r}")
    from argen import __version__

    comment = f"{SIGNATURE} {__version__}".encode()

    def write(handle):
        np.savez(handle, **arrays)
        # Sign the file as argen's in the zip comment (the arrays stay exactly what ADM's evaluator
        # reads): zipfile ends the archive with a 22-byte record whose last 2 bytes are the comment length.
        handle.seek(-2, os.SEEK_END)
        handle.write(struct.pack("<H", len(comment)) + comment)

    return atomic_write(path, write)


def is_argen_npz(path) -> bool:
    """True for an .npz argen wrote (its zip comment carries argen's signature)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.comment.startswith(SIGNATURE.encode() + b" ")
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def check_npz_output(path, flag: str) -> Path:
    """An .npz output checked before the work: right suffix, not a folder, a writable place, and
    if it exists, written by argen (else it is the user's and is not overwritten)."""
    from argen.atomic import _check_parent

    path = Path(path).expanduser()
    if path.suffix.lower() != ".npz":
        raise ArgenError(f"{flag} must end in .npz, got {str(path)!r}")
    if path.is_dir():
        raise ArgenError(f"{flag} {str(path)!r} is a folder; give a file name")
    if path.exists() and not is_argen_npz(path):
        raise ArgenError(f"{flag} {str(path)!r} exists and was not written by argen; move it away or choose another name")
    _check_parent(path, flag)
    return path


def _open(path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArgenError(f"npz file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ArgenError(f"{path} is not a readable .npz file ({first[:160]})") from None


def _get(data, key: str, path) -> np.ndarray:
    try:
        return data[key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ArgenError(f"{path}: cannot read {key!r} ({first[:160]})") from None


def write_sample_npz(path, images: Any, rgb: bool = True) -> Path:
    """Write an ADM sample batch: ``arr_0`` uint8 ``[N, H, W, 3]`` (grayscale is replicated to RGB
    when ``rgb``, as the evaluator's Inception graph expects three channels)."""
    from .features import as_uint8_images

    arr = as_uint8_images(images)
    if rgb and arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return _atomic_savez(path, {"arr_0": np.ascontiguousarray(arr)})


def read_sample_npz(path) -> np.ndarray:
    """``arr_0`` of an ADM sample (or reference) batch as uint8 ``[N, H, W, C]``."""
    with _open(path) as data:
        if "arr_0" not in data.files:
            raise ArgenError(f"{path} has no 'arr_0' image array (keys: {', '.join(data.files) or 'none'}); "
                             "an ADM sample batch stores uint8 [N, H, W, 3] images as arr_0")
        arr = _get(data, "arr_0", path)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] not in (1, 3)):
        raise ArgenError(f"{path}: arr_0 must be uint8 [N, H, W, 3] (or [N, H, W, 1]), got {arr.dtype} {tuple(arr.shape)}")
    return arr[..., None] if arr.ndim == 3 else arr


def write_stats_npz(path, mu, sigma, meta: Optional[dict] = None, feats=None, probs=None, images=None,
                    spatial: Optional[tuple] = None) -> Path:
    """Write reference statistics: ``mu`` [D], ``sigma`` [D, D] (float64), ``argen_meta`` (JSON).

    ``feats``/``probs`` (stored float32) keep the reference features for precision-recall and
    the reference IS. ``images`` adds ``arr_0`` (uint8, RGB) so the file is also an ADM
    reference batch; ``spatial=(mu_s, sigma_s)`` adds the sFID keys. Without ``spatial`` an
    ADM reference batch cannot carry ``mu`` (the evaluator would then look for ``mu_s``), so
    with ``images`` and no ``spatial`` only ``arr_0`` is written and the evaluator computes
    its own statistics from the images.
    """
    arrays = {}
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ArgenError(f"stats shapes do not match: mu {tuple(mu.shape)}, sigma {tuple(sigma.shape)}")
    if images is None or spatial is not None:
        arrays["mu"], arrays["sigma"] = mu, sigma
    if spatial is not None:
        arrays["mu_s"], arrays["sigma_s"] = (np.asarray(a, dtype=np.float64) for a in spatial)
    if images is not None:
        from .features import as_uint8_images

        arr = as_uint8_images(images)
        arrays["arr_0"] = np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr
    if meta is not None:
        arrays[META_KEY] = np.array(json.dumps(meta, sort_keys=True))
    if feats is not None:
        arrays["feats"] = np.asarray(feats, dtype=np.float32)
    if probs is not None:
        arrays["probs"] = np.asarray(probs, dtype=np.float32)
    return _atomic_savez(path, arrays)


def read_stats_npz(path, load_images: bool = False) -> dict:
    """Read ``mu``/``sigma`` (and, when present, ``argen_meta``, ``feats``, ``probs``, ``arr_0``).

    Returns a dict with ``mu``, ``sigma`` (float64), ``meta`` (dict or None: None for foreign
    files such as ADM's VIRTUAL_imagenet256_labeled.npz), ``feats``, ``probs``, ``images``
    (None when absent or not asked for with ``load_images``) and ``has_images``. A file with
    only ``arr_0`` returns ``mu``/``sigma`` None: the caller must compute statistics from the
    images.
    """
    with _open(path) as data:
        keys = set(data.files)
        out = {"mu": None, "sigma": None, "meta": None, "feats": None, "probs": None, "images": None,
               "has_images": "arr_0" in keys}
        if "mu" in keys or "sigma" in keys:
            if not {"mu", "sigma"} <= keys:
                raise ArgenError(f"{path} has only one of 'mu'/'sigma'")
            mu = np.asarray(_get(data, "mu", path), dtype=np.float64)
            sigma = np.asarray(_get(data, "sigma", path), dtype=np.float64)
            if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
                raise ArgenError(f"{path}: mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} are not [D] and [D, D]")
            if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
                raise ArgenError(f"{path}: mu/sigma contain NaN or infinite values")
            out["mu"], out["sigma"] = mu, sigma
        elif "arr_0" not in keys:
            raise ArgenError(f"{path} holds neither statistics (mu, sigma) nor reference images (arr_0); "
                             f"keys: {', '.join(sorted(keys)) or 'none'}")
        if META_KEY in keys:
            try:
                out["meta"] = json.loads(str(_get(data, META_KEY, path)))
            except json.JSONDecodeError:
                raise ArgenError(f"{path}: {META_KEY} is not valid JSON") from None
        for key in ("feats", "probs"):
            if key in keys:
                out[key] = np.asarray(_get(data, key, path), dtype=np.float64)
    if load_images and "arr_0" in keys:
        out["images"] = read_sample_npz(path)
    return out
