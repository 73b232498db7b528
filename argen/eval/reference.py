"""Reference statistics (``mu``/``sigma`` + features) for FID, cached per extractor and dataset.

A reference is named by a spec string:

* ``fashion-mnist:test`` / ``fashion-mnist:train`` (also ``fmnist:...``): the Debian package's
  Fashion-MNIST split, 28x28 grayscale. With ``num`` the first ``num`` images of a
  class-balanced interleaving (image j has class j % 10) are used, so a subset has the
  same class mix as class-balanced samples.
* a folder of images (searched recursively; all must share one size and mode), or
* an ``.npz`` file: argen's own statistics file, an ADM reference batch (``mu``/``sigma``,
  e.g. VIRTUAL_imagenet256_labeled.npz) or any ``arr_0`` image batch.

Statistics computed here are cached under ``$ARGEN_CACHE/ref_stats`` (default
``~/.cache/argen/ref_stats``), in files named by extractor + protocol + weights hash +
dataset + N, and every file records the extractor identity that produced it: loading one
for a different extractor raises instead of producing a meaningless FID.

The "real-data floor" (:func:`real_data_floor`) is the FID of N *training* images against
the test statistics: what a perfect generator scores at the same N, since FID is biased
upwards for finite N.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from argen.errors import ArgenError

from .features import FeatureExtractor, _pil_to_array
from .metrics import feature_statistics, frechet_distance
from .npz import read_sample_npz, read_stats_npz, write_stats_npz

__all__ = ["RefStats", "cache_dir", "load_reference_images", "list_image_files", "read_image_files",
           "read_image_folder", "reference_stats",
           "real_data_floor", "parse_ref", "balanced_indices", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_FMNIST = re.compile(r"^(fashion-mnist|fashion_mnist|fmnist):(train|test)$")


def cache_dir() -> Path:
    """``$ARGEN_CACHE/ref_stats`` or ``~/.cache/argen/ref_stats``."""
    root = os.environ.get("ARGEN_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "argen"
    return base / "ref_stats"


@dataclass
class RefStats:
    """Reference statistics: ``mu`` [D], ``sigma`` [D, D] (float64) from ``n`` images.

    ``identity`` is the extractor identity recorded with them (None for a foreign npz),
    ``feats``/``probs`` the per-image features and probabilities when kept (for
    precision-recall and the reference IS), ``path`` the cache file.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    dataset: str
    identity: Optional[dict]
    feats: Optional[np.ndarray] = None
    probs: Optional[np.ndarray] = None
    path: Optional[Path] = None
    labels: Optional[np.ndarray] = field(default=None, repr=False)

    def check_compatible(self, extractor: FeatureExtractor) -> None:
        """Raise when these statistics were not produced by ``extractor``."""
        mine = extractor.identity()
        where = f" ({self.path})" if self.path else ""
        if self.mu.shape[0] != extractor.feature_dim:
            raise ArgenError(f"reference statistics for {self.dataset}{where} have {self.mu.shape[0]}-d features but the "
                             f"{extractor.name} extractor gives {extractor.feature_dim}-d: they come from another network")
        if self.identity is None:
            return  # foreign file (e.g. ADM's reference batch): only the dimension can be checked
        for key in ("extractor", "protocol", "weights_sha256"):
            if self.identity.get(key) != mine.get(key):
                raise ArgenError(f"reference statistics for {self.dataset}{where} were computed with {key} "
                                 f"{self.identity.get(key)!r}, not {mine.get(key)!r}: recompute them with "
                                 f"`argen eval ref-stats` for this extractor")

    def meta(self) -> dict:
        return {"dataset": self.dataset, "n": int(self.n), "identity": self.identity,
                "path": str(self.path) if self.path else None}


# --------------------------------------------------------------------------- images


