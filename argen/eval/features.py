"""Feature extractors for FID / IS / precision-recall, behind one interface.

An extractor turns uint8 images into a float64 feature matrix ``[N, D]`` (the input of
:func:`argen.eval.metrics.frechet_distance` and :func:`~argen.eval.metrics.precision_recall`)
and, when it has a classifier head, class probabilities ``[N, K]`` (the input of
:func:`~argen.eval.metrics.inception_score` and of class accuracy).

Two extractors exist:

* ``fmnist`` (:class:`FMNISTExtractor`): the shipped Fashion-MNIST classifier. Features are
  its 128-d penultimate layer, probabilities its 10-way softmax. Takes 28x28 or 32x32
  (padded) grayscale images, no resizing. This is the metric used for argen's own models.
* ``inception`` (:class:`InceptionExtractor`): the 2015 TF-Inception network every FID paper
  uses (2048-d pool3 features, 1008-way softmax of the bias-free logits for IS), loaded from
  a weights file the user supplies: argen never downloads it. Two protocols:

  - ``adm`` (alias ``torch-fidelity``): torch-fidelity's Inception port with its TF1-exact
    bilinear resize to 299, i.e. the protocol of the ADM evaluator (and so of LlamaGen's
    numbers), of torch-fidelity and of torchmetrics with ``antialias=False``. Weights file:
    torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (a plain state dict).
  - ``clean``: clean-fid's "clean" mode: per-channel PIL bicubic resize in float32 without
    re-quantisation, then the same network. **A different metric**: its numbers are not
    comparable with ADM/LlamaGen FIDs. Weights file: NVIDIA's TorchScript
    ``inception-2015-12-05.pt`` (what clean-fid loads) or the torch-fidelity state dict.

Every extractor has an :meth:`~FeatureExtractor.identity` (name, protocol, feature size and
the sha256 of its weights) that reference statistics record, so statistics computed with one
network are never compared with samples scored by another.

Images may be given as a uint8 array or tensor ``[N, H, W]`` / ``[N, H, W, C]`` (C = 1 or 3)
or a list of PIL images; grayscale is replicated to RGB for Inception.
"""

from __future__ import annotations

import abc
import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from argen.errors import ArgenError, CheckpointError

__all__ = [
    "FeatureExtractor",
    "FMNISTExtractor",
    "InceptionExtractor",
    "INCEPTION_ENV",
    "INCEPTION_PROTOCOLS",
    "EXTRACTORS",
    "as_uint8_images",
    "file_sha256",
    "get_extractor",
]

#: Environment variable naming the Inception weights file when --inception-weights is not given.
INCEPTION_ENV = "ARGEN_INCEPTION_WEIGHTS"

#: protocol name -> canonical name ("torch-fidelity" is the same computation as "adm").
INCEPTION_PROTOCOLS = {"adm": "adm", "torch-fidelity": "adm", "legacy-tf": "adm", "clean": "clean"}

#: Extractor names accepted by :func:`get_extractor` and the CLI.
EXTRACTORS = ("fmnist", "inception")

_INCEPTION_FILES = ("weights-inception-2015-12-05-6726825d.pth (torch-fidelity's state dict; protocols adm/clean) "
                    "or inception-2015-12-05.pt (clean-fid's TorchScript; protocol clean)")
_INCEPTION_SIZE = 299


# --------------------------------------------------------------------------- helpers


