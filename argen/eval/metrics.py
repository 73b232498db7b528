"""Sample-quality metrics computed from feature matrices, in float64.

These functions take features that some network already produced (Inception pool3, the
Fashion-MNIST classifier's penultimate layer, class probabilities, ...) and turn them into
numbers. Keeping feature extraction out of them means one implementation serves every
feature network, and lets the tests feed the *same* matrices to torchmetrics, clean-fid and
torch-fidelity and check that all four agree.

Everything runs in float64 numpy: FID in float32 drifts at the 1e-5 relative level, which
is larger than the differences between samplers we want to resolve. Inputs may be numpy
arrays, nested lists or torch tensors (any dtype, any device); torch is not imported here.

Conventions (all chosen to match the reference tools; see each function):

* FID: ``mu`` is the sample mean and ``sigma`` the unbiased (N-1) covariance, as in
  ``np.cov``, clean-fid, torch-fidelity, torchmetrics and the ADM evaluator.
* IS: contiguous splits at ``i*N//splits`` as in torch-fidelity (identical to
  torchmetrics' ``torch.chunk`` when ``splits`` divides N), std over splits with ddof=1
  like torchmetrics.
* Precision/recall: the k-NN manifold estimate of Kynkäänniemi et al. with ADM's rule
  (squared distances, radius = distance to the k-th neighbour other than the point itself,
  a point is covered when ``d^2 <= r^2``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from argen.errors import ArgenError

__all__ = ["feature_statistics", "frechet_distance", "inception_score", "precision_recall"]

# Row-sum tolerance for "these are probabilities": softmax in float32 sums to 1 within ~1e-6,
# while logits passed by mistake miss it by far more.
_PROB_SUM_TOL = 1e-4

# Upper bound on the number of float64 entries of one block of pairwise distances
# (2**23 entries = 64 MiB). 10k x 10k in one go would be 800 MB, plus temporaries.
_BLOCK_ELEMENTS = 2**23


# --------------------------------------------------------------------------- input checks


def _to_numpy64(x: Any, name: str) -> np.ndarray:
    """Convert an array-like (numpy, list, torch tensor on any device/dtype) to float64 numpy."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        # torch tensor: .double() first because numpy has no bfloat16.
        x = x.detach().cpu().double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ArgenError(f"{name} is not a numeric array ({type(x).__name__}): {str(exc).splitlines()[0]}") from None


def _check_finite(arr: np.ndarray, name: str) -> None:
    if not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ArgenError(f"{name} contains {bad} NaN or infinite value(s); check the feature extractor's inputs")


def _feature_matrix(x: Any, name: str, min_samples: int = 2) -> np.ndarray:
    """Validate a [N, D] feature matrix with at least ``min_samples`` rows and finite entries."""
    arr = _to_numpy64(x, name)
    if arr.ndim != 2:
        raise ArgenError(f"{name} must be a 2-D feature matrix [N, D], got shape {tuple(arr.shape)}")
    if arr.shape[1] < 1:
        raise ArgenError(f"{name} has 0 feature dimensions (shape {tuple(arr.shape)})")
    if arr.shape[0] < min_samples:
        raise ArgenError(f"{name} has {arr.shape[0]} sample(s); at least {min_samples} are needed")
    _check_finite(arr, name)
    return arr


def _is_stats_pair(x: Any) -> bool:
    """True for ``(mu, sigma)``: a 2-sequence of a 1-D and a 2-D array.

    A feature matrix given as a list of two rows has two 1-D items, so it is not mistaken
    for a pair.
    """
    return isinstance(x, (tuple, list)) and len(x) == 2 and np.ndim(x[0]) == 1 and np.ndim(x[1]) == 2


