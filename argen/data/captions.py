"""Deterministic captions for text-to-image training on Fashion-MNIST.

Fashion-MNIST only has class labels, so text conditioning is synthesised: a template is
filled with one of several synonyms of the class name and, optionally, one attribute that
can be measured from the pixels (``dark`` / ``light``). Using several wordings stops the
generator from keying on one exact string, and the attribute gives a second, checkable
property a prompt can control.

A separate set of *held-out* prompts (other templates, other synonyms) is never produced
by :func:`train_caption`. Evaluating on them measures whether the model follows the
meaning of a prompt rather than memorising the training strings; :func:`all_train_captions`
enumerates the whole training space so tests can prove the two are disjoint.

Everything here is pure Python + numpy so captions can be generated without torch.
"""

from __future__ import annotations

import random
import re

import numpy as np

# Synonyms used in training captions, one list per Fashion-MNIST label (same order as
# ``fashion_mnist.CLASS_NAMES``). Every entry is a singular noun phrase so that
# "a {x}" reads naturally; trousers therefore appear as "pair of ...".
TRAIN_SYNONYMS: dict[int, tuple[str, ...]] = {
    0: ("t-shirt", "tee", "top", "short-sleeved top"),
    1: ("pair of trousers", "pair of pants", "pair of slacks"),
    2: ("pullover", "sweater", "jumper"),
    3: ("dress", "frock", "one-piece dress"),
    4: ("coat", "jacket", "overcoat"),
    5: ("sandal", "open-toe shoe", "summer sandal"),
    6: ("shirt", "button-up shirt", "blouse"),
    7: ("sneaker", "running shoe", "trainer", "athletic shoe"),
    8: ("bag", "handbag", "purse"),
    9: ("ankle boot", "boot", "short boot"),
}

# Synonyms that only appear in held-out prompts. They stay plain, common English because
# the text encoder is a generic sentence-embedding model: an obscure word would test the
# encoder's vocabulary, not the generator.
HELDOUT_SYNONYMS: dict[int, tuple[str, ...]] = {
    0: ("crew-neck tee", "casual t-shirt"),
    1: ("pair of long pants", "pair of dress trousers"),
    2: ("knitted sweater", "wool jumper"),
    3: ("sleeveless dress", "long dress"),
    4: ("winter coat", "warm jacket"),
    5: ("strappy sandal", "beach sandal"),
    6: ("collared shirt", "long-sleeved shirt"),
    7: ("jogging shoe", "sports shoe"),
    8: ("shoulder bag", "leather handbag"),
    9: ("chelsea boot", "leather ankle boot"),
}

# ``{x}`` is the synonym, ``{attr}`` the measured attribute. Articles are written as "a"
# and corrected afterwards by :func:`fix_articles`.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "{x}",
    "a {x}",
    "a photo of a {x}",
    "a small image of a {x}",
    "a {attr} {x}",
    "a photo of a {attr} {x}",
    "an image of a {x}, {attr}",
    "a {x} in {attr} tones",
)

HELDOUT_TEMPLATES: tuple[str, ...] = (
    "a picture showing someone's {x}",
    "here is a {x}",
    "a close-up shot of a {x}",
    "a {x} on a plain background",
    "a catalog picture featuring a {x}",
    "this is what a {x} looks like",
)

ATTRIBUTES: tuple[str, ...] = ("dark", "light")

# A pixel counts as part of the item (not background) above this level. It drops the faint
# anti-aliased rim so thin items such as sandals are not called "dark" just for their size.
FOREGROUND_LEVEL = 32

# Median, over the 60000 Fashion-MNIST training images, of the mean of the foreground
# pixels (> FOREGROUND_LEVEL); measured once with numpy on the Debian
# `dataset-fashion-mnist` files (median 167.55). With it 49.96% of train and 51.2% of test
# images are "dark", and every class has between 31% and 84% dark items.
DARK_THRESHOLD = 167.5