def file_sha256(path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def as_uint8_images(images: Any, what: str = "images") -> np.ndarray:
    """Bring images to one uint8 array ``[N, H, W, C]`` (C = 1 or 3), or fail in one line.

    Accepts a uint8 numpy array or torch tensor ``[N, H, W]`` / ``[N, H, W, C]``, or a
    sequence of PIL images that all have the same size and mode (L or RGB; RGBA, palette
    and 16-bit images are rejected rather than silently converted).
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ArgenError(f"no {what} given")
        if all(hasattr(im, "mode") and hasattr(im, "size") for im in images):
            return _pil_to_array(images, what)
        arrays = [np.asarray(im) for im in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ArgenError(f"{what} mix shapes: {', '.join(str(s) for s in sorted(shapes))}")
        images = np.stack(arrays)
    if hasattr(images, "detach") and hasattr(images, "cpu"):
        images = images.detach().cpu().numpy()
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ArgenError(f"{what} must be uint8 [N, H, W(, C)], got dtype {arr.dtype} "
                         "(convert [-1, 1] floats with argen.pipeline.to_uint8)")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ArgenError(f"{what} must be [N, H, W] or [N, H, W, C] with C = 1 or 3, got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise ArgenError(f"no {what} given")
    return arr


def _pil_to_array(images: Sequence, what: str) -> np.ndarray:
    first = images[0]
    for i, im in enumerate(images):
        if im.mode not in ("L", "RGB"):
            raise ArgenError(f"{what}[{i}] has mode {im.mode}; only 8-bit grayscale (L) or RGB images are scored")
        if im.size != first.size or im.mode != first.mode:
            raise ArgenError(f"{what} mix sizes or modes: [0] is {first.size[0]}x{first.size[1]} {first.mode}, "
                             f"[{i}] is {im.size[0]}x{im.size[1]} {im.mode}")
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return arr[..., None] if arr.ndim == 3 else arr


def _gray(arr: np.ndarray, who: str) -> np.ndarray:
    """[N, H, W, C] -> [N, H, W]: RGB is accepted only when the three channels are equal."""
    if arr.shape[-1] == 1:
        return arr[..., 0]
    if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
        raise ArgenError(f"the {who} extractor scores grayscale images; got RGB images with colour")
    return arr[..., 0]


def _rgb(arr: np.ndarray) -> np.ndarray:
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


# --------------------------------------------------------------------------- interface


class FeatureExtractor(abc.ABC):
    """``features(images) -> float64 [N, D]``; ``probs(images) -> float64 [N, K]`` or None.

    Attributes: ``name`` ("fmnist", "inception"), ``protocol`` (how pixels reach the network),
    ``feature_dim`` (D), ``num_classes`` (K, or None without a classifier head),
    ``weights_sha256``. Subclasses implement :meth:`_forward` on one uint8 batch.
    """

    name: str = "extractor"
    protocol: str = ""
    feature_dim: int = 0
    num_classes: Optional[int] = None
    weights_path: Optional[str] = None
    weights_sha256: Optional[str] = None
    batch_size: int = 64

    def identity(self) -> dict:
        """What identifies the numbers this extractor produces (recorded in reference statistics)."""
        return {"extractor": self.name, "protocol": self.protocol, "feature_dim": int(self.feature_dim),
                "weights_sha256": self.weights_sha256}

    @property
    def key(self) -> str:
        """Short stable name for cache files: ``<name>-<protocol>-<sha256[:12]>``."""
        return f"{self.name}-{self.protocol}-{(self.weights_sha256 or 'noweights')[:12]}"

    def describe(self) -> str:
        return f"{self.name} ({self.protocol}, {self.feature_dim}-d, weights sha256 {self.weights_sha256})"

    def extract(self, images: Any, batch_size: Optional[int] = None,
                desc: Optional[str] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """``(features float64 [N, D], probs float64 [N, K] or None)`` in one pass over the images.
        ``desc``: show progress under this name (a bar in a terminal, a line every few seconds in a log)."""
        from ..progress import progress

        arr = as_uint8_images(images)
        bs = int(batch_size or self.batch_size)
        feats, probs = [], []
        starts = range(0, len(arr), bs)
        for lo in progress(starts, desc=desc or "", unit="batches", enabled=desc is not None):
            f, p = self._forward(arr[lo:lo + bs])
            feats.append(np.asarray(f, dtype=np.float64))
            if p is not None:
                probs.append(np.asarray(p, dtype=np.float64))
        out_p = np.concatenate(probs) if probs else None
        return np.concatenate(feats), out_p

    def features(self, images: Any) -> np.ndarray:
        return self.extract(images)[0]

    def probs(self, images: Any) -> Optional[np.ndarray]:
        return self.extract(images)[1]

    @abc.abstractmethod
    def _forward(self, batch: np.ndarray):
        """One uint8 batch [B, H, W, C] -> (features [B, D], probs [B, K] or None), numpy or tensors."""


# --------------------------------------------------------------------------- Fashion-MNIST classifier


class FMNISTExtractor(FeatureExtractor):
    """The shipped Fashion-MNIST classifier: 128-d penultimate features, 10-way softmax.

    Grayscale 28x28 (Fashion-MNIST) or 32x32 (argen's padded samples, center-cropped back to
    28x28 by the classifier) images; pixels map to [-1, 1] as ``u / 127.5 - 1``.
    """

    name = "fmnist"
    protocol = "classifier"
    batch_size = 500

    def __init__(self, classifier=None, path=None, device="cpu"):
        import torch

        from .fmnist_classifier import ASSET_DIR, load_fmnist_classifier

        self._torch = torch
        self.model = classifier if classifier is not None else load_fmnist_classifier(path, device=device)
        self.model.eval()
        self.device = next(self.model.parameters()).device
        self.feature_dim = int(self.model.config.feature_dim)
        self.num_classes = int(self.model.config.num_classes)
        folder = Path(path) if path is not None else ASSET_DIR
        weights = folder / "diffusion_pytorch_model.safetensors"
        if classifier is None and weights.is_file():
            self.weights_path = str(weights)
            self.weights_sha256 = file_sha256(weights)
        else:  # an in-memory model: identify it by its tensors
            digest = hashlib.sha256()
            for key, value in sorted(self.model.state_dict().items()):
                digest.update(key.encode())
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
            self.weights_sha256 = digest.hexdigest()

    def _forward(self, batch: np.ndarray):
        torch = self._torch
        gray = _gray(batch, self.name)
        x = torch.from_numpy(np.ascontiguousarray(gray)).to(self.device).float().div(127.5).sub(1.0)[:, None]
        with torch.no_grad():
            feats = self.model.features(x)
            probs = torch.softmax(self.model.head(feats).double(), dim=-1)  # eval mode: dropout is identity
        return feats.double().cpu().numpy(), probs.cpu().numpy()


# --------------------------------------------------------------------------- Inception


def resolve_inception_weights(path=None) -> Path:
    """The weights file from the argument or $ARGEN_INCEPTION_WEIGHTS; one-line error if absent."""
    source = "--inception-weights"
    if path is None or str(path) == "":
        path = os.environ.get(INCEPTION_ENV) or None
        source = f"${INCEPTION_ENV}"
    if path is None:
        raise ArgenError(f"the inception extractor needs the 2015 TF-Inception weights, which argen never downloads: "
                         f"pass --inception-weights PATH or set {INCEPTION_ENV} to {_INCEPTION_FILES}")
    resolved = Path(os.path.expanduser(str(path)))
    if not resolved.is_file():
        where = "a directory, not a file" if resolved.is_dir() else "no such file"
        raise ArgenError(f"Inception weights file {resolved} (from {source}) not found: {where}; "
                         f"expected {_INCEPTION_FILES}")
    return resolved


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips with a code/ folder; torch.save state dicts have data.pkl only."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name or name.startswith("code/") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _fidelity_inception(state=None):
    """torch-fidelity's FeatureExtractorInceptionV3 built offline from a state dict we loaded
    (its constructor otherwise downloads the weights, or unpickles a given path unsafely);
    with ``state=None`` the layers only, weights left at their initialisation."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    cls = fidelity.FeatureExtractorInceptionV3
    if state is None:
        class ArchitectureOnly(cls):
            def load_state_dict(self, *args, **kwargs):
                return None

        cls = ArchitectureOnly
    # The constructor's download call hands over our state dict instead; its own strict
    # load_state_dict, dtype cast and eval() then run as usual.
    with mock.patch.object(fidelity, "load_state_dict_from_url", lambda *a, **k: state if state is not None else {}):
        return cls("argen-inception", ["2048", "logits_unbiased"])


def _load_fidelity_net(path: Path, device):
    """torch-fidelity's FeatureExtractorInceptionV3 with the user's state dict.

    The file is opened once, with ``weights_only=True`` (plain tensors only, no code can run),
    and its keys checked, so a wrong or malicious file fails here in one line. torch-fidelity
    never sees the path: given one, it would unpickle it with ``weights_only=False``.
    """
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"Inception weights {path} are not a readable PyTorch state dict ({first[:200]})") from None
    if not isinstance(state, dict) or not state or not all(hasattr(v, "shape") for v in state.values()):
        raise CheckpointError(f"Inception weights {path} do not hold a state dict of tensors")
    for key, shape in (("Conv2d_1a_3x3.conv.weight", (32, 3, 3, 3)), ("fc.weight", (1008, 2048)),
                       ("Mixed_7c.branch_pool.conv.weight", (192, 2048, 1, 1))):
        if key not in state or tuple(state[key].shape) != shape:
            got = tuple(state[key].shape) if key in state else "missing"
            raise CheckpointError(f"Inception weights {path} are not the 2015 TF-Inception in torch-fidelity's layout "
                                  f"({key}: {got}, expected {shape})")
    try:
        net = _fidelity_inception(state)
    except RuntimeError as exc:  # load_state_dict: missing / unexpected / mis-shaped keys
        first = str(exc).splitlines()
        raise CheckpointError(f"Inception weights {path} do not match torch-fidelity's Inception: "
                              f"{' '.join(first[:2])[:300]}") from None
    return net.to(device).eval()


