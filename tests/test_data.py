"""Tests for argen.data: Fashion-MNIST loading, captions and the image-folder dataset."""

from __future__ import annotations

import gzip
import json
import random
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from argen.data import (
    CLASS_NAMES,
    HELDOUT_PROMPTS,
    FashionMNIST,
    ImageFolderDataset,
    all_train_captions,
    attribute_for,
    default_root,
    load_fashion_mnist,
    resolve_class,
    train_caption,
)
from argen.data import captions
from argen.errors import ArgenError, DatasetError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
requires_fashion_mnist = pytest.mark.skipif(
    not DEBIAN_DIR.is_dir(),
    reason=f"{DEBIAN_DIR} absent; install with `apt-get install -y dataset-fashion-mnist`",
)


def assert_one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- real files


@requires_fashion_mnist
def test_train_split_shapes_counts_and_histogram():
    images, labels = load_fashion_mnist("train", DEBIAN_DIR)
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == [6000] * 10
    assert int(images.min()) == 0 and int(images.max()) == 255


@requires_fashion_mnist
def test_test_split_counts_and_histogram():
    images, labels = load_fashion_mnist("test", DEBIAN_DIR)
    assert images.shape == (10000, 28, 28)
    assert torch.bincount(labels, minlength=10).tolist() == [1000] * 10


@requires_fashion_mnist
def test_loads_are_cached_but_return_independent_tensors():
    first, _ = load_fashion_mnist("test", DEBIAN_DIR)
    first.zero_()
    second, _ = load_fashion_mnist("test", DEBIAN_DIR)
    assert int(second.max()) == 255


@requires_fashion_mnist
def test_dataset_items_are_padded_with_background():
    ds = FashionMNIST("test", root=DEBIAN_DIR)
    item = ds[0]
    image = item["image"]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    border = torch.cat([image[:, :2].flatten(), image[:, -2:].flatten(), image[:, :, :2].flatten(), image[:, :, -2:].flatten()])
    assert torch.all(border == -1)
    raw, labels = load_fashion_mnist("test", DEBIAN_DIR)
    assert torch.allclose(image[0, 2:30, 2:30], raw[0].float() / 127.5 - 1)
    assert item["label"] == int(labels[0]) and "caption" not in item
    assert FashionMNIST("test", root=DEBIAN_DIR, pad_to=None)[0]["image"].shape == (1, 28, 28)
    assert FashionMNIST("test", root=DEBIAN_DIR, pad_to=28)[0]["image"].shape == (1, 28, 28)


@requires_fashion_mnist
def test_dataset_captions_are_deterministic_and_seeded():
    a = FashionMNIST("test", root=DEBIAN_DIR, captions=True, seed=0)
    b = FashionMNIST("test", root=DEBIAN_DIR, captions=True, seed=0)
    c = FashionMNIST("test", root=DEBIAN_DIR, captions=True, seed=1)
    first = [a[i]["caption"] for i in range(50)]
    assert first == [b[i]["caption"] for i in range(50)]
    assert first != [c[i]["caption"] for i in range(50)]
    for i in range(50):
        assert first[i] in all_train_captions(a[i]["label"])
    batch = next(iter(torch.utils.data.DataLoader(a, batch_size=4)))
    assert batch["image"].shape == (4, 1, 32, 32) and len(batch["caption"]) == 4


@requires_fashion_mnist
def test_dark_light_attribute_is_roughly_balanced_on_train():
    images, _ = load_fashion_mnist("train", DEBIAN_DIR)
    arrays = images.numpy()
    dark = sum(attribute_for(image) == "dark" for image in arrays)
    assert 0.3 < dark / len(arrays) < 0.7


# --------------------------------------------------------------------------- crafted files


def write_idx(path: Path, magic: int, array: np.ndarray, cut: int = 0) -> None:
    """Write a gzip IDX file; ``cut`` drops that many bytes from the end of the payload."""
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(payload[: len(payload) - cut])


def write_split(root: Path, n: int = 5, image_magic: int = 2051, label_magic: int = 2049, n_labels=None,
                cut: int = 0, size: int = 28, labels=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    images = np.arange(n * size * size, dtype=np.int64).reshape(n, size, size) % 256
    labels = np.arange(n_labels if n_labels is not None else n) % 10 if labels is None else np.asarray(labels)
    write_idx(root / "t10k-images-idx3-ubyte.gz", image_magic, images, cut=cut)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", label_magic, labels)
    return root


def test_small_valid_files_load(tmp_path):
    images, labels = load_fashion_mnist("test", write_split(tmp_path / "ok"))
    assert images.shape == (5, 28, 28) and labels.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"image_magic": 2049}, "magic number 2049, expected 2051"),
        ({"label_magic": 2051}, "magic number 2051, expected 2049"),
        ({"cut": 100}, "truncated"),
        ({"n_labels": 4}, "5 images but"),
        ({"size": 32}, "32x32 images, expected 28x28"),
        ({"labels": [0, 1, 2, 3, 12]}, "label 12"),
    ],
)
def test_malformed_idx_files_raise_dataset_error(tmp_path, kwargs, expected):
    root = write_split(tmp_path / "bad", **kwargs)
    with pytest.raises(DatasetError) as exc_info:
        load_fashion_mnist("test", root)
    assert expected in assert_one_line(exc_info)


