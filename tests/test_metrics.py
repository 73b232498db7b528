"""Tests for argen.eval.metrics and the shipped Fashion-MNIST classifier.

Three kinds of checks:
* properties and closed forms (FD of Gaussians, IS bounds, P/R of identical / far sets),
* agreement with torchmetrics, clean-fid and torch-fidelity on the *same* feature matrices
  (relative 1e-6), which pins our conventions to theirs,
* one-line ArgenErrors for bad input.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import argen.eval.metrics as metrics_module
from argen.errors import ArgenError, DatasetError
from argen.eval import feature_statistics, frechet_distance, inception_score, precision_recall

torch.set_num_threads(1)

REL = 1e-6


def correlated_features(seed: int, n: int = 2000, d: int = 32, shift: float = 0.0) -> np.ndarray:
    """Gaussian features with a non-trivial, full-rank covariance (mixing matrix A)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / math.sqrt(d) + np.eye(d)
    return rng.normal(size=(n, d)) @ a + shift + rng.normal(size=d)


@pytest.fixture(scope="module")
def feats():
    return correlated_features(0), correlated_features(1, shift=0.3)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


class Features(torch.nn.Module):
    """A "feature extractor" for torchmetrics whose input already is the feature matrix.

    torchmetrics feeds update()'s tensor to the module unchanged (custom module,
    normalize=False), so this lets it see exactly the matrices our functions see.
    ``num_features`` stops FrechetInceptionDistance from probing it with a dummy image.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def assert_rel(ours: float, theirs: float, rel: float = REL) -> None:
    assert ours == pytest.approx(theirs, rel=rel, abs=0), f"ours {ours!r} vs reference {theirs!r}"


# --------------------------------------------------------------------------- FID properties


def test_fid_of_a_set_with_itself_is_zero(feats):
    a, _ = feats
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9 * np.trace(np.cov(a, rowvar=False)))


def test_fid_closed_form_for_diagonal_gaussians():
    # For N(mu1, diag v1) and N(mu2, diag v2): FD = |mu1 - mu2|^2 + sum (sqrt v1 - sqrt v2)^2.
    rng = np.random.default_rng(3)
    d = 50
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 4.0, size=d), rng.uniform(0.1, 4.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert_rel(frechet_distance((mu1, np.diag(v1)), (mu2, np.diag(v2))), expected, rel=1e-12)


def test_fid_matches_symmetric_square_root_form():
    # Independent route to tr sqrt(S1 S2): tr sqrt(S1^1/2 S2 S1^1/2) with eigh, including a
    # rank-deficient covariance (n < d) where the eigenvalues of S1 S2 are ~0 or noisy.
    def sym_sqrt(s):
        w, v = np.linalg.eigh(s)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    for n1, n2 in [(3000, 3000), (20, 3000)]:
        a, b = correlated_features(4, n=n1), correlated_features(5, n=n2, shift=0.1)
        (m1, s1), (m2, s2) = feature_statistics(a), feature_statistics(b)
        root = sym_sqrt(s1)
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
        expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
        assert_rel(frechet_distance(a, b), expected, rel=1e-8)


def test_fid_symmetric_shift_and_rotation(feats):
    a, b = feats
    fd = frechet_distance(a, b)
    assert_rel(frechet_distance(b, a), fd, rel=1e-10)
    # A constant shift c changes only the means: FD(x, x + c) = |c|^2.
    c = np.linspace(-1, 1, a.shape[1])
    assert_rel(frechet_distance(a, a + c), float(c @ c), rel=1e-8)
    # Rotating both sets by the same orthogonal matrix leaves FD unchanged.
    q, _ = np.linalg.qr(np.random.default_rng(6).normal(size=(a.shape[1],) * 2))
    assert_rel(frechet_distance(a @ q, b @ q), fd, rel=1e-9)


def test_fid_accepts_matrices_stats_pairs_and_tensors(feats):
    a, b = feats
    fd = frechet_distance(a, b)
    assert frechet_distance(feature_statistics(a), b) == pytest.approx(fd, rel=1e-12)
    assert frechet_distance(a, list(feature_statistics(b))) == pytest.approx(fd, rel=1e-12)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(fd, rel=1e-12)
    # float32 tensors are promoted to float64 before any statistic is taken.
    a32, b32 = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    assert frechet_distance(a32, b32) == frechet_distance(a32.double().numpy(), b32.double().numpy())


def test_feature_statistics_are_float64_mean_and_unbiased_cov():
    x = correlated_features(7, n=100, d=5).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mu, x64.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(sigma, (x64 - mu).T @ (x64 - mu) / (len(x) - 1), rtol=1e-12)
    assert feature_statistics(x[:, :1])[1].shape == (1, 1)


# --------------------------------------------------------------------------- IS properties


def test_is_is_one_for_identical_predictions():
    one_hot = np.zeros((200, 10))
    one_hot[:, 3] = 1.0
    mean, std = inception_score(one_hot)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    assert inception_score(np.full((200, 10), 0.1))[0] == pytest.approx(1.0, abs=1e-12)


def test_is_is_k_for_confident_balanced_predictions():
    k = 10
    one_hot = np.eye(k)[np.arange(1000) % k]  # every split of 100 consecutive rows is balanced
    assert inception_score(one_hot, splits=10, seed=None) == pytest.approx((k, 0.0), abs=1e-9)
    assert inception_score(one_hot, splits=1)[0] == pytest.approx(k, abs=1e-9)
    assert math.isnan(inception_score(one_hot, splits=1)[1])


def test_is_lies_between_one_and_k():
    rng = np.random.default_rng(8)
    for alpha in (0.05, 0.5, 5.0):
        probs = rng.dirichlet(np.full(10, alpha), size=500)
        mean, std = inception_score(probs, splits=5)
        assert 1.0 < mean < 10.0 and std >= 0.0


def test_is_shuffles_by_default_so_class_sorted_samples_do_not_collapse():
    sorted_one_hot = np.eye(10)[np.repeat(np.arange(10), 100)]  # generated class by class
    assert inception_score(sorted_one_hot, seed=None)[0] == pytest.approx(1.0)  # one class per split
    assert inception_score(sorted_one_hot)[0] > 9.0
    assert inception_score(sorted_one_hot, seed=1) == inception_score(sorted_one_hot, seed=1)


# --------------------------------------------------------------------------- precision / recall


def test_precision_recall_of_a_set_with_itself_is_one(feats):
    a, _ = feats
    assert precision_recall(a[:500], a[:500]) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero(feats):
    a, b = feats
    assert precision_recall(a[:500], b[:500] + 1e3) == (0.0, 0.0)


def test_precision_recall_radius_excludes_self_and_boundary_counts():
    # 1-D, k=1. Real radii (nearest other point): 0->1, 1->1, 3->2.
    # Fake 0.5 is inside the ball of 0; fake 5 is exactly on the boundary of 3's ball (counts);
    # fake 6 is outside every ball -> precision 2/3. Fake radii: 0.5->4.5, 5->1, 6->1, and
    # every real point is within 4.5 of 0.5 -> recall 1.
    real = np.array([[0.0], [1.0], [3.0]])
    fake = np.array([[0.5], [5.0], [6.0]])
    assert precision_recall(real, fake, k=1) == pytest.approx((2 / 3, 1.0))


def naive_precision_recall(real, fake, k):
    """Direct transcription of the definition, full distance matrices, no tricks."""
    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # index 0 is the point itself
    d = np.sqrt(((real[:, None, :] - fake[None, :, :]) ** 2).sum(-1))  # [real, fake]
    precision = (d <= radii(real)[:, None]).any(axis=0).mean()
    recall = (d <= radii(fake)[None, :]).any(axis=1).mean()
    return precision, recall


def test_precision_recall_blocked_computation_matches_definition(monkeypatch):
    real = correlated_features(9, n=300, d=8)
    fake = correlated_features(10, n=250, d=8, shift=0.5)
    expected = naive_precision_recall(real, fake, k=3)
    assert precision_recall(real, fake) == pytest.approx(expected, abs=0)
    # Force many small blocks (7 rows at a time) to exercise the batching logic.
    monkeypatch.setattr(metrics_module, "_BLOCK_ELEMENTS", 7 * 300)
    assert precision_recall(real, fake) == pytest.approx(expected, abs=0)


# --------------------------------------------------------------------------- agreement with other tools


def test_fid_agrees_with_torchmetrics(feats):
    fid_mod = pytest.importorskip("torchmetrics.image.fid")
    a, b = feats
    metric = fid_mod.FrechetInceptionDistance(feature=Features(a.shape[1]))
    for chunk in np.array_split(a, 3):  # streaming updates, as in a real evaluation loop
        metric.update(torch.from_numpy(chunk), real=True)
    metric.update(torch.from_numpy(b), real=False)
    theirs = metric.compute()
    assert theirs.dtype == torch.float64
    assert_rel(frechet_distance(a, b), float(theirs))


def test_fid_agrees_with_clean_fid(feats):
    cleanfid_fid = pytest.importorskip("cleanfid.fid")
    a, b = feats
    (m1, s1), (m2, s2) = feature_statistics(a), feature_statistics(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # its sqrtm(disp=False)
        try:
            theirs = cleanfid_fid.frechet_distance(m1, s1, m2, s2)
        except TypeError as exc:  # SciPy >= 1.18 removed sqrtm's `disp`
            pytest.skip(f"clean-fid's frechet_distance does not run on this SciPy: {exc}")
    assert_rel(frechet_distance(a, b), float(theirs))


def test_fid_agrees_with_torch_fidelity(feats):
    tf_fid = pytest.importorskip("torch_fidelity.metric_fid")
    a, b = feats
    stats_a = tf_fid.fid_features_to_statistics(torch.from_numpy(a))
    stats_b = tf_fid.fid_features_to_statistics(torch.from_numpy(b))
    mu, sigma = feature_statistics(a)
    np.testing.assert_allclose(stats_a["mu"], mu, rtol=1e-13)
    np.testing.assert_allclose(stats_a["sigma"], sigma, rtol=1e-12, atol=1e-14)
    theirs = tf_fid.fid_statistics_to_metric(stats_a, stats_b, verbose=False)[tf_fid.KEY_METRIC_FID]
    assert_rel(frechet_distance(a, b), theirs)


@pytest.fixture(scope="module")
def logits():
    return np.random.default_rng(11).normal(scale=2.0, size=(1000, 10))


def test_is_agrees_with_torchmetrics(logits):
    inception_mod = pytest.importorskip("torchmetrics.image.inception")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "will save all extracted features in buffer"
        metric = inception_mod.InceptionScore(feature=Features(10), splits=10)
    metric.update(torch.from_numpy(logits))  # it applies softmax itself
    # torchmetrics permutes rows with the global torch RNG; draw the same permutation first.
    torch.manual_seed(1234)
    perm = torch.randperm(len(logits)).numpy()
    torch.manual_seed(1234)
    mean_tm, std_tm = metric.compute()
    mean, std = inception_score(softmax(logits)[perm], splits=10, seed=None)
    assert_rel(mean, float(mean_tm))
    assert_rel(std, float(std_tm))


def test_is_agrees_with_torch_fidelity(logits):
    tf_isc = pytest.importorskip("torch_fidelity.metric_isc")
    for n in (1000, 997):  # 997: uneven split boundaries i*N//splits
        out = tf_isc.isc_features_to_metric(torch.from_numpy(logits[:n]), splits=10, shuffle=False)
        mean, std = inception_score(softmax(logits[:n]), splits=10, seed=None)
        assert_rel(mean, out[tf_isc.KEY_METRIC_ISC_MEAN])
        # torch-fidelity's std uses ddof=0, ours ddof=1 (torchmetrics).
        assert_rel(std * math.sqrt(9 / 10), out[tf_isc.KEY_METRIC_ISC_STD])


def test_precision_recall_agrees_with_torch_fidelity():
    tf_prc = pytest.importorskip("torch_fidelity.metric_prc")
    real = correlated_features(12, n=600, d=16)
    fake = correlated_features(13, n=500, d=16, shift=0.4)
    # torch-fidelity's convention: features_1 = generated, features_2 = real.
    theirs = tf_prc.calculate_precision_recall_full(torch.from_numpy(fake), torch.from_numpy(real), neighborhood=3)
    # Same counts; torch-fidelity's fractions pass through float32 (.float().mean()), hence
    # abs 1e-6, far below one sample (1/600).
    assert precision_recall(real, fake, k=3) == pytest.approx(theirs, abs=1e-6)


# --------------------------------------------------------------------------- input errors


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ArgenError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_fid_input_errors(feats):
    a, b = feats
    assert "dimensions differ" in _one_line_error(frechet_distance, a, b[:, :10])
    assert "dimensions differ" in _one_line_error(frechet_distance, feature_statistics(a), feature_statistics(b[:, :10]))
    assert "at least 2" in _one_line_error(frechet_distance, a[:1], b)
    bad = a.copy()
    bad[5, 3] = np.nan
    assert "NaN" in _one_line_error(frechet_distance, a, bad)
    assert "NaN" in _one_line_error(frechet_distance, (np.full(3, np.nan), np.eye(3)), (np.zeros(3), np.eye(3)))
    assert "2-D" in _one_line_error(frechet_distance, a[0], b)
    assert "covariance shape" in _one_line_error(frechet_distance, (np.zeros(3), np.eye(4)), b)
    assert "numeric" in _one_line_error(feature_statistics, [["x", "y"], ["z", "w"]])


def test_is_input_errors(logits):
    probs = softmax(logits)
    assert "logits" in _one_line_error(inception_score, logits)
    assert "sum to 1" in _one_line_error(inception_score, probs * 0.5)
    assert "at least 10" in _one_line_error(inception_score, probs[:5], splits=10)
    assert "splits" in _one_line_error(inception_score, probs, splits=0)
    bad = probs.copy()
    bad[0, 0] = np.nan
    assert "NaN" in _one_line_error(inception_score, bad)


def test_precision_recall_input_errors(feats):
    a, b = feats
    assert "dimensions differ" in _one_line_error(precision_recall, a[:50], b[:50, :3])
    assert "at least 4" in _one_line_error(precision_recall, a[:3], b[:50])
    assert "k must" in _one_line_error(precision_recall, a[:50], b[:50], k=0)
    bad = b[:50].copy()
    bad[0, 0] = np.inf
    assert "infinite" in _one_line_error(precision_recall, a[:50], bad)


# --------------------------------------------------------------------------- shipped classifier


@pytest.fixture(scope="module")
def fmnist_test_images():
    from argen.data.fashion_mnist import load_fashion_mnist, to_model_range

    try:
        images, labels = load_fashion_mnist("test")
    except DatasetError as exc:
        pytest.skip(f"Fashion-MNIST test split not available: {exc}")
    return to_model_range(images[:2000]).unsqueeze(1), labels[:2000]


def test_shipped_classifier_accuracy_and_outputs(fmnist_test_images):
    from argen.data.fashion_mnist import pad_image
    from argen.eval import FMNISTClassifier
    from argen.eval.fmnist_classifier import ASSET_DIR, load_fmnist_classifier

    weights = ASSET_DIR / "diffusion_pytorch_model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 2 * 1024 * 1024
    assert (ASSET_DIR / "MODEL_CARD.md").is_file()
    clf = load_fmnist_classifier()
    assert isinstance(clf, FMNISTClassifier) and not clf.training

    images, labels = fmnist_test_images
    with torch.no_grad():
        logits = clf(images)
        accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
        assert accuracy >= 0.93, f"shipped classifier: {accuracy:.4f} on the first 2000 test images"
        # 32x32 padded input (what generators produce) is center-cropped back to the same pixels.
        padded = torch.stack([pad_image(img, 32) for img in images[:64]])
        torch.testing.assert_close(clf(padded), logits[:64])
        feats = clf.features(images[:64])
        probs = clf.probs(images[:64])
    assert feats.shape == (64, clf.config.feature_dim)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(64))

    with pytest.raises(ArgenError):
        clf(torch.zeros(2, 1, 30, 30))


def test_classifier_features_through_torchmetrics(fmnist_test_images):
    """End to end: torchmetrics' FID with our classifier as feature extractor equals ours."""
    fid_mod = pytest.importorskip("torchmetrics.image.fid")
    from argen.eval.fmnist_classifier import load_fmnist_classifier

    clf = load_fmnist_classifier()

    class Penultimate(torch.nn.Module):
        num_features = clf.config.feature_dim

        def forward(self, x):
            return clf.features(x)

    images, _ = fmnist_test_images
    real, fake = images[:600], images[1000:1600]
    metric = fid_mod.FrechetInceptionDistance(feature=Penultimate())
    with torch.no_grad():
        metric.update(real, real=True)
        metric.update(fake, real=False)
        theirs = float(metric.compute())  # float64 inside, returned as float32 like the features
        ours = frechet_distance(clf.features(real), clf.features(fake))
    assert_rel(ours, theirs, rel=1e-6)


def test_classifier_save_and_load_roundtrip(tmp_path):
    from argen.eval import FMNISTClassifier

    torch.manual_seed(0)
    model = FMNISTClassifier(channels=(4, 8, 8), feature_dim=16).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    loaded = FMNISTClassifier.from_pretrained(tmp_path).eval()
    assert tuple(loaded.config.channels) == (4, 8, 8)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(loaded(x), model(x))
