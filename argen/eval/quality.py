"""Sample quality: FID, IS, precision/recall and class accuracy of a set of samples.

* :func:`quality_scorer` - for ``argen bench samplers --fid N``: a callable scoring float
  images in [-1, 1] with the Fashion-MNIST classifier against ``fashion-mnist:test``.
* :func:`evaluate_samples` - for ``argen eval fid``: samples from a sampling output folder
  (labels come from its ``samples.jsonl``), any folder of images, an ADM ``.npz`` or an
  array, scored with any extractor against any reference; feature extraction is split over
  processes under ``accelerate launch``.
* :func:`compute_metrics` - the numbers from features/probabilities already extracted.

Images are always scored as uint8 (float images go through :func:`argen.pipeline.to_uint8`,
the conversion used to write PNGs), so in-memory scoring and scoring the saved PNGs give the
same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

import numpy as np

from argen.errors import ArgenError

from .features import FeatureExtractor, as_uint8_images
from .metrics import frechet_distance, inception_score, precision_recall
from .reference import RefStats, list_image_files, read_image_files, real_data_floor, reference_stats

__all__ = ["quality_scorer", "evaluate_samples", "compute_metrics", "fid_to_stats", "resolve_samples", "SampleSource",
           "format_table"]

# --------------------------------------------------------------------------- metric arithmetic


def _is_splits(extractor: FeatureExtractor, n: int) -> tuple[int, Optional[int]]:
    """(splits, shuffle seed): ADM's 5000-image consecutive splits for Inception/adm, else 10
    seeded-shuffled splits (fewer for tiny N)."""
    if extractor.name == "inception" and extractor.protocol == "adm":
        return max(1, n // 5000), None
    return (10 if n >= 20 else max(1, n // 2)), 0


def fid_to_stats(feats: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """FID between a feature matrix ``[N, D]`` and reference ``(mu, sigma)``.

    Same number as :func:`argen.eval.metrics.frechet_distance`. When N <= D the sample
    covariance ``S1 = A^T A / (N-1)`` (A = centred features) has rank < N, and the non-zero
    eigenvalues of ``S1 S2`` are those of the symmetric N x N matrix ``A S2 A^T / (N-1)``, so
    ``tr sqrt(S1 S2)`` costs an N x N eigendecomposition instead of a D x D one (a few
    Inception samples: milliseconds instead of ~15 s for D = 2048).
    """
    feats = np.asarray(feats, dtype=np.float64)
    n, d = feats.shape
    if n > d:
        return frechet_distance(feats, (mu, sigma))
    if n < 2:
        raise ArgenError(f"FID needs at least 2 samples, got {n}")
    if not np.isfinite(feats).all():
        raise ArgenError("sample features contain NaN or infinite values; check the feature extractor's inputs")
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise ArgenError(f"feature dimensions differ: {d} vs {mu.shape[0]}; both sets must come from the same feature layer")
    mean = feats.mean(axis=0)
    centred = feats - mean
    small = centred @ sigma @ centred.T / (n - 1)
    small = (small + small.T) / 2
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh(small), 0.0, None)).sum())
    diff = mean - mu
    tr1 = float((centred * centred).sum() / (n - 1))
    return max(float(diff @ diff + tr1 + np.trace(sigma) - 2.0 * tr_covmean), 0.0)


def compute_metrics(feats: np.ndarray, probs: Optional[np.ndarray], ref: RefStats, extractor: FeatureExtractor,
                    labels: Optional[Sequence[Optional[int]]] = None, label_space: Optional[str] = None,
                    floor: Optional[dict] = None) -> dict:
    """FID / IS / precision / recall / class accuracy of extracted samples against ``ref``."""
    ref.check_compatible(extractor)
    feats = np.asarray(feats, dtype=np.float64)
    n = len(feats)
    if n < 2:
        raise ArgenError(f"FID needs at least 2 samples, got {n}")
    if feats.shape[1] != ref.mu.shape[0]:
        raise ArgenError(f"sample features are {feats.shape[1]}-d but the reference statistics are {ref.mu.shape[0]}-d")
    out = {"num_samples": n, "fid": fid_to_stats(feats, ref.mu, ref.sigma)}
    out["fid_floor"] = floor["fid"] if floor else None
    out["is"] = out["is_std"] = None
    if probs is not None:
        splits, seed = _is_splits(extractor, n)
        out["is"], out["is_std"] = inception_score(probs, splits=splits, seed=seed)
        out["is_splits"] = splits
        if out["is_std"] != out["is_std"]:  # NaN with one split
            out["is_std"] = None
    out["precision"] = out["recall"] = None
    if ref.feats is not None and n > 3 and len(ref.feats) > 3:
        out["precision"], out["recall"] = precision_recall(ref.feats, feats, k=3)
    out["class_accuracy"] = None
    if (probs is not None and labels is not None and label_space == "fashion-mnist" and extractor.name == "fmnist"
            and all(label is not None for label in labels)):
        lab = np.asarray(labels, dtype=np.int64)
        if len(lab) != n:
            raise ArgenError(f"{len(lab)} labels for {n} samples")
        pred = np.asarray(probs).argmax(axis=1)
        out["class_accuracy"] = float((pred == lab).mean())
        out["class_accuracy_per_class"] = {int(c): float((pred[lab == c] == c).mean()) for c in np.unique(lab)}
    out["ref_is"] = None
    if ref.probs is not None and len(ref.probs) >= 2:
        splits, seed = _is_splits(extractor, len(ref.probs))
        out["ref_is"] = inception_score(ref.probs, splits=splits, seed=seed)[0]
    out["extractor"] = extractor.identity()
    out["ref"] = ref.meta()
    if floor:
        out["floor"] = floor
    return out


# --------------------------------------------------------------------------- scorer for benchmarks


def _to_uint8(images: Any) -> np.ndarray:
    if hasattr(images, "is_floating_point") and images.is_floating_point():
        from argen.pipeline import to_uint8

        return to_uint8(images)
    if isinstance(images, np.ndarray) and images.dtype.kind == "f":
        raise ArgenError("float numpy images are ambiguous; pass a [-1, 1] torch tensor or uint8 images")
    return as_uint8_images(images)


def quality_scorer(n: int, ref: str = "fashion-mnist:test", floor: bool = True, device="cpu",
                   log: Optional[Callable[[str], None]] = None, ref_num: Optional[int] = None
                   ) -> Callable[[Any, List[int]], dict]:
    """A callable ``score(images, labels) -> {"fid", "is", "class_accuracy", "precision", "recall", ...}``.

    ``images``: float tensor ``[B, 1, H, W]`` in [-1, 1] (H = 28 or 32) or uint8 images;
    ``labels``: Fashion-MNIST class of each image (class id for c2i, the prompt's class for
    t2i) or None. Uses the shipped Fashion-MNIST classifier and the ``ref`` statistics
    (cached). ``n`` is the expected number of images per call: the reference statistics and
    the real-data floor at that N (``fid_floor``: train vs test images) are prepared here so
    scoring itself is quick. ``ref_num`` limits the reference to a class-balanced subset.
    """
    from .features import FMNISTExtractor

    if n < 2:
        raise ArgenError(f"quality scoring needs at least 2 images, got {n}")
    extractor = FMNISTExtractor(device=device)
    stats = reference_stats(extractor, ref, ref_num, log=log)
    floors = {}

    def floor_at(count: int):
        if not floor:
            return None
        if count not in floors:
            floors[count] = real_data_floor(extractor, count, ref, ref_stats=stats, log=log)
        return floors[count]

    floor_at(n)

    def score(images, labels=None) -> dict:
        feats, probs = extractor.extract(_to_uint8(images))
        space = "fashion-mnist" if labels is not None and all(
            label is not None and 0 <= int(label) < 10 for label in labels) else None
        return compute_metrics(feats, probs, stats, extractor, labels, space, floor_at(len(feats)))

    return score


# --------------------------------------------------------------------------- samples on disk


@dataclass
class SampleSource:
    """Where samples are: ``files`` (read lazily, per process) or ``images`` in memory, with
    ``labels`` (None or one per image), their ``label_space`` and the sampling settings."""

    files: Optional[List[Path]]
    images: Optional[np.ndarray]
    labels: Optional[List[Optional[int]]]
    label_space: Optional[str]
    description: str
    run: Optional[dict] = None

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.images)


def resolve_samples(samples: Any, labels=None) -> SampleSource:
    """Describe samples given as a sampling output folder, an image folder, an ``.npz`` or an array."""
    from .npz import read_sample_npz
    from .sampling import RUN_FILE, SAMPLES_DIR, png_complete, read_plan, sample_path

    if not isinstance(samples, (str, Path)):
        arr = _to_uint8(samples)
        return _checked(SampleSource(None, arr, _labels(labels, len(arr)), None, "in-memory images"))
    path = Path(samples).expanduser()
    if path.suffix.lower() == ".npz":
        arr = read_sample_npz(path)
        return _checked(SampleSource(None, arr, _labels(labels, len(arr)), None, str(path)))
    run_dir = None
    if (path / RUN_FILE).is_file() and (path / SAMPLES_DIR).is_dir():
        run_dir = path
    elif path.name == SAMPLES_DIR and (path.parent / RUN_FILE).is_file():
        run_dir = path.parent
    if run_dir is None:
        files = list_image_files(path, "samples folder")
        return _checked(SampleSource(files, None, _labels(labels, len(files)), None, str(path)))
    run, items = read_plan(run_dir)
    files = [sample_path(run_dir, it.index) for it in items]
    missing = [f for f in files if not png_complete(f)]
    if missing:
        raise ArgenError(f"{run_dir} is incomplete: {len(missing)} of {len(files)} samples missing (first {missing[0].name}); "
                         "rerun the same sampling command to resume")
    space = (run.get("conditions") or {}).get("label_space")
    return _checked(SampleSource(files, None, [it.label for it in items], space, str(run_dir), run))


def _labels(labels, n: int):
    if labels is None:
        return None
    labels = [None if v is None else int(v) for v in labels]
    if len(labels) != n:
        raise ArgenError(f"{len(labels)} labels for {n} samples")
    return labels


def _checked(source: SampleSource) -> SampleSource:
    if len(source) < 2:
        raise ArgenError(f"{source.description}: {len(source)} image(s); FID needs at least 2 samples")
    return source


def _extract(extractor: FeatureExtractor, source: SampleSource, state=None):
    """Features and probs of all samples in order; under several processes each extracts a
    share and the results are gathered to every process."""
    world = 1 if state is None else int(state.num_processes)
    rank = 0 if state is None else int(state.process_index)
    # Blocks of the extractor's batch size, block k to process k % W: every batch holds the
    # same images whatever W is, so the features (and the metrics) are bit-identical.
    bs = extractor.batch_size
    share = [i for k, lo in enumerate(range(0, len(source), bs)) if k % world == rank
             for i in range(lo, min(lo + bs, len(source)))]
    payload = {"index": share, "feats": None, "probs": None, "shape": None, "error": None}
    try:
        if share:
            if source.files is not None:
                images = read_image_files([source.files[i] for i in share], f"samples in {source.description}")
            else:
                images = source.images[share]
            feats, probs = extractor.extract(images, desc=f"{extractor.name} features of {len(images)} samples")
            # float32 is lossless for both networks' outputs (they compute in float32) and halves the traffic
            payload.update(feats=feats.astype(np.float32), probs=probs, shape=tuple(images.shape[1:]),
                           first=str(source.files[share[0]]) if source.files is not None else f"image {share[0]}")
    except ArgenError as exc:
        payload["error"] = str(exc)
    from ..distributed import gather_objects

    parts = gather_objects(payload, world)
    errors = [p["error"] for p in parts if p["error"]]
    if errors:
        raise ArgenError(errors[0])
    shapes = [(p["shape"], p["first"]) for p in parts if p["shape"] is not None]
    for shape, first in shapes[1:]:
        if shape != shapes[0][0]:
            raise ArgenError(f"samples mix image sizes/modes: {shapes[0][1]} is {shapes[0][0]}, {first} is {shape} (H, W, C)")
    dim = extractor.feature_dim
    feats = np.zeros((len(source), dim), dtype=np.float64)
    probs = None if any(p["probs"] is None for p in parts if p["index"]) else np.zeros((len(source), extractor.num_classes))
    for p in parts:
        if p["index"]:
            feats[p["index"]] = p["feats"].astype(np.float64)
            if probs is not None:
                probs[p["index"]] = p["probs"]
    return feats, probs


def evaluate_samples(samples: Any, *, labels=None, extractor: Optional[FeatureExtractor] = None,
                     ref: str = "fashion-mnist:test", ref_num: Optional[int] = None, floor: Optional[bool] = None,
                     state=None, log: Optional[Callable[[str], None]] = None, subsets: int = 0) -> Optional[dict]:
    """Score samples (see :func:`resolve_samples`) against ``ref`` with ``extractor`` (default fmnist).

    ``floor``: also report the real-data floor at the same N (default: on for the fmnist
    extractor, off for Inception where 10k reference images cost CPU hours). Under several
    processes (``state``) every process extracts a share of the features; only the main
    process computes and returns the metrics (the others return None). ``subsets`` = K > 1 also
    scores K disjoint consecutive subsets of N // K samples (``fid_subsets``: values, mean, std):
    the spread of FID at that smaller N, i.e. how far two samplers' FIDs must differ to mean
    anything.
    """
    from .features import FMNISTExtractor

    extractor = extractor or FMNISTExtractor()
    source = resolve_samples(samples, labels)
    is_main = state is None or state.is_main_process
    feats, probs = _extract(extractor, source, state)
    if not is_main:
        return None
    stats = reference_stats(extractor, ref, ref_num, log=log)
    if floor is None:
        floor = extractor.name == "fmnist"
    floor_info = real_data_floor(extractor, len(feats), ref, ref_stats=stats, log=log) if floor else None
    label_space = source.label_space
    if source.run is None and source.labels is not None and label_space is None:
        label_space = "fashion-mnist" if all(v is not None and 0 <= v < 10 for v in source.labels) else None
    metrics = compute_metrics(feats, probs, stats, extractor, source.labels, label_space, floor_info)
    if subsets and subsets > 1:
        metrics["fid_subsets"] = fid_over_subsets(feats, stats, subsets)
    metrics["samples"] = source.description
    if source.run is not None:
        metrics["sampling"] = source.run
    return metrics


def fid_over_subsets(feats: np.ndarray, stats: RefStats, k: int) -> dict:
    """FID of k disjoint consecutive blocks of len(feats) // k samples against the same reference."""
    n = len(feats) // k
    if n < 2:
        raise ArgenError(f"--subsets {k} leaves {n} sample(s) per subset; need at least 2")
    values = [fid_to_stats(feats[i * n:(i + 1) * n], stats.mu, stats.sigma) for i in range(k)]
    return {"k": k, "n": n, "values": values, "mean": float(np.mean(values)), "std": float(np.std(values, ddof=1))}