def test_truncated_gzip_stream_and_non_gzip_file(tmp_path):
    root = write_split(tmp_path / "cut")
    path = root / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DatasetError) as exc_info:
        load_fashion_mnist("test", root)
    assert "not a readable gzip file" in assert_one_line(exc_info)

    root = write_split(tmp_path / "plain")
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(b"this is not gzip")
    with pytest.raises(DatasetError):
        load_fashion_mnist("test", root)


def test_header_shorter_than_idx_header(tmp_path):
    root = write_split(tmp_path / "short")
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00")
    with pytest.raises(DatasetError, match="shorter than its IDX header"):
        load_fashion_mnist("test", root)


def test_missing_directory_and_file_name_the_install_command(tmp_path):
    with pytest.raises(DatasetError) as exc_info:
        load_fashion_mnist("train", tmp_path / "nowhere")
    assert "apt-get install -y dataset-fashion-mnist" in assert_one_line(exc_info)

    root = write_split(tmp_path / "half")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError) as exc_info:
        load_fashion_mnist("test", root)
    message = assert_one_line(exc_info)
    assert "t10k-labels-idx1-ubyte.gz" in message and "apt-get install -y dataset-fashion-mnist" in message


def test_bad_split_name(tmp_path):
    with pytest.raises(DatasetError, match="use 'train' or 'test'"):
        load_fashion_mnist("validation", write_split(tmp_path / "ok"))


def test_default_root_honours_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("ARGEN_FASHION_MNIST_DIR", raising=False)
    assert default_root() == DEBIAN_DIR
    root = write_split(tmp_path / "env")
    monkeypatch.setenv("ARGEN_FASHION_MNIST_DIR", str(root))
    assert default_root() == root
    assert len(FashionMNIST("test")) == 5


# --------------------------------------------------------------------------- classes


@pytest.mark.parametrize(
    "spec, expected",
    [
        (0, 0), (9, 9), (np.int64(3), 3), ("7", 7), (" 2 ", 2),
        ("Sneaker", 7), ("sneaker", 7), ("SNEAKERS", 7), ("running shoe", 7), ("trainer", 7),
        ("T-shirt/top", 0), ("t-shirt", 0), ("tshirt", 0), ("top", 0),
        ("Ankle boot", 9), ("ankle-boot", 9), ("boot", 9), ("boots", 9),
        ("trousers", 1), ("Trouser", 1), ("pants", 1), ("handbag", 8), ("dresses", 3), ("jacket", 4),
    ],
)
def test_resolve_class(spec, expected):
    assert resolve_class(spec) == expected


@pytest.mark.parametrize("spec", [10, -1, "10", "-1", "spaceship", "", True, 2.0, None])
def test_resolve_class_rejects_unknown(spec):
    with pytest.raises(ArgenError) as exc_info:
        resolve_class(spec)
    message = assert_one_line(exc_info)
    assert "Ankle boot" in message and "T-shirt/top" in message


def test_every_class_name_and_synonym_resolves_to_its_class():
    for label, name in enumerate(CLASS_NAMES):
        for spelling in (name, *captions.TRAIN_SYNONYMS[label], *captions.HELDOUT_SYNONYMS[label]):
            assert resolve_class(spelling) == label, spelling


# --------------------------------------------------------------------------- captions


def test_train_caption_is_deterministic_and_in_caption_space():
    image = np.full((28, 28), 200, dtype=np.uint8)
    for label in range(10):
        first = [train_caption(label, image, random.Random(i)) for i in range(30)]
        assert first == [train_caption(label, image, random.Random(i)) for i in range(30)]
        space = set(all_train_captions(label))
        assert set(first) <= space
        assert not any("dark" in caption for caption in first)  # a bright item is never "dark"
    no_image = {train_caption(7, None, random.Random(i)) for i in range(50)}
    assert not any("dark" in c or "light" in c for c in no_image)


def test_heldout_prompts_never_appear_in_training():
    for label in range(10):
        prompts = HELDOUT_PROMPTS[label]
        assert len(prompts) >= 5 and len(set(prompts)) == len(prompts)
        assert not set(prompts) & set(all_train_captions(label))
        everything_trained = {c for other in range(10) for c in all_train_captions(other)}
        assert not set(prompts) & everything_trained
    assert not set(captions.HELDOUT_TEMPLATES) & set(captions.TRAIN_TEMPLATES)
    train_synonyms = {s for syns in captions.TRAIN_SYNONYMS.values() for s in syns}
    heldout_synonyms = {s for syns in captions.HELDOUT_SYNONYMS.values() for s in syns}
    assert not train_synonyms & heldout_synonyms