def write_random_inception_weights(path, seed: int = 0) -> Path:
    """Write a randomly initialised state dict in torch-fidelity's Inception layout (the real file's
    format), for offline tests and speed measurements; its features mean nothing.

    He-scaled weights keep activations O(1) through the 90-odd layers, so features still differ
    between images (PyTorch's default init makes them vanish to ~1e-8).
    """
    import torch

    net = _fidelity_inception()
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith("conv.weight") or key == "fc.weight":
            value = torch.randn(value.shape, generator=gen) * (2.0 / value[0].numel()) ** 0.5
        elif key.endswith("bn.bias") or key == "fc.bias":
            value = 0.1 * torch.randn(value.shape, generator=gen)
        state[key] = value.clone()
    path = Path(path)
    torch.save(state, path)
    return path


# The trunk of torch-fidelity's InceptionV3, pool3 output (used when our code does the resize).
_TRUNK = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
          "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
          "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


def clean_resize(batch: np.ndarray, size: int = _INCEPTION_SIZE) -> np.ndarray:
    """clean-fid's "clean" resize: each channel as a float32 PIL image ('F'), bicubic to
    ``size`` x ``size`` (PIL's bicubic antialiases when downsampling), clipped to [0, 255],
    not re-quantised. ``[B, H, W, 3]`` uint8 -> ``[B, size, size, 3]`` float32."""
    from PIL import Image

    out = np.empty((len(batch), size, size, batch.shape[-1]), dtype=np.float32)
    for i, image in enumerate(batch):
        for c in range(image.shape[-1]):
            channel = Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
            out[i, :, :, c] = np.asarray(channel.resize((size, size), resample=Image.BICUBIC)).clip(0, 255)
    return out