def _stats(x: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` in float64 from either a feature matrix or a ``(mu, sigma)`` pair."""
    if not _is_stats_pair(x):
        return feature_statistics(x, name=name)
    mu = _to_numpy64(x[0], f"{name} mean")
    sigma = _to_numpy64(x[1], f"{name} covariance")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ArgenError(f"{name}: covariance shape {tuple(sigma.shape)} does not match mean of length {mu.shape[0]}")
    _check_finite(mu, f"{name} mean")
    _check_finite(sigma, f"{name} covariance")
    return mu, sigma


# --------------------------------------------------------------------------- FID


def feature_statistics(feats: Any, *, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Return ``(mu [D], sigma [D, D])`` of a feature matrix ``[N, D]`` in float64.

    ``sigma`` is the unbiased covariance (divides by N-1), the convention of every FID tool,
    so statistics saved here can be compared with clean-fid / ADM ``.npz`` files.
    """
    arr = _feature_matrix(feats, name, min_samples=2)
    mu = arr.mean(axis=0)
    sigma = np.atleast_2d(np.cov(arr, rowvar=False))  # atleast_2d: np.cov of one column is 0-d
    return mu, sigma


def frechet_distance(a: Any, b: Any) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (FID when the
    features are Inception pool3).

    ``a`` and ``b`` are each either a feature matrix ``[N, D]`` (N >= 2) or a ``(mu, sigma)``
    pair as returned by :func:`feature_statistics` (e.g. precomputed reference statistics).

        FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)

    Raises :class:`ArgenError` for mismatched dimensions, fewer than 2 samples or
    non-finite values. Tiny negative results from round-off are clipped to 0.
    """
    mu1, sigma1 = _stats(a, "first feature set")
    mu2, sigma2 = _stats(b, "second feature set")
    if mu1.shape != mu2.shape:
        raise ArgenError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}; both sets must come from the same feature layer")

    diff = mu1 - mu2
    # tr sqrt(S1 S2) as the sum of square roots of the eigenvalues of S1 S2, not via sqrtm.
    # Why: S1 S2 is similar to S1^1/2 S2 S1^1/2, which is symmetric PSD, so its eigenvalues
    # are real and >= 0 and the trace of the (principal) square root is the sum of their
    # square roots. This needs no matrix square root at all: scipy's sqrtm has changed
    # behaviour repeatedly (huge spurious imaginary parts in 1.11.2-1.12, `disp=` deprecated
    # in 1.16 and removed in 1.18) and the classic code has to retry with eps*I when it
    # fails on near-singular products. An eigenvalue solver is backward stable, so round-off
    # only shows up as tiny imaginary parts or tiny negative eigenvalues of rank-deficient
    # covariances, which are exactly what we discard by taking the real part and clipping
    # at 0. It is also what torchmetrics and torch-fidelity >= 0.4 compute.
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2)
    tr_covmean = float(np.sqrt(np.clip(eigenvalues.real, 0.0, None)).sum())
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return max(distance, 0.0)


# --------------------------------------------------------------------------- IS


def inception_score(probs: Any, splits: int = 10, *, seed: int | None = 0) -> tuple[float, float]:
    """Inception Score ``(mean, std)`` over ``splits`` groups of class-probability rows.

    ``probs`` is ``[N, K]`` with rows that are probability vectors (softmax outputs, not
    logits). For each split ``IS = exp(mean_i KL(p_i || mean_j p_j))``; the result is the mean
    and the standard deviation (ddof=1) of the per-split scores. ``1 <= IS <= K``: 1 when all
    predictions are identical, K when they are confident and spread evenly over K classes.

    Split convention: rows are first permuted with ``np.random.default_rng(seed)`` (``seed=None``
    keeps the given order), then cut into contiguous groups at ``i*N//splits`` - the boundaries
    torch-fidelity's ``isc_features_to_metric`` uses, and the same groups as torchmetrics'
    ``torch.chunk`` whenever ``splits`` divides N (pick such N to compare). For the same row
    order the mean matches both tools; the std matches torchmetrics (ddof=1), and
    torch-fidelity's ddof=0 std is ``std * sqrt((splits-1)/splits)``. The shuffle exists because
    class-conditional samples are often generated class by class: unshuffled, each split would
    hold a single class and IS would collapse towards 1. torchmetrics shuffles unseeded; we
    seed it so the number is reproducible. ADM uses no shuffle and fixed 5000-row splits
    (``splits=N//5000, seed=None``). With ``splits=1`` the std is NaN, as in torchmetrics.
    """
    if isinstance(splits, bool) or not isinstance(splits, (int, np.integer)) or splits < 1:
        raise ArgenError(f"splits must be a positive integer, got {splits!r}")
    p = _feature_matrix(probs, "probs", min_samples=max(int(splits), 1))
    if p.min() < 0:
        raise ArgenError(f"probs has negative entries (min {p.min():.3g}); pass softmax(logits), not logits")
    row_sums = p.sum(axis=1)
    worst = float(np.abs(row_sums - 1.0).max())
    if worst > _PROB_SUM_TOL:
        raise ArgenError(f"probs rows must sum to 1 (worst row sums to {1.0 + worst:.4g} or {1.0 - worst:.4g}); pass softmax(logits), not logits")
    p = p / row_sums[:, None]  # remove float32 rounding of the softmax before going to logs

    if seed is not None:
        p = p[np.random.default_rng(seed).permutation(len(p))]

    n = len(p)
    scores = []
    for i in range(splits):
        chunk = p[i * n // splits:(i + 1) * n // splits]
        marginal = chunk.mean(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            # KL(p || q) per row with 0 log 0 = 0. q_c > 0 wherever some p_c > 0, so the
            # only undefined terms are the 0 * log 0 ones we zero out.
            terms = np.where(chunk > 0, chunk * (np.log(chunk) - np.log(marginal)), 0.0)
        scores.append(float(np.exp(terms.sum(axis=1).mean())))
    scores_arr = np.asarray(scores)
    std = float(scores_arr.std(ddof=1)) if splits > 1 else float("nan")
    return float(scores_arr.mean()), std


# --------------------------------------------------------------------------- precision / recall


def _rows_per_block(n_cols: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(n_cols, 1))


def _squared_distances(x: np.ndarray, y: np.ndarray, x_sq: np.ndarray, y_sq: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances ``[len(x), len(y)]`` via |x|^2 + |y|^2 - 2 x.y.

    The expansion turns the work into one matrix product; in float64 its cancellation
    error (~1e-16 |x||y|) is far below ADM's float16 distances. Clipped at 0 because
    round-off can make a zero distance slightly negative.
    """
    d = x_sq[:, None] + y_sq[None, :] - 2.0 * (x @ y.T)
    return np.maximum(d, 0.0, out=d)


def _knn_radii_sq(feats: np.ndarray, k: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest neighbour, the point itself excluded.

    ADM takes index k of the partitioned distances *including* the self-distance 0 at
    index 0; setting the diagonal to +inf and taking index k-1 is the same number without
    relying on round-off to keep the self-distance smallest. Exact duplicates still count
    as neighbours at distance 0, as in ADM.
    """
    n = len(feats)
    sq = np.einsum("ij,ij->i", feats, feats)
    radii = np.empty(n)
    step = _rows_per_block(n)
    for start in range(0, n, step):
        stop = min(start + step, n)
        d = _squared_distances(feats[start:stop], feats, sq[start:stop], sq)
        rows = np.arange(stop - start)
        d[rows, start + rows] = np.inf
        radii[start:stop] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return radii


def precision_recall(real_feats: Any, fake_feats: Any, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) as the ADM evaluator computes them.

    Each set defines a manifold: the union of balls around its points, each ball's radius
    being the distance to that point's k-th nearest neighbour in its own set (self
    excluded). ``precision`` is the fraction of fake samples inside the real manifold
    (quality), ``recall`` the fraction of real samples inside the fake manifold (coverage).
    Points on a ball's boundary count as inside (``d^2 <= r^2``), as in ADM.

    Distances are computed in float64 blocks of at most 2**23 entries, so 10k x 10k needs
    ~64 MB at a time rather than 800 MB. ADM computes them in float16, so points within
    ~1e-3 relative of a boundary can land differently; expect agreement to about 1e-3.
    Both sets need more than ``k`` samples.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ArgenError(f"k must be a positive integer, got {k!r}")
    real = _feature_matrix(real_feats, "real features", min_samples=k + 1)
    fake = _feature_matrix(fake_feats, "fake features", min_samples=k + 1)
    if real.shape[1] != fake.shape[1]:
        raise ArgenError(f"feature dimensions differ: real {real.shape[1]} vs fake {fake.shape[1]}; both sets must come from the same feature layer")

    real_radii = _knn_radii_sq(real, k)
    fake_radii = _knn_radii_sq(fake, k)

    # One pass over real x fake distance blocks answers both questions.
    real_sq = np.einsum("ij,ij->i", real, real)
    fake_sq = np.einsum("ij,ij->i", fake, fake)
    fake_in_real = np.zeros(len(fake), dtype=bool)  # -> precision
    real_in_fake = np.zeros(len(real), dtype=bool)  # -> recall
    step = _rows_per_block(len(fake))
    for start in range(0, len(real), step):
        stop = min(start + step, len(real))
        d = _squared_distances(real[start:stop], fake, real_sq[start:stop], fake_sq)
        fake_in_real |= (d <= real_radii[start:stop, None]).any(axis=0)
        real_in_fake[start:stop] = (d <= fake_radii[None, :]).any(axis=1)
    return float(fake_in_real.mean()), float(real_in_fake.mean())