def test_articles_are_correct():
    assert captions.fill("a photo of a {x}", "open-toe shoe") == "a photo of an open-toe shoe"
    assert captions.fill("a {x}", "one-piece dress") == "a one-piece dress"
    assert captions.fill("an image of a {x}, {attr}", "sandal", "dark") == "an image of a sandal, dark"
    for label in range(10):
        for text in all_train_captions(label) + HELDOUT_PROMPTS[label]:
            for article, word in re.findall(r"\b(an?) (\S+)", text):
                vowel_sound = word[0] in "aeiou" and not word.startswith("one")
                assert article == ("an" if vowel_sound else "a"), text


def test_attribute_for_extremes():
    assert attribute_for(np.zeros((28, 28), np.uint8)) == "dark"
    assert attribute_for(np.full((28, 28), 255, np.uint8)) == "light"
    assert attribute_for(torch.full((28, 28), 90, dtype=torch.uint8)) == "dark"


# --------------------------------------------------------------------------- image folders


def save_png(path: Path, size=(10, 6), mode="RGB", value=128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 0, 255 - value)
    Image.new(mode, size, color).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    save_png(tmp_path / "zebra" / "a.png")
    save_png(tmp_path / "apple" / "x.png", mode="L", value=255)
    save_png(tmp_path / "apple" / "nested" / "y.jpg", size=(5, 9))
    (tmp_path / "apple" / "notes.txt").write_text("ignored")
    ds = ImageFolderDataset(tmp_path, image_size=8, channels=3)
    assert ds.class_names == ["apple", "zebra"] and len(ds) == 3
    labels = [ds[i]["label"] for i in range(3)]
    assert sorted(labels) == [0, 0, 1]
    item = ds[0]
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1 and "caption" not in item
    white = ds[[str(p) for p in ds.paths].index(str(tmp_path / "apple" / "x.png"))]["image"]
    assert torch.allclose(white, torch.ones_like(white))
    gray = ImageFolderDataset(tmp_path, image_size=16, channels=1)[2]["image"]
    assert gray.shape == (1, 16, 16)
    captioned = ImageFolderDataset(tmp_path, image_size=8, captions=True, seed=3)
    assert captioned[2]["caption"] == ImageFolderDataset(tmp_path, image_size=8, captions=True, seed=3)[2]["caption"]
    assert "zebra" in captioned[2]["caption"]


def test_image_folder_from_jsonl(tmp_path):
    save_png(tmp_path / "imgs" / "one.png")
    save_png(tmp_path / "imgs" / "two.png", size=(4, 4))
    lines = [{"image": "imgs/one.png", "caption": "a red square"}, {"image": "imgs/two.png", "caption": "another"}]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    ds = ImageFolderDataset(jsonl, image_size=4, channels=3)
    assert len(ds) == 2 and ds.class_names == []
    item = ds[1]
    assert item["caption"] == "another" and item["image"].shape == (3, 4, 4) and "label" not in item
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["caption"] == ["a red square", "another"]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", image_size=8)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        ImageFolderDataset(empty, image_size=8)

    save_png(tmp_path / "loose" / "a.png")
    with pytest.raises(DatasetError, match="one sub-folder per class"):
        ImageFolderDataset(tmp_path / "loose", image_size=8)

    (tmp_path / "hollow" / "cats").mkdir(parents=True)
    with pytest.raises(DatasetError, match="contains no images"):
        ImageFolderDataset(tmp_path / "hollow", image_size=8)

    broken = tmp_path / "broken" / "cats" / "bad.png"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a png")
    ds = ImageFolderDataset(tmp_path / "broken", image_size=8)
    with pytest.raises(DatasetError) as exc_info:
        ds[0]
    assert "bad.png" in assert_one_line(exc_info)

    with pytest.raises(ArgenError, match="channels"):
        ImageFolderDataset(tmp_path / "broken", image_size=8, channels=4)


@pytest.mark.parametrize(
    "second_line, expected",
    [
        ('{"image": "a.png"}', "line 2: missing key 'caption'"),
        ('{"caption": "x"}', "line 2: missing key 'image'"),
        ('{"image": "a.png", "caption": 3}', "line 2: 'caption' must be a non-empty string"),
        ("{not json", "line 2: invalid JSON"),
        ('["a.png", "x"]', "line 2: expected an object"),
        ('{"image": "gone.png", "caption": "x"}', "line 2: image file not found"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, second_line, expected):
    save_png(tmp_path / "a.png")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"image": "a.png", "caption": "fine"}\n' + second_line + "\n")
    with pytest.raises(DatasetError) as exc_info:
        ImageFolderDataset(jsonl, image_size=8)
    assert expected in assert_one_line(exc_info)


def test_empty_jsonl(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n")
    with pytest.raises(DatasetError, match="lists no images"):
        ImageFolderDataset(jsonl, image_size=8)