_VOWEL_SOUND_EXCEPTIONS = ("one", "uni", "use", "eu")


def attribute_for(image_uint8) -> str:
    """Return "dark" or "light" for one uint8 image (numpy array or CPU tensor, any shape).

    Measured on the item only (foreground pixels), so the word describes the garment's
    shade rather than how much of the frame it covers. An all-background image is "dark".
    """
    pixels = np.asarray(image_uint8, dtype=np.float64).ravel()
    foreground = pixels[pixels > FOREGROUND_LEVEL]
    if foreground.size == 0 or foreground.mean() < DARK_THRESHOLD:
        return "dark"
    return "light"


def _starts_with_vowel_sound(word: str) -> bool:
    """Spelling-based guess at a vowel sound; good enough for the fixed vocabulary here."""
    word = word.lower()
    if word.startswith(_VOWEL_SOUND_EXCEPTIONS):
        return False
    return word[:1] in "aeiou"


def fix_articles(text: str) -> str:
    """Turn every "a"/"an" into the right one for the word that follows it."""

    def replace(match: re.Match) -> str:
        article, following = match.group(1), match.group(2)
        wanted = "an" if _starts_with_vowel_sound(following) else "a"
        if article[0].isupper():
            wanted = wanted.capitalize()
        return f"{wanted} {following}"

    return re.sub(r"\b([Aa]n?) ([\w-]+)", replace, text)


def fill(template: str, synonym: str, attribute: str | None = None) -> str:
    """Fill one template; the attribute is only needed if the template mentions it."""
    if "{attr}" in template and attribute is None:
        raise ValueError(f"template {template!r} needs an attribute")
    return fix_articles(template.format(x=synonym, attr=attribute))


def _templates_without_attribute() -> tuple[str, ...]:
    return tuple(t for t in TRAIN_TEMPLATES if "{attr}" not in t)


def train_caption(label: int, image_uint8, rng: random.Random) -> str:
    """Draw one training caption for an item of class ``label``.

    The template and synonym come from ``rng`` (so callers control determinism); the
    attribute is measured from ``image_uint8``. Pass ``image_uint8=None`` when no pixels
    are at hand: only attribute-free templates are used then.
    """
    synonyms = TRAIN_SYNONYMS[int(label)]
    templates = TRAIN_TEMPLATES if image_uint8 is not None else _templates_without_attribute()
    template = rng.choice(templates)
    synonym = rng.choice(synonyms)
    attribute = attribute_for(image_uint8) if "{attr}" in template else None
    return fill(template, synonym, attribute)


def caption_for_name(name: str, rng: random.Random) -> str:
    """Caption a free-form class name (e.g. an image-folder sub-folder) with the templates.

    Used for user datasets where there is no synonym list and no calibrated attribute, so
    only attribute-free training templates apply.
    """
    noun = re.sub(r"[_\s]+", " ", name).strip()
    return fill(rng.choice(_templates_without_attribute()), noun)


def all_train_captions(label: int) -> list[str]:
    """Every caption :func:`train_caption` can return for ``label`` (all attributes included)."""
    captions = set()
    for template in TRAIN_TEMPLATES:
        attributes = ATTRIBUTES if "{attr}" in template else (None,)
        for synonym in TRAIN_SYNONYMS[int(label)]:
            for attribute in attributes:
                captions.add(fill(template, synonym, attribute))
    return sorted(captions)


def _heldout_prompts(label: int) -> list[str]:
    """Pair held-out templates with held-out synonyms, cycling through the synonyms."""
    synonyms = HELDOUT_SYNONYMS[label]
    return [
        fill(template, synonyms[i % len(synonyms)])
        for i, template in enumerate(HELDOUT_TEMPLATES)
    ]


# Evaluation prompts, never produced in training (see tests/test_data.py).
HELDOUT_PROMPTS: dict[int, list[str]] = {label: _heldout_prompts(label) for label in HELDOUT_SYNONYMS}