class InceptionExtractor(FeatureExtractor):
    """The 2015 TF-Inception FID network from a user-supplied weights file (never downloaded).

    ``protocol="adm"`` (= "torch-fidelity"): torch-fidelity's forward (TF1 bilinear resize to
    299, ``(x - 128) / 128``) - the ADM evaluator / LlamaGen protocol. ``protocol="clean"``:
    clean-fid's float bicubic PIL resize, then the same network; a different metric.
    Features: 2048-d pool3. Probs: softmax of the 1008 bias-free logits (as ADM and
    torch-fidelity compute IS), except for clean with the TorchScript file (no probs).
    """

    name = "inception"
    feature_dim = 2048
    batch_size = 32

    def __init__(self, weights=None, protocol: str = "adm", device="cpu"):
        import torch

        if protocol not in INCEPTION_PROTOCOLS:
            raise ArgenError(f"unknown Inception protocol {protocol!r}; choose one of {', '.join(INCEPTION_PROTOCOLS)}")
        self._torch = torch
        self.protocol = INCEPTION_PROTOCOLS[protocol]
        self.device = torch.device(device)
        path = resolve_inception_weights(weights)
        self.weights_path = str(path)
        self.weights_sha256 = file_sha256(path)
        self.torchscript = _is_torchscript(path)
        if self.torchscript:
            if self.protocol != "clean":
                raise ArgenError(f"{path} is a TorchScript Inception (clean-fid's inception-2015-12-05.pt), which serves "
                                 "protocol 'clean' only; for 'adm' pass torch-fidelity's "
                                 "weights-inception-2015-12-05-6726825d.pth")
            try:
                base = torch.jit.load(str(path), map_location="cpu").eval()
                self.net = base.layers.to(self.device)
            except Exception as exc:  # noqa: BLE001
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise CheckpointError(f"{path} is not clean-fid's TorchScript Inception ({first[:200]})") from None
            self.num_classes = None
        else:
            self.net = _load_fidelity_net(path, self.device)
            self.num_classes = 1008

    def identity(self) -> dict:
        ident = super().identity()
        ident["weights_format"] = "torchscript" if self.torchscript else "state_dict"
        return ident

    def _forward(self, batch: np.ndarray):
        torch = self._torch
        rgb = _rgb(batch)
        with torch.no_grad():
            if self.protocol == "adm":
                x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).contiguous().to(self.device)
                feats, logits = self.net(x)  # asserts uint8 and does the TF1 resize itself
            else:
                x = torch.from_numpy(clean_resize(rgb)).permute(0, 3, 1, 2).contiguous().to(self.device)
                x = (x - 128) / 128
                if self.torchscript:
                    return self.net(x).reshape(len(x), 2048).double().cpu().numpy(), None
                for name in _TRUNK:
                    x = getattr(self.net, name)(x)
                feats = torch.flatten(x, 1)
                logits = feats.mm(self.net.fc.weight.T)
            probs = torch.softmax(logits.double(), dim=-1)
        return feats.double().cpu().numpy(), probs.cpu().numpy()


# --------------------------------------------------------------------------- factory


def get_extractor(name: str = "fmnist", *, protocol: Optional[str] = None, inception_weights=None,
                  device="cpu", batch_size: Optional[int] = None) -> FeatureExtractor:
    """An extractor by name: ``fmnist`` or ``inception`` (protocol adm | torch-fidelity | clean).

    ``batch_size``: images per network call (default 500 for fmnist, 32 for Inception)."""
    if batch_size is not None and batch_size < 1:
        raise ArgenError(f"feature batch size must be >= 1, got {batch_size}")
    if name == "fmnist":
        if protocol not in (None, "", "classifier"):
            raise ArgenError(f"the fmnist extractor has no protocol {protocol!r} (protocols are for --extractor inception)")
        if inception_weights:
            raise ArgenError("--inception-weights is only used with --extractor inception")
        extractor = FMNISTExtractor(device=device)
    elif name == "inception":
        extractor = InceptionExtractor(inception_weights, protocol or "adm", device=device)
    else:
        raise ArgenError(f"unknown extractor {name!r}; choose one of {', '.join(EXTRACTORS)}")
    if batch_size:
        extractor.batch_size = int(batch_size)
    return extractor