def format_table(metrics: dict) -> str:
    """A short Markdown table of the headline numbers."""

    def fmt(value, spec):
        return "–" if value is None else format(value, spec)

    ext = metrics.get("extractor", {})
    rows = [("FID", fmt(metrics.get("fid"), ".3f")),
            ("real-data floor (train vs ref, same N)", fmt(metrics.get("fid_floor"), ".3f")),
            ("IS", fmt(metrics.get("is"), ".3f") + (f" ± {metrics['is_std']:.3f}" if metrics.get("is_std") is not None else "")),
            ("IS of the reference", fmt(metrics.get("ref_is"), ".3f")),
            ("precision / recall", f"{fmt(metrics.get('precision'), '.3f')} / {fmt(metrics.get('recall'), '.3f')}"),
            ("class accuracy", fmt(metrics.get("class_accuracy"), ".1%")),
            ("samples", str(metrics.get("num_samples"))),
            *([(f"FID of {metrics['fid_subsets']['k']} disjoint subsets of {metrics['fid_subsets']['n']}",
                f"{metrics['fid_subsets']['mean']:.3f} ± {metrics['fid_subsets']['std']:.3f} (std)")]
              if metrics.get("fid_subsets") else []),
            ("reference", f"{metrics.get('ref', {}).get('dataset')} (N={metrics.get('ref', {}).get('n')})"),
            ("extractor", f"{ext.get('extractor')} / {ext.get('protocol')} / sha256 {str(ext.get('weights_sha256'))[:16]}…")]
    if ext.get("extractor") == "inception" and ext.get("protocol") == "clean":
        rows.append(("note", "clean-fid 'clean' protocol: not comparable with ADM/LlamaGen FIDs"))
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)