def list_image_files(folder, what: str = "image folder") -> list[Path]:
    """Image files under ``folder`` (recursive, hidden files skipped), sorted by relative path."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ArgenError(f"{what} {folder} does not exist or is not a folder")
    files = sorted((p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                    and p.suffix.lower() in IMAGE_EXTENSIONS), key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise ArgenError(f"{what} {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def read_image_files(files, what: str = "images") -> np.ndarray:
    """Read image files into uint8 ``[N, H, W, C]``; one-line errors for an unreadable or
    corrupt file (named), a mode other than L/RGB, and mixed sizes or modes (both files named)."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ArgenError(f"cannot read image {path}: {first[:160]}") from None
        if image.mode not in ("L", "RGB"):
            raise ArgenError(f"{path} has mode {image.mode}; only 8-bit grayscale (L) or RGB images are scored")
        if images and (image.size, image.mode) != (images[0].size, images[0].mode):
            a, b = images[0], image
            raise ArgenError(f"{what} mix image sizes/modes: {files[0]} is {a.size[0]}x{a.size[1]} {a.mode}, "
                             f"{path} is {b.size[0]}x{b.size[1]} {b.mode}")
        images.append(image)
    if not images:
        raise ArgenError(f"no {what} to read")
    return _pil_to_array(images, what)


def read_image_folder(folder, what: str = "image folder") -> tuple[np.ndarray, list[str]]:
    """All images under ``folder`` as uint8 ``[N, H, W, C]`` and their relative names."""
    files = list_image_files(folder, what)
    root = Path(folder).expanduser()
    return read_image_files(files, f"{what} {root}"), [p.relative_to(root).as_posix() for p in files]


def balanced_indices(labels: np.ndarray, num: int, num_classes: int = 10) -> np.ndarray:
    """Indices of ``num`` items whose j-th has class ``j % num_classes`` (the k-th occurrence of that
    class for k = j // num_classes, in dataset order): a deterministic class-balanced subset."""
    per_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    short = [c for c, idx in enumerate(per_class) if len(idx) < len(range(c, num, num_classes))]
    if short:
        raise ArgenError(f"cannot take {num} class-balanced images: class {short[0]} has only {len(per_class[short[0]])}")
    return np.array([per_class[j % num_classes][j // num_classes] for j in range(num)], dtype=np.int64)


def parse_ref(spec: str) -> tuple[str, str]:
    """``(kind, value)`` with kind "fashion-mnist" (value = split), "npz" or "folder"."""
    text = str(spec).strip()
    match = _FMNIST.match(text.lower())
    if match:
        return "fashion-mnist", match.group(2)
    path = Path(text).expanduser()
    if text.lower().endswith(".npz"):
        if not path.is_file():
            raise ArgenError(f"reference npz {path} not found")
        return "npz", str(path)
    if path.is_dir():
        return "folder", str(path)
    raise ArgenError(f"unknown reference {text!r}: use fashion-mnist:test, fashion-mnist:train, a folder of images "
                     "or an .npz (statistics or an ADM reference batch)")


def load_reference_images(spec: str, num: Optional[int] = None) -> tuple[np.ndarray, Optional[np.ndarray], str]:
    """``(uint8 images [N, H, W, C], labels or None, canonical dataset name)`` for a spec; ``num`` (at most
    the reference's size: a statistic of fewer images than asked for would be recorded under the asked-for
    count) keeps that many."""
    kind, value = parse_ref(spec)
    if kind == "fashion-mnist":
        from argen.data.fashion_mnist import load_fashion_mnist

        images, labels = load_fashion_mnist(value)
        images, labels = images.numpy(), labels.numpy()
        _check_count(num, len(images), f"fashion-mnist:{value}")
        if num is not None and num < len(images):
            idx = balanced_indices(labels, num)
            images, labels = images[idx], labels[idx]
        return images[..., None], labels, f"fashion-mnist:{value}"
    if kind == "folder":
        images, _ = read_image_folder(value, "reference folder")
        labels = None
    else:
        images, labels = read_sample_npz(value), None
    _check_count(num, len(images), value)
    if num is not None and num < len(images):
        images = images[:num]
    return images, labels, str(Path(value).resolve())


def _check_count(num: Optional[int], size: int, name: str) -> None:
    if num is not None and num > size:
        raise ArgenError(f"{num} reference images asked for (--ref-num), but {name} holds {size}")


def _folder_fingerprint(folder: Path) -> str:
    """Hash of (relative path, size, mtime) of every image: a changed folder gets new statistics."""
    digest = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."):
            st = p.stat()
            digest.update(f"{p.relative_to(folder).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def _slug(kind: str, value: str) -> str:
    if kind == "fashion-mnist":
        return f"fashion-mnist-{value}"
    path = Path(value).resolve()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem if kind == "npz" else path.name)[:40] or "root"
    place = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    if kind == "folder":
        return f"folder-{name}-{place}-{_folder_fingerprint(path)}"
    st = path.stat()
    return f"npz-{name}-{place}-{hashlib.sha256(f'{st.st_size}:{st.st_mtime_ns}'.encode()).hexdigest()[:8]}"


# --------------------------------------------------------------------------- statistics


def _from_file(path: Path, spec: str, extractor: FeatureExtractor) -> RefStats:
    data = read_stats_npz(path)
    meta = data["meta"] or {}
    stats = RefStats(mu=data["mu"], sigma=data["sigma"], n=int(meta.get("n", 0)), dataset=meta.get("dataset", spec),
                     identity=meta.get("identity"), feats=data["feats"], probs=data["probs"], path=path)
    stats.check_compatible(extractor)
    return stats


def reference_stats(extractor: FeatureExtractor, ref: str = "fashion-mnist:test", num: Optional[int] = None, *,
                    refresh: bool = False, use_cache: bool = True, log=None) -> RefStats:
    """Statistics of a reference for ``extractor``, from the cache when possible.

    ``num`` limits the number of reference images (default: all). An ``.npz`` holding
    ``mu``/``sigma`` is used as is (checked against the extractor when it records one; a
    foreign file, such as ADM's, is only checked for its feature dimension and has no
    per-image features, so precision/recall is skipped).
    """
    kind, value = parse_ref(ref)
    if kind == "npz":
        data = read_stats_npz(value)
        if data["mu"] is not None:
            stats = _from_file(Path(value), ref, extractor)
            if num is not None and stats.n and num != stats.n:
                raise ArgenError(f"{value} holds fixed statistics of {stats.n} images; drop --ref-num")
            return stats
    slug = _slug(kind, value)
    n_tag = "all" if num is None else str(int(num))
    path = cache_dir() / f"{extractor.key}__{slug}__n{n_tag}.npz"
    if use_cache and not refresh and path.is_file():
        try:
            return _from_file(path, ref, extractor)
        except ArgenError:
            if log:
                log(f"ignoring unusable cached statistics {path}; recomputing")
    images, labels, dataset = load_reference_images(ref, num)
    if len(images) < 2:
        raise ArgenError(f"reference {ref} has {len(images)} image(s); at least 2 are needed for statistics")
    if log:
        log(f"computing {extractor.name} reference statistics of {dataset} ({len(images)} images)")
    feats, probs = extractor.extract(images, desc=f"{extractor.name} features of {len(images)} reference images")
    mu, sigma = feature_statistics(feats, name=f"reference features of {dataset}")
    stats = RefStats(mu=mu, sigma=sigma, n=len(images), dataset=dataset, identity=extractor.identity(),
                     feats=feats, probs=probs, labels=labels)
    if use_cache:
        try:
            stats.path = write_stats_npz(path, mu, sigma, meta={"dataset": dataset, "n": len(images), "spec": ref,
                                                                "identity": extractor.identity()},
                                         feats=feats, probs=probs)
        except OSError as exc:  # a read-only cache is not fatal
            if log:
                log(f"could not cache reference statistics at {path}: {exc}")
    return stats


def real_data_floor(extractor: FeatureExtractor, num: int, ref: str = "fashion-mnist:test",
                    ref_stats: Optional[RefStats] = None, log=None) -> Optional[dict]:
    """FID of ``num`` class-balanced Fashion-MNIST *train* images against the test reference.

    Returns ``{"fid", "num", "train", "ref"}``, or None when the reference is not a
    Fashion-MNIST split (there is no held-out real set to compare with).
    """
    kind, split = parse_ref(ref)
    if kind != "fashion-mnist":
        return None
    other = "train" if split == "test" else "test"
    stats = ref_stats or reference_stats(extractor, ref, log=log)
    available = 60000 if other == "train" else 10000
    if num > available:
        return None
    if num < 2:
        raise ArgenError(f"the real-data floor needs at least 2 images, got {num}")
    floor_stats = reference_stats(extractor, f"fashion-mnist:{other}", num=num, log=log)
    return {"fid": frechet_distance((floor_stats.mu, floor_stats.sigma), (stats.mu, stats.sigma)), "num": int(num),
            "real_set": f"fashion-mnist:{other}", "ref": stats.dataset}
